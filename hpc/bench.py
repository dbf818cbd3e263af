"""`hpc bench`: a streaming load generator for an OpenAI-compatible server.

Prompts are exactly `isl` random token ids of the model's vocabulary, sent as a token array to /v1/completions
with `ignore_eos`, so every request produces exactly `osl` tokens. Measures TTFT, ITL, TPOT, end-to-end latency
(p50/p90/p99), output tokens/s (per GPU too), requests/s and goodput at each concurrency (closed loop) or request
rate (open loop, Poisson arrivals).

Tokens, not text: the request asks for usage on every chunk (`stream_options.continuous_usage_stats`, as vLLM and
hpc's frontend serve it), so TTFT is the arrival of the first generated token and ITL the gap between chunks that
carry tokens, whatever their text. A server that does not send it is timed by text, and the row says so
(`timing: text`). A request that produced no token is an error, never a 0 ms sample."""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import msgspec
import uvloop

from hpc.bench_http import HttpFailure, StreamingClient
from hpc.errors import HpcError
from hpc.runtime import gc_pauses


@dataclass
class Result:
    ttft: float | None = None  # None until a token arrives; a finished request without one is an error
    itl: list[float] = field(default_factory=list)
    e2e: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the server's prefix cache held (usage.prompt_tokens_details)
    timing: str = "tokens"  # "tokens": from usage on every chunk; "text": the server sent none
    error: str | None = None
    late: float = 0.0  # at a request rate: how long after its arrival time it was sent (a lagging client, the cap)

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first (what vLLM and SGLang report as TPOT)."""
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


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


def _headers() -> dict[str, str]:
    key = os.environ.get("HPC_API_KEY", "").split(",")[0].strip() or os.environ.get("OPENAI_API_KEY", "")
    return {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}


def session(concurrency: int, timeout: float) -> aiohttp.ClientSession:
    """aiohttp, for the calls that are not measured (the model list). The measured streams go through
    hpc/bench_http.py (`streaming_client`)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout),
                                 read_bufsize=1 << 20, headers=_headers())


def streaming_client(url: str, timeout: float) -> StreamingClient:
    """The measured requests' client: each event timed when its bytes are read (hpc/bench_http.py says why not
    aiohttp). `timeout`: to connect, and the longest quiet time within a response."""
    return StreamingClient(url, _headers(), timeout, timeout)


# msgspec's JSON and uvloop's event loop (run_loop): the load generator spent a quarter less CPU per request than
# with the json module and asyncio's loop (docs/benchmarks.md); where the load saturates the machine, the server
# gets that CPU back.
_encode, _decode = msgspec.json.encode, msgspec.json.decode
run_loop = uvloop.run


class _Tally:
    """One request's stream, event by event, as the client reads it: TTFT and ITL from the read times."""

    __slots__ = ("res", "t0", "last")

    def __init__(self, res: Result, t0: float):
        self.res, self.t0, self.last = res, t0, None

    def __call__(self, data: bytes, now: float) -> None:
        res = self.res
        if data.startswith(b"[DONE]") or res.error is not None:
            return
        msg = _decode(data)
        if not isinstance(msg, dict):
            raise ValueError(f"an event that is not a JSON object: {data[:80]!r}")
        if "error" in msg:
            res.error = msg["error"]["message"]
            return
        usage, choices = msg.get("usage"), msg.get("choices")
        if usage:
            res.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        if not choices:  # the final usage-only chunk
            res.output_tokens = usage["completion_tokens"] if usage else res.output_tokens
            return
        if usage:  # tokens so far: a chunk with more of them is a token arrival
            arrived = usage["completion_tokens"] > res.output_tokens
            res.output_tokens = usage["completion_tokens"]
        else:
            res.timing = "text"
            arrived = bool(choices[0].get("text"))
        if arrived:
            if self.last is None:
                res.ttft = now - self.t0
            else:
                res.itl.append(now - self.last)
            self.last = now


async def one(client: StreamingClient, model: str, prompt: list[int], osl: int) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": osl, "stream": True, "ignore_eos": True,
            "temperature": 0.0, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    res, t0 = Result(prompt_tokens=len(prompt)), time.perf_counter()
    try:
        status, text = await client.post("/v1/completions", _encode(body), _Tally(res, t0))
        if status != 200:
            res.error = f"HTTP {status}: {text.decode(errors='replace')[:200]}"
    except (OSError, HttpFailure, ValueError, KeyError, TypeError) as e:
        res.error = f"{type(e).__name__}: {str(e) or 'no detail'}"
    res.e2e = time.perf_counter() - t0
    if res.error is None and (res.ttft is None or (res.timing == "tokens" and res.output_tokens == 0)):
        res.error = "the stream ended without a generated token"
    return res


def arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """Seconds from the start at which each of `n` requests arrives: a Poisson process of `rate` requests/s, as
    vLLM's and SGLang's serving benchmarks send at a request rate."""
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


async def level(url: str, model: str, prompts: list[list[int]], osl: int, concurrency: int, timeout: float,
                advance=lambda: None, rate: float | None = None, seed: int | None = None
                ) -> tuple[list[Result], float]:
    """Send `prompts`: closed loop (each of `concurrency` streams sends its next request when one ends) or, with
    `rate`, open loop (requests arrive at that many per second, Poisson, whatever the server's pace; `concurrency`
    then caps those in flight). Each request is timed from its send; at a rate `late` says how long after its
    arrival that was. `seed`: of the arrival times (default: the number of prompts)."""
    gc_pauses.settle()  # before t0 (cheap when run_level settled already): the generator's collector pauses would
    # be the server's latency
    gate = asyncio.Semaphore(concurrency)
    due = arrivals(len(prompts), rate, seed=len(prompts) if seed is None else seed) if rate else [0.0] * len(prompts)
    async with streaming_client(url, timeout) as client:
        async def run(p, at):
            if at:
                await asyncio.sleep(at - (time.perf_counter() - t0))
            async with gate:
                late = time.perf_counter() - t0 - at
                r = await one(client, model, p, osl)
                r.late = late if rate else 0.0
                advance()
                return r

        t0 = time.perf_counter()
        results = await asyncio.gather(*(run(p, at) for p, at in zip(prompts, due)))
        return results, time.perf_counter() - t0


def load_processes(requested: int, concurrency: int, requests: int) -> int:
    """How many load-generating processes a level runs: each needs a stream and a request of its own."""
    return max(1, min(requested, concurrency, requests))


def _level_in_child(out, ready, url: str, model: str, prompts: list[list[int]], osl: int, concurrency: int,
                    timeout: float, rate: float | None, seed: int) -> None:
    """One load-generating process's share: puts its results, when it finished (time.time()) and its CPU
    seconds on `out`, after every process is ready (`ready`, a barrier), so that none starts late."""
    gc_pauses.settle()  # before the barrier: the first collection, the long one, is not in the measured wall time
    ready.wait()
    cpu = time.process_time()
    results, _ = run_loop(level(url, model, prompts, osl, concurrency, timeout, rate=rate, seed=seed))
    out.put((results, time.time(), time.process_time() - cpu))


def run_level(url: str, model: str, prompts: list[list[int]], osl: int, concurrency: int, timeout: float,
              rate: float | None = None, processes: int = 1, advance=lambda: None
              ) -> tuple[list[Result], float, float]:
    """`level` from `processes` load-generating processes. One Python process can read only so many streams a
    second; near that, its own event loop's queue, not the server, sets the latencies (`client_cores` in a row
    shows it). Each process takes every n-th prompt, its share of the concurrency and of the rate (independent
    Poisson processes add up to one of the whole rate), and all start together. Returns the results, the wall
    time and the generators' CPU seconds."""
    processes = load_processes(processes, concurrency, len(prompts))
    if processes == 1:
        gc_pauses.settle()  # before the CPU clock starts
        cpu = time.process_time()
        results, wall = run_loop(level(url, model, prompts, osl, concurrency, timeout, advance, rate))
        return results, wall, time.process_time() - cpu
    import multiprocessing
    import queue

    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no copy of a running event loop
    out, ready = ctx.Queue(), ctx.Barrier(processes + 1)
    children = [ctx.Process(target=_level_in_child, daemon=True, args=(
        out, ready, url, model, prompts[i::processes], osl, concurrency // processes + (i < concurrency % processes),
        timeout, rate and rate / processes, len(prompts) + i)) for i in range(processes)]
    for child in children:
        child.start()
    try:
        ready.wait(timeout=60)
        start, done = time.time(), []
        while len(done) < processes:
            try:
                done.append(out.get(timeout=1))
            except queue.Empty:  # one that finished has put its results already; one that failed has not
                failed = any(c.exitcode not in (None, 0) for c in children)
                if failed or (all(c.exitcode is not None for c in children) and out.empty()):
                    raise HpcError("a load-generating process died; see its error above") from None
    except threading.BrokenBarrierError:
        raise HpcError("the load-generating processes did not start within 60 s") from None
    finally:
        for child in children:
            child.join(timeout=5)
            if child.is_alive():
                child.kill()
    results = [r for rs, _, _ in done for r in rs]
    for _ in results:
        advance()
    return results, max(end for _, end, _ in done) - start, sum(cpu for _, _, cpu in done)


