"""When does a standalone encode worker pay off? TTFT of EP/D (prefill workers encode their own images) against
E/P/D (an encode worker does, and hands the embeddings over through NIXL) with the same number of workers, under an
image-heavy load, with mocker timing.

    python benchmarks/epd.py [--encode-ms 40] [--concurrency 2,8,16] [--requests 64]

Every deployment has 4 workers: EP/D = 2 prefill + 2 decode; E/P/D = 1 encode + 1 prefill + 2 decode, or 2 encode
+ 1 prefill + 1 decode. Each request
is a distinct image (its own PNG, so no embedding is cached or reused) with a distinct question, 8 output tokens. The
model directory is LLaVA-1.5-shaped for the frontend (336-pixel images, 576 image tokens each); the mocker spends
`--encode-ms` per image on its simulated GPU (shared with prefill, as on a prefill worker that encodes) and
prefills at 50k tokens/s. The embeddings it makes up are [576, 64] zeros, so the NIXL transfer here is small; the
timing is the point. Prints a table and writes benchmarks/results/epd.json."""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import table, write_result  # noqa: E402
from engines.torch.tiny import make_tiny_llava  # noqa: E402
from hpc.config import load_deployment  # noqa: E402
from hpc.serve import LocalDeployment  # noqa: E402

FLOWS = {"EP/D": {"prefill": 2, "decode": 2}, "E/P/D": {"encode": 1, "prefill": 1, "decode": 2},
         "E/P/D, 2 encoders": {"encode": 2, "prefill": 1, "decode": 1}}


def image(seed: int) -> str:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def one(session, url: str, n: int, ttfts: list, errors: list) -> None:
    body = {"model": "mock-llava", "max_tokens": 8, "stream": True, "ignore_eos": True, "messages": [
        {"role": "user", "content": [{"type": "text", "text": f"Question {n}: what is in picture {n}?"},
                                     {"type": "image_url", "image_url": {"url": image(n)}}]}]}
    t0 = time.perf_counter()
    async with session.post(f"{url}/v1/chat/completions", json=body) as r:
        if r.status != 200:
            errors.append(f"HTTP {r.status}: {(await r.text())[:200]}")
            return
        async for line in r.content:
            if line.startswith(b"data: ") and b'"content"' in line:
                ttfts.append(time.perf_counter() - t0)
                break
        async for _ in r.content:  # the rest of the stream
            pass


async def load(url: str, concurrency: int, requests: int, offset: int) -> tuple[list, list, float]:
    import aiohttp

    ttfts, errors, queue = [], [], asyncio.Queue()
    for n in range(requests):
        queue.put_nowait(offset + n)

    async def user(session):
        while not queue.empty():
            await one(session, url, queue.get_nowait(), ttfts, errors)

    t0 = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        await asyncio.gather(*(user(session) for _ in range(concurrency)))
    return ttfts, errors, time.perf_counter() - t0


async def reused_tokens(local: LocalDeployment) -> int:
    """Prompt tokens the workers' prefix caches held, so far: 0 when every image and question is new."""

    async with local.client() as client:
        return sum([(await client.stats(w)).reused_prompt_tokens for w in client.directory.workers.values()])


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return round(1000 * s[min(len(s) - 1, int(p * len(s)))], 1) if s else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encode-ms", type=float, default=40.0)
    p.add_argument("--concurrency", default="2,8,16")
    p.add_argument("--requests", type=int, default=64)
    a = p.parse_args()
    d = Path(tempfile.mkdtemp(prefix="hpc-epd-bench-"))
    model = make_tiny_llava(d / "model")
    cfg = json.loads((model / "config.json").read_text())
    cfg["vision_config"].update(image_size=336, patch_size=14)  # 576 image tokens, as LLaVA-1.5
    (model / "config.json").write_text(json.dumps(cfg))
    (d / "mocker.yaml").write_text(
        f"mocker: {{prefill_tokens_per_s: 50000, prefill_overhead_ms: 1, decode_step_ms: 4, vocab_size: 500, "
        f"encode_ms_per_image: {a.encode_ms}, hidden_size: 64}}\n")
    rows, offset = [], 0
    for flow, workers in FLOWS.items():
        name = "epd-" + "".join(ch for ch in flow.lower() if ch.isalnum())
        spec = "\n".join(f"  {role}: {{engine: mocker, engine_config: mocker.yaml, replicas: {n}}}"
                         for role, n in workers.items())
        (d / f"{name}.yaml").write_text(f"name: {name}\nmodel: {{path: {model}, served_name: mock-llava, modality: "
                                        f"multimodal}}\ncluster: {{gpus_per_node: 0}}\nworkers:\n{spec}\n")
        local = LocalDeployment(load_deployment(d / f"{name}.yaml"), d / name)
        local.start()
        try:
            for c in (int(x) for x in a.concurrency.split(",")):
                before = asyncio.run(reused_tokens(local))
                ttfts, errors, wall = asyncio.run(load(local.url, c, a.requests, offset))
                offset += a.requests  # every request of the run has an image of its own
                rows.append({"flow": flow, "workers": "+".join(f"{n}{r[0].upper()}" for r, n in workers.items()),
                             "concurrency": c, "requests": a.requests, "errors": len(errors),
                             "ttft_p50_ms": pct(ttfts, 0.5), "ttft_p99_ms": pct(ttfts, 0.99),
                             "req_s": round(a.requests / wall, 1),
                             "reused_tokens": asyncio.run(reused_tokens(local)) - before})
                print(rows[-1], errors[:1], flush=True)
        finally:
            local.stop()
    path = write_result("epd", rows, {"encode_ms_per_image": a.encode_ms, "image_tokens": 576,
                                      "prefill_tokens_per_s": 50000, "osl": 8, "cpu_cores": os.cpu_count()})
    print(table(rows, ["flow", "workers", "concurrency", "requests", "errors", "ttft_p50_ms", "ttft_p99_ms", "req_s",
                       "reused_tokens"]))
    print("reused_tokens: prompt tokens a prefix cache held during the level (0: every request computed in full)")
    print(f"Written to {path}")


if __name__ == "__main__":
    main()
