"""`hpc bench`: a streaming load generator for an OpenAI-compatible server.

Prompts are exactly `isl` random token ids of the model's vocabulary, sent as a token array to /v1/completions
with `ignore_eos`, so every request produces exactly `osl` tokens. Measures TTFT, ITL, end-to-end latency
(p50/p90/p99), output tokens/s and requests/s at each concurrency."""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from hpc.errors import HpcError


@dataclass
class Result:
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    e2e: float = 0.0
    output_tokens: int = 0
    error: str | None = None


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


async def discover(url: str, model: str | None, timeout: float) -> tuple[str, str | None]:
    try:
        async with session(1, timeout) as client, client.get(f"{url}/v1/models") as r:
            r.raise_for_status()
            data = (await r.json(content_type=None))["data"]
    except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, ValueError) as e:
        raise HpcError(f"cannot list models at {url}/v1/models: {str(e) or type(e).__name__}") from None
    if not data:
        raise HpcError(f"{url} serves no model yet")
    if model is None:
        return data[0]["id"], data[0].get("root")
    for m in data:
        if m["id"] == model:
            return model, m.get("root")
    raise HpcError(f"{url} does not serve {model!r} (it serves {', '.join(m['id'] for m in data)})")


def vocabulary(tokenizer_dir: str | None) -> tuple[int, int]:
    """(first ordinary token id, vocabulary size) from the model's tokenizer.json."""
    if not tokenizer_dir or not Path(tokenizer_dir, "tokenizer.json").exists():
        raise HpcError(f"no tokenizer.json in {tokenizer_dir!r}: pass --tokenizer MODEL_DIR (the server reports "
                       f"its model directory, but it is not readable here)")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(tokenizer_dir, "tokenizer.json")))
    special = list(tok.get_added_tokens_decoder())  # ids of special tokens, usually the first or the last ones
    first = max(special) + 1 if special and max(special) < tok.get_vocab_size() // 2 else 0
    return first, tok.get_vocab_size()


def session(concurrency: int, timeout: float) -> aiohttp.ClientSession:
    """aiohttp, not httpx: on a 2-core VM an empty streaming endpoint answered in 1.2 ms through httpx and in 0.4 ms
    through aiohttp. A load generator should measure the server, not itself."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout),
                                 read_bufsize=1 << 20)


async def one(client: aiohttp.ClientSession, url: str, model: str, prompt: list[int], osl: int) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": osl, "stream": True, "ignore_eos": True,
            "temperature": 0.0, "stream_options": {"include_usage": True}}
    res, t0 = Result(), time.perf_counter()
    last = None
    try:
        async with client.post(f"{url}/v1/completions", json=body) as r:
            if r.status != 200:
                res.error = f"HTTP {r.status}: {(await r.read()).decode(errors='replace')[:200]}"
                return res
            async for line in r.content:  # line by line
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                msg = json.loads(line[6:])
                if "error" in msg:
                    res.error = msg["error"]["message"]
                    return res
                if msg.get("usage"):
                    res.output_tokens = msg["usage"]["completion_tokens"]
                if msg.get("choices") and msg["choices"][0].get("text"):
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
        res.error = f"{type(e).__name__}: {str(e) or 'no detail'}"
    res.e2e = time.perf_counter() - t0
    return res


async def level(url: str, model: str, prompts: list[list[int]], osl: int, concurrency: int, timeout: float,
                advance=lambda: None) -> tuple[list[Result], float]:
    gate = asyncio.Semaphore(concurrency)
    async with session(concurrency, timeout) as client:
        async def run(p):
            async with gate:
                r = await one(client, url, model, p, osl)
                advance()
                return r

        t0 = time.perf_counter()
        results = await asyncio.gather(*(run(p) for p in prompts))
        return results, time.perf_counter() - t0


def summarize(concurrency: int, results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.error is None]
    ms = lambda xs, p: round(1000 * percentile(xs, p), 2)  # noqa: E731
    ttft, e2e = [r.ttft for r in ok], [r.e2e for r in ok]
    itl = [x for r in ok for x in r.itl]  # between streamed chunks; a chunk may carry several tokens
    # Time per output token after the first, per request: what vLLM and SGLang report as TPOT.
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    row = {"concurrency": concurrency, "requests": len(results), "errors": len(results) - len(ok),
           "output_tok_s": round(sum(r.output_tokens for r in ok) / wall, 1), "req_s": round(len(ok) / wall, 2)}
    for name, xs in (("ttft", ttft), ("itl", itl), ("tpot", tpot), ("e2e", e2e)):
        for p in (50, 90, 99):
            row[f"{name}_p{p}_ms"] = ms(xs, p)
    if len(ok) < len(results):
        row["first_error"] = next(r.error for r in results if r.error)
    return row


def make_prompts(n: int, isl: int, first: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(first, vocab) for _ in range(isl)] for _ in range(n)]


def plot(rows: list[dict], path: Path, gpus: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise HpcError("--plot needs matplotlib (pip install matplotlib)") from None
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["output_tok_s"] / max(gpus, 1) for r in rows]
    y = [r["ttft_p50_ms"] for r in rows]
    ax.plot(x, y, marker="o")
    for r, xi, yi in zip(rows, x, y):
        ax.annotate(f"c={r['concurrency']}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("output tokens/s per GPU" if gpus else "output tokens/s")
    ax.set_ylabel("TTFT p50 (ms)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