@dataclass(frozen=True)
class Slo:
    """Service-level limits for goodput: a request is good when its TTFT and its TPOT (mean time per output token
    after the first) are both within them. None: no limit on that one."""

    ttft_ms: float | None = None
    itl_ms: float | None = None

    def met(self, r: Result) -> bool:
        tpot = r.tpot
        return ((self.ttft_ms is None or 1000 * r.ttft <= self.ttft_ms)
                and (self.itl_ms is None or tpot is None or 1000 * tpot <= self.itl_ms))


def summarize(concurrency: int, results: list[Result], wall: float, gpus: int = 0, slo: Slo = Slo(),
              rate: float | None = None, client_cpu: float | None = None, processes: int = 1) -> dict:
    """A row of the results. `client_cpu`: the CPU seconds of the load generators (`processes` asked for, as
    `run_level` took them), to show how busy each was (`client_cores`: near 1, its own queueing is in the
    latencies)."""
    ok = [r for r in results if r.error is None]
    ms = lambda xs, p: round(1000 * percentile(xs, p), 2)  # noqa: E731
    ttft, e2e = [r.ttft for r in ok], [r.e2e for r in ok]
    itl = [x for r in ok for x in r.itl]  # between chunks that carry tokens; a chunk may carry several
    tpot = [r.tpot for r in ok if r.tpot is not None]
    output = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    row = {"concurrency": concurrency, "rate_req_s": rate, "requests": len(results), "errors": len(results) - len(ok),
           "output_tok_s": round(output / wall, 1), "req_s": round(len(ok) / wall, 2), "gpus": gpus,
           "output_tok_s_per_gpu": round(output / wall / gpus, 1) if gpus else None,
           "goodput_req_s": round(sum(slo.met(r) for r in ok) / wall, 2), "slo_ttft_ms": slo.ttft_ms,
           "slo_itl_ms": slo.itl_ms, "prompt_tokens": prompt, "cached_tokens": sum(r.cached_tokens for r in ok),
           "reused_share": round(sum(r.cached_tokens for r in ok) / prompt, 4) if prompt else 0.0,
           "timing": "text" if any(r.timing == "text" for r in ok) else "tokens",
           "ttft_min_ms": round(1000 * min(ttft), 3) if ttft else None}
    for name, xs in (("ttft", ttft), ("itl", itl), ("tpot", tpot), ("e2e", e2e)):
        for p in (50, 90, 99):
            row[f"{name}_p{p}_ms"] = ms(xs, p)
    if rate:  # a client that falls behind its schedule sends a lower rate than the row says: show by how much
        row["late_p99_ms"] = ms([r.late for r in results], 99)
    # Where the streams were, on average (Little's law: time spent there over the wall time). In a closed loop the
    # two add up to the concurrency less the load generator's share: a server that streams the rest of a request
    # sooner has more requests waiting for a first token at the same throughput, so a longer TTFT.
    row["before_first_token"] = round(sum(ttft) / wall, 1) if wall else None
    row["after_first_token"] = round(sum(e - t for e, t in zip(e2e, ttft)) / wall, 1) if wall else None
    if client_cpu is not None:
        processes = load_processes(processes, concurrency, len(results))
        row["client_processes"] = processes
        row["client_cores"] = round(client_cpu / wall / processes, 2) if wall else None
    if len(ok) < len(results):
        row["first_error"] = next(r.error for r in results if r.error)
    return row


def make_prompts(n: int, isl: int, first: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(first, vocab) for _ in range(isl)] for _ in range(n)]


