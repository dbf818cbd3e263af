"""Latency the serving path adds, with mocker workers that take no simulated time.

    python benchmarks/frontend.py [--concurrency 1,16,64] [--requests 400] [--osl 16]

Starts `configs/tiny-mocker.yaml`-like deployments through `hpc serve`'s local backend (etcd, NATS, frontend,
mocker workers; aggregated and disaggregated), then streams 16-token requests through the frontend. With zero
simulated compute, TTFT is what the frontend, NATS, the router and the worker loop add; requests/s is the
sustained rate. At concurrency 1 the same requests also go straight to the workers through the runtime client
(no HTTP): the difference is what the frontend adds. Prints a table and writes benchmarks/results/frontend.json."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
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


async def direct_ttft_ms(local: LocalDeployment, n: int, osl: int) -> tuple[float, float]:
    """TTFT p50/p99 of the same requests sent straight to the workers (no HTTP, no frontend), one at a time."""
    from hpc.runtime.client import ServingClient
    from hpc.runtime.protocol import Sampling

    ttfts = []
    async with ServingClient(local.dep.name, local.etcd.url, local.nats.url) as client:
        for prompt in bench.make_prompts(n, 32, 10, 500, seed=99):
            t0 = time.perf_counter()
            stream = client.generate("mock", prompt, Sampling(max_tokens=osl, ignore_eos=True))
            await stream.__anext__()
            ttfts.append(time.perf_counter() - t0)
            async for _ in stream:
                pass
    return 1000 * bench.percentile(ttfts[10:], 50), 1000 * bench.percentile(ttfts[10:], 99)


def http_floor_ms(n: int) -> tuple[float, float]:
    """TTFT p50/p99 of an empty streaming endpoint on the same HTTP stack, through the same client."""
    import subprocess

    from hpc.procs import Pid, free_port, stop, tcp_open, wait_until

    port = free_port()
    server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("http_floor.py")), str(port)])
    try:
        wait_until(lambda: tcp_open("127.0.0.1", port), 30, "http floor server")
        results, _ = asyncio.run(bench.level(f"http://127.0.0.1:{port}", "m", bench.make_prompts(n, 32, 10, 500),
                                             1, 1, 30))
        ttfts = [r.ttft for r in results[10:]]
        return 1000 * bench.percentile(ttfts, 50), 1000 * bench.percentile(ttfts, 99)
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
    for mode, workers in (("aggregated", "  aggregated: {engine: mocker, engine_config: zero.yaml}\n"),
                          ("disaggregated", "  prefill: {engine: mocker, engine_config: zero.yaml}\n"
                                            "  decode: {engine: mocker, engine_config: zero.yaml}\n")):
        local = LocalDeployment(load_deployment(deployment(d, f"bench-{mode[:3]}", workers)), d / mode)
        local.start()
        try:
            direct50, direct99 = asyncio.run(direct_ttft_ms(local, 200, args.osl))
            for r in asyncio.run(measure(local.url, levels, args.requests, args.osl)):
                rows.append({"mode": mode, **{k: r[k] for k in ("concurrency", "requests", "errors", "ttft_p50_ms",
                                                               "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms",
                                                               "req_s", "output_tok_s")}})
                if r["concurrency"] == 1:
                    rows[-1]["direct_ttft_p50_ms"] = round(direct50, 2)
                    rows[-1]["added_p50_ms"] = round(r["ttft_p50_ms"] - direct50, 2)
                    rows[-1]["added_p99_ms"] = round(r["ttft_p99_ms"] - direct99, 2)
                print(rows[-1], flush=True)
        finally:
            local.stop()
    floor50, floor99 = http_floor_ms(300)
    path = write_result("frontend", rows, {"osl": args.osl, "isl": 32, "cpu_cores": os.cpu_count(),
                                           "http_floor_ttft_p50_ms": round(floor50, 2),
                                           "http_floor_ttft_p99_ms": round(floor99, 2)})
    print(table(rows, ["mode", "concurrency", "errors", "ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms",
                       "req_s"]))
    for r in rows:
        if "added_p50_ms" in r:
            print(f"{r['mode']}, concurrency 1: TTFT through the frontend {r['ttft_p50_ms']} ms p50, straight to the "
                  f"workers {r['direct_ttft_p50_ms']} ms: the frontend adds {r['added_p50_ms']} ms p50, "
                  f"{r['added_p99_ms']} ms p99")
    print(f"HTTP floor (an empty FastAPI streaming endpoint, same client): TTFT {floor50:.2f} ms p50, "
          f"{floor99:.2f} ms p99")
    print(f"Written to {path}")


if __name__ == "__main__":
    main()
