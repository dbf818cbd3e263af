"""Latency the serving path adds, with mocker workers that take no simulated time.

    python benchmarks/frontend.py [--concurrency 1,16,64] [--requests 400] [--osl 16] [--processes 1,4]
                                  [--client-processes 1] [--name frontend]

Starts `configs/tiny-mocker.yaml`-like deployments through `hpc serve`'s local backend (etcd, NATS, frontend,
mocker workers; aggregated and disaggregated), then streams 16-token requests through the frontend. With zero
simulated compute, TTFT is what the frontend, NATS, the router and the worker loop add; requests/s is the
sustained rate. The same requests also go straight to the workers through the runtime client (no HTTP, no
frontend), at the same concurrency: the difference is what the frontend adds. At concurrency 1 the two, and an
empty HTTP endpoint, are interleaved request by request so that all three see the same machine. Prints tables and
writes benchmarks/results/<name>.json."""

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

from benchmarks.common import ZERO, table, write_result  # noqa: E402
from engines.torch.tiny import make_tiny_model  # noqa: E402
from hpc import bench  # noqa: E402
from hpc.config import load_deployment  # noqa: E402
from hpc.serve import LocalDeployment  # noqa: E402


def deployment(d: Path, name: str, workers: str, processes: int = 1) -> Path:
    (d / "zero.yaml").write_text(ZERO)
    p = d / f"{name}.yaml"
    p.write_text(f"name: {name}\nmodel: {{path: {d / 'model'}, served_name: mock}}\ncluster: {{gpus_per_node: 0}}\n"
                 f"frontend: {{processes: {processes}}}\nworkers:\n{workers}")
    return p


async def straight_ttft(direct, prompt: list[int], osl: int) -> float:
    """TTFT of one request sent straight to the workers through the runtime client (no HTTP, no frontend)."""
    from hpc.runtime.protocol import Sampling

    t0 = time.perf_counter()
    stream = direct.generate("mock", prompt, Sampling(max_tokens=osl, ignore_eos=True))
    await stream.__anext__()
    ttft = time.perf_counter() - t0
    async for _ in stream:
        pass
    return ttft


def runtime_client(local: LocalDeployment):

    return local.client()


async def paired_ttft_ms(local: LocalDeployment, floor_url: str, n: int, osl: int) -> dict:
    """Concurrency 1, interleaved so that all three see the same machine: each round sends one request through
    the frontend (HTTP), the same request straight to the workers (runtime client, no HTTP), and one to the
    empty HTTP endpoint, in a random order: on a VM, a request that follows an idle gap pays to wake the
    processes it reaches, so no way may always follow the same other. Returns p50/p99 TTFT of each, in ms."""
    async def through_frontend(prompt):
        return (await bench.one(http, "mock", prompt, osl)).ttft

    async def straight(prompt):
        return await straight_ttft(direct, prompt, osl)

    async def floor(prompt):
        return (await bench.one(http_floor, "m", prompt, 1)).ttft

    ways = {"frontend": through_frontend, "direct": straight, "floor": floor}
    ttft = {key: [] for key in ways}
    order = random.Random(7)
    async with (runtime_client(local) as direct, bench.streaming_client(local.url, 30) as http,
                bench.streaming_client(floor_url, 30) as http_floor):
        for i, prompt in enumerate(bench.make_prompts(n + 20, 32, 10, 500, seed=99)):
            keys = list(ways)
            order.shuffle(keys)  # each way follows each other way equally often
            for key in keys:
                took = await ways[key](prompt)
                if i >= 20:  # after a warm-up
                    ttft[key].append(took)
    return {f"{key}_ttft_p{p}_ms": ms(xs, p) for key, xs in ttft.items() for p in (50, 99)}


async def direct_ttft_ms(local: LocalDeployment, prompts: list[list[int]], osl: int, concurrency: int) -> dict:
    """The same requests straight to the workers at the same concurrency: TTFT p50/p99 in ms."""
    gate = asyncio.Semaphore(concurrency)
    async with runtime_client(local) as direct:
        async def run(prompt):
            async with gate:
                return await straight_ttft(direct, prompt, osl)

        ttft = await asyncio.gather(*(run(p) for p in prompts))
    return {f"direct_ttft_p{p}_ms": ms(ttft, p) for p in (50, 99)}


def ms(values: list[float], p: float) -> float:
    return round(1000 * bench.percentile(values, p), 3)


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


