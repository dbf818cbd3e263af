"""What the serving path costs per token when an engine keeps it busy: a mocker whose decode step takes `--step-ms`
(as a GPU's step would), many streams at once, `--osl` tokens each.

    python benchmarks/token_path.py [--step-ms 10] [--streams 64,256] [--osl 100] [--processes 1]

Each decode step hands every running stream one token; the worker sends them, NATS carries them, the frontend writes
them out as SSE chunks. ITL above the step is what that path adds (in the mocker the worker's loop runs between
steps, where a GPU would overlap it); each process's CPU time over the tokens is its cost per token. Distinct prompts,
the mocker's prefix cache off (0 reused tokens). Prints a table and writes benchmarks/results/token_path.json."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ZERO, cpu_used, process_cpu, table, write_result  # noqa: E402
from benchmarks.frontend import deployment  # noqa: E402
from engines.torch.tiny import make_tiny_model  # noqa: E402
from hpc import bench  # noqa: E402
from hpc.config import load_deployment  # noqa: E402
from hpc.serve import LocalDeployment  # noqa: E402

ISL = 32


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step-ms", type=float, default=10.0, help="the mocker's decode step")
    p.add_argument("--streams", default="64,256", help="concurrent streams (closed loop)")
    p.add_argument("--osl", type=int, default=100)
    p.add_argument("--processes", type=int, default=1, help="frontend processes")
    p.add_argument("--client-processes", type=int, default=1)
    p.add_argument("--name", default="token_path")
    a = p.parse_args()
    d = Path(tempfile.mkdtemp(prefix="hpc-token-path-"))
    make_tiny_model(d / "model")
    cfg = deployment(d, "token-path", "  aggregated: {engine: mocker, engine_config: zero.yaml}\n", a.processes)
    streams = [int(s) for s in a.streams.split(",") if s]
    # Room for every stream at once, KV blocks and batch alike: no stream waits for another to finish.
    blocks = 2 * max(streams) * -(-(ISL + a.osl) // 16)
    (d / "zero.yaml").write_text(ZERO.replace("decode_step_ms: 0", f"decode_step_ms: {a.step_ms}")
                                 .replace("max_batch_size: 256", f"max_batch_size: {max(streams)}")
                                 + f"num_kv_blocks: {blocks}\n")
    local = LocalDeployment(load_deployment(cfg), d / "state")
    local.start()
    rows = []
    try:
        pids = {c.name.split("/")[0]: c.popen.pid for c in local.components}
        pids["nats"] = local.nats.popen.pid
        for n in streams:
            bench.run_level(local.url, "mock", bench.make_prompts(n, ISL, 10, 500, seed=-n), 4, n, 120)  # warm-up
            before = process_cpu(pids)
            results, wall, client = bench.run_level(local.url, "mock", bench.make_prompts(2 * n, ISL, 10, 500, seed=n),
                                                    a.osl, n, 300, processes=a.client_processes)
            row = bench.summarize(n, results, wall, client_cpu=client, processes=a.client_processes)
            used = cpu_used(before, process_cpu(pids)).values()
            tokens = sum(r.output_tokens for r in results if r.error is None)
            rows.append({"streams": n, "step_ms": a.step_ms, **row, **{
                f"{k}_us_per_token": round(1e6 * sum(cpu for name, cpu in used if name == k) / max(1, tokens), 1)
                for k in pids}})
            print({k: rows[-1][k] for k in ("streams", "errors", "itl_p50_ms", "itl_p99_ms", "output_tok_s")},
                  flush=True)
    finally:
        local.stop()
    path = write_result(a.name, rows, {"osl": a.osl, "isl": ISL, "step_ms": a.step_ms, "cpu_cores": os.cpu_count(),
                                       "frontend_processes": a.processes})
    print(table(rows, ["streams", "step_ms", "requests", "errors", "ttft_p50_ms", "before_first_token", "itl_p50_ms",
                       "itl_p99_ms", "output_tok_s",
                       "aggregated_us_per_token", "frontend_us_per_token", "nats_us_per_token", "client_cores",
                       "cached_tokens"]))
    print(f"Written to {path}")


if __name__ == "__main__":
    main()