def series(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped into one line per variant (its label: every swept axis but the concurrency), each line's
    points in order of throughput."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r.get("variant") or "this run", []).append(r)
    return {label: sorted(pts, key=lambda r: r.get("rate_req_s") or r["concurrency"]) for label, pts in out.items()}


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both throughput (higher) and TTFT (lower), by throughput."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] <= p[1] and q != p for q in points)]
    return sorted(set(front))


def plot(rows: list[dict], path: Path, title: str, svg: bool = False) -> dict[str, list[tuple[float, float]]]:
    """TTFT p50 (top) and p99 (bottom) against output tokens/s per GPU, one line per variant, concurrency on each
    point, the Pareto frontier of the p50 panel dashed. Returns what it drew: {label: [(x, p50)]}."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise HpcError("--plot needs matplotlib (pip install matplotlib)") from None
    per_gpu = all(r.get("output_tok_s_per_gpu") for r in rows)
    xkey = "output_tok_s_per_gpu" if per_gpu else "output_tok_s"
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    drawn = {}
    for label, pts in series(rows).items():
        x = [r[xkey] for r in pts]
        for ax, key in ((top, "ttft_p50_ms"), (bottom, "ttft_p99_ms")):
            y = [r[key] for r in pts]
            line, = ax.plot(x, y, marker="o", label=label)
            for r, xi, yi in zip(pts, x, y):
                at = f"{r['rate_req_s']:g}/s" if r.get("rate_req_s") else f"c={r['concurrency']}"
                ax.annotate(at, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=line.get_color())
        drawn[label] = list(zip(x, [r["ttft_p50_ms"] for r in pts]))
    front = pareto([p for pts in drawn.values() for p in pts])
    if len(front) > 1:
        top.plot(*zip(*front), color="gray", linewidth=6, alpha=0.3, zorder=0, label="Pareto frontier")
    top.set_ylabel("TTFT p50 (ms)")
    bottom.set_ylabel("TTFT p99 (ms)")
    bottom.set_xlabel("output tokens/s per GPU" if per_gpu else "output tokens/s (GPU count unknown)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    top.legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    if svg:
        fig.savefig(Path(path).with_suffix(".svg"))
    plt.close(fig)
    return drawn


def _stats(values: list[float], unit: str) -> dict:
    """One metric in aiperf's profile_export_aiperf.json shape."""
    if not values:
        return {"unit": unit, "avg": None}
    avg = sum(values) / len(values)
    out = {"unit": unit, "avg": avg}
    for p in (1, 5, 10, 25, 50, 75, 90, 95, 99):
        out[f"p{p}"] = percentile(values, p)
    out.update(min=min(values), max=max(values),
               std=(sum((v - avg) ** 2 for v in values) / len(values)) ** 0.5)
    return out


def export_aiperf(directory: Path, results: list[Result], wall: float, concurrency: int, model: str, url: str,
                  command: str, rate: float | None = None) -> Path:
    """One concurrency level (or request rate) as aiperf writes a run: profile_export.jsonl (a record per request)
    and profile_export_aiperf.json (aggregates), with aiperf's field names where the metrics are the same."""
    d = directory / (f"request_rate_{rate:g}" if rate else f"concurrency_{concurrency}")
    d.mkdir(parents=True, exist_ok=True)
    ok = [r for r in results if r.error is None]
    with open(d / "profile_export.jsonl", "w") as f:
        for i, r in enumerate(results):
            metrics = None if r.error else {
                "input_sequence_length": {"value": r.prompt_tokens, "unit": "tokens"},
                "time_to_first_token": {"value": 1000 * r.ttft, "unit": "ms"},
                "request_latency": {"value": 1000 * r.e2e, "unit": "ms"},
                "output_sequence_length": {"value": r.output_tokens, "unit": "tokens"},
                "inter_chunk_latency": {"value": [1000 * x for x in r.itl], "unit": "ms"},
                **({"inter_token_latency": {"value": 1000 * r.tpot, "unit": "ms"}} if r.tpot is not None else {})}
            error = {"code": None, "type": "RequestError", "message": r.error} if r.error else None
            f.write(json.dumps({"metadata": {"session_num": i, "benchmark_phase": "profiling"},
                                "metrics": metrics, "error": error}) + "\n")
    errors: dict[str, int] = {}
    for r in results:
        if r.error:
            errors[r.error] = errors.get(r.error, 0) + 1
    aggregate = {
        "request_throughput": {"unit": "requests/sec", "avg": len(ok) / wall},
        "request_latency": _stats([1000 * r.e2e for r in ok], "ms"),
        "time_to_first_token": _stats([1000 * r.ttft for r in ok], "ms"),
        "inter_token_latency": _stats([1000 * r.tpot for r in ok if r.tpot is not None], "ms"),
        "output_token_throughput": {"unit": "tokens/sec", "avg": sum(r.output_tokens for r in ok) / wall},
        "output_sequence_length": _stats([float(r.output_tokens) for r in ok], "tokens"),
        "input_sequence_length": _stats([float(r.prompt_tokens) for r in ok], "tokens"),
        "benchmark_duration": {"unit": "sec", "avg": wall},
        "request_count": {"unit": "requests", "avg": float(len(results))},
        "error_request_count": {"unit": "requests", "avg": float(len(results) - len(ok))} if errors else None,
        "error_summary": [{"error_details": {"code": None, "type": "RequestError", "message": m}, "count": n}
                          for m, n in errors.items()],
        "input_config": {"endpoint": {"model_names": [model], "type": "completions", "streaming": True, "url": url},
                         "loadgen": {"concurrency": concurrency, "request_count": len(results),
                                     **({"request_rate": rate} if rate else {})},
                         "cli_command": command},
    }
    out = d / "profile_export_aiperf.json"
    out.write_text(json.dumps(aggregate, indent=2))
    return out