def measure(local: LocalDeployment, levels: list[int], n: int, osl: int, clients: int) -> list[dict]:
    """Each concurrency through the frontend from `clients` load-generating processes, then straight to the
    workers (concurrency > 1; concurrency 1 is measured interleaved, by paired_ttft_ms)."""
    rows = []
    for c in levels:
        prompts = bench.make_prompts(n, 32, 10, 500, seed=c)
        warm = bench.make_prompts(min(n, 20), 32, 10, 500, seed=-1 - c)  # prompts of its own
        bench.run_level(local.url, "mock", warm, osl, c, 60)
        results, wall, cpu = bench.run_level(local.url, "mock", prompts, osl, c, 60, processes=clients)
        rows.append(bench.summarize(c, results, wall, client_cpu=cpu, processes=clients))
        if c > 1:
            rows[-1].update(asyncio.run(direct_ttft_ms(local, prompts, osl, c)))
    return rows


KEYS = ("concurrency", "requests", "errors", "ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms", "req_s",
        "output_tok_s", "cached_tokens", "client_processes", "client_cores")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--osl", type=int, default=16)
    p.add_argument("--processes", default="1", help="frontend processes, one deployment each (e.g. 1,4)")
    p.add_argument("--client-processes", type=int, default=1, help="load-generating processes (hpc bench's "
                   "--client-processes): more where one is the bottleneck (client_cores near 1) and cores are spare")
    p.add_argument("--name", default="frontend", help="result file name (without .json)")
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    d = Path(tempfile.mkdtemp(prefix="hpc-frontend-bench-"))
    make_tiny_model(d / "model")
    rows = []
    with http_floor() as floor_url:
        for n, mode, workers in [(n, *m) for n in (int(x) for x in args.processes.split(",")) for m in (
                ("aggregated", "  aggregated: {engine: mocker, engine_config: zero.yaml}\n"),
                ("disaggregated", "  prefill: {engine: mocker, engine_config: zero.yaml}\n"
                                  "  decode: {engine: mocker, engine_config: zero.yaml}\n"))]:
            name = f"bench-{mode[:3]}-{n}"
            local = LocalDeployment(load_deployment(deployment(d, name, workers, n)), d / name)
            local.start()
            try:
                paired = asyncio.run(paired_ttft_ms(local, floor_url, args.requests, args.osl))
                for r in measure(local, levels, args.requests, args.osl, args.client_processes):
                    row = {"mode": mode, "frontend_processes": n, **{k: r[k] for k in KEYS}}
                    through = paired if r["concurrency"] == 1 else {
                        "frontend_ttft_p50_ms": r["ttft_p50_ms"], "frontend_ttft_p99_ms": r["ttft_p99_ms"], **r}
                    for p in (50, 99):
                        row[f"added_p{p}_ms"] = round(through[f"frontend_ttft_p{p}_ms"]
                                                      - through[f"direct_ttft_p{p}_ms"], 2)
                    row.update({k: v for k, v in through.items() if k.startswith(("frontend_", "direct_",
                                                                                  "floor_"))})
                    rows.append(row)
                    print(row, flush=True)
            finally:
                local.stop()
    path = write_result(args.name, rows, {"osl": args.osl, "isl": 32, "cpu_cores": os.cpu_count()})
    print(table(rows, ["mode", "frontend_processes", "concurrency", "errors", "ttft_p50_ms", "ttft_p99_ms",
                       "e2e_p50_ms", "e2e_p99_ms", "req_s", "client_cores", "cached_tokens"]))
    print("\nTTFT p50 / p99 in ms: through the frontend over HTTP, straight to the workers (runtime client, no "
          "HTTP), and the difference:")
    print(table(rows, ["mode", "frontend_processes", "concurrency", "frontend_ttft_p50_ms", "direct_ttft_p50_ms",
                       "added_p50_ms",
                       "frontend_ttft_p99_ms", "direct_ttft_p99_ms", "added_p99_ms"]))
    for r in rows:
        if r["concurrency"] == 1:
            print(f"{r['mode']}, concurrency 1 (interleaved): the frontend adds {r['added_p50_ms']} ms p50; an "
                  f"empty streaming endpoint on the same HTTP stack and client takes {r['floor_ttft_p50_ms']} ms")
    print(f"Written to {path}")


if __name__ == "__main__":
    main()
