"""Latency the serving path adds, with mocker workers that take no simulated time.

    python benchmarks/frontend.py [--concurrency 1,16,64] [--requests 400] [--osl 16]

Starts `configs/tiny-mocker.yaml`-like deployments through `hpc serve`'s local backend (etcd, NATS, frontend,
mocker workers; aggregated and disaggregated), then streams 16-token requests through the frontend. With zero
simulated compute, TTFT is what the frontend, NATS, the router and the worker loop add; requests/s is the
sustained rate. At concurrency 1 each request through the frontend is followed by the same request straight to
the workers through the runtime client (no HTTP) and one to an empty HTTP endpoint, interleaved so that all three
see the same machine: the difference of the first two is what the frontend adds. Prints tables and writes
benchmarks/results/frontend.json."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import table, write_result  # noqa: E402
from engines.torch.tiny import make_tiny_model  # noqa: E402
from hpc import bench  # noqa: E402
from hpc.config import load_deployment  # noqa: E402
from hpc.serve import LocalDeployment  # noqa: E402

ZERO = "mocker: {prefill_tokens_per_s: 1.0e12, prefill_overhead_ms: 0, decode_step_ms: 0, " \
       "decode_ms_per_sequence: 0, decode_ms_per_1k_context: 0, kv_bytes_per_token: 64, vocab_size: 500}\n"


def deployment(d: Path, name: str, workers: str) -> Path:
    (d / "zero.yaml").write_text(ZERO + "max_batch_size: 256\n")
    p = d / f"{name}.yaml"
    p.write_text(f"name: {name}\nmodel: {{path: {d / 'model'}, served_name: mock}}\ncluster: {{gpus_per_node: 0}}\n"
                 f"workers:\n{workers}")
    return p


async def paired_ttft_ms(local: LocalDeployment, floor_url: str, n: int, osl: int) -> dict:
    """Concurrency 1, interleaved so that all three see the same machine: each round sends one request through
    the frontend (HTTP), the same request straight to the workers (runtime client, no HTTP), and one to the
    empty HTTP endpoint, in a random order: on a VM, a request that follows an idle gap pays to wake the
    processes it reaches, so no way may always follow the same other. Returns p50/p99 TTFT of each, in ms."""
    from hpc.runtime.client import ServingClient
    from hpc.runtime.protocol import Sampling

    async def through_frontend(prompt):
        return (await bench.one(http, local.url, "mock", prompt, osl)).ttft

    async def straight(prompt):
        t0 = time.perf_counter()
        stream = direct.generate("mock", prompt, Sampling(max_tokens=osl, ignore_eos=True))
        await stream.__anext__()
        ttft = time.perf_counter() - t0
        async for _ in stream:
            pass
        return ttft

    async def floor(prompt):
        return (await bench.one(http, floor_url, "m", prompt, 1)).ttft

    ways = {"frontend": through_frontend, "direct": straight, "floor": floor}
    ttft = {key: [] for key in ways}
    order = random.Random(7)
    async with ServingClient(local.dep.name, local.etcd.url, local.nats.url) as direct, \
            bench.session(2, 30) as http:
        for i, prompt in enumerate(bench.make_prompts(n + 20, 32, 10, 500, seed=99)):
            keys = list(ways)
            order.shuffle(keys)  # each way follows each other way equally often
            for key in keys:
                took = await ways[key](prompt)
                if i >= 20:  # after a warm-up
                    ttft[key].append(took)
    return {f"{key}_ttft_p{p}_ms": round(1000 * bench.percentile(xs, p), 3) for key, xs in ttft.items()
            for p in (50, 99)}


@contextmanager
def http_floor():
    """An empty streaming endpoint on the same HTTP stack (benchmarks/http_floor.py); yields its URL."""
    from hpc.procs import Pid, free_port, stop, tcp_open, wait_until

    port = free_port()
    server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("http_floor.py")), str(port)])
    try:
        wait_until(lambda: tcp_open("127.0.0.1", port), 30, "http floor server")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(Pid.of(server.pid), popen=server)


async def measure(url: str, levels: list[int], n: int, osl: int) -> list[dict]:
    rows = []
    for c in levels:
        prompts = bench.make_prompts(n, 32, 10, 500, seed=c)
        await bench.level(url, "mock", prompts[: min(n, 20)], osl, c, 60)  # warm-up
        results, wall = await bench.level(url, "mock", prompts, osl, c, 60)
        rows.append(bench.summarize(c, results, wall))
    return rows


KEYS = ("concurrency", "requests", "errors", "ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms", "req_s",
        "output_tok_s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--osl", type=int, default=16)
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    d = Path(tempfile.mkdtemp(prefix="hpc-frontend-bench-"))
    make_tiny_model(d / "model")
    rows = []
    with http_floor() as floor_url:
        for mode, workers in (("aggregated", "  aggregated: {engine: mocker, engine_config: zero.yaml}\n"),
                              ("disaggregated", "  prefill: {engine: mocker, engine_config: zero.yaml}\n"
                                                "  decode: {engine: mocker, engine_config: zero.yaml}\n")):
            local = LocalDeployment(load_deployment(deployment(d, f"bench-{mode[:3]}", workers)), d / mode)
            local.start()
            try:
                paired = asyncio.run(paired_ttft_ms(local, floor_url, args.requests, args.osl))
                for r in asyncio.run(measure(local.url, levels, args.requests, args.osl)):
                    rows.append({"mode": mode, **{k: r[k] for k in KEYS}})
                    if r["concurrency"] == 1:
                        rows[-1].update(paired, added_p50_ms=round(paired["frontend_ttft_p50_ms"]
                                                                   - paired["direct_ttft_p50_ms"], 2))
                    print(rows[-1], flush=True)
            finally:
                local.stop()
    path = write_result("frontend", rows, {"osl": args.osl, "isl": 32, "cpu_cores": os.cpu_count()})
    print(table(rows, ["mode", "concurrency", "errors", "ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms",
                       "req_s"]))
    print("\nConcurrency 1, interleaved requests, TTFT p50 / p99 in ms:")
    print(table([r for r in rows if "added_p50_ms" in r],
                ["mode", "frontend_ttft_p50_ms", "direct_ttft_p50_ms", "added_p50_ms", "floor_ttft_p50_ms",
                 "frontend_ttft_p99_ms", "direct_ttft_p99_ms", "floor_ttft_p99_ms"]))
    print("frontend: through the frontend over HTTP; direct: the same requests straight to the workers; added: "
          "the difference;\nfloor: an empty streaming endpoint on the same HTTP stack (plain ASGI on uvicorn), same HTTP client.")
    print(f"Written to {path}")


if __name__ == "__main__":
    main()
