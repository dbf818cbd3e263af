"""NATS under SCHED_BATCH (as hpc starts it) against NATS under the default policy, on one running stack.

    python benchmarks/nats_policy.py [--concurrency 1,64] [--requests 1500] [--rounds 3] [--processes 2]
                                     [--name nats_policy]

hpc's local stack (`hpc serve`'s: etcd, NATS, `--processes` frontend processes, one aggregated mocker worker of
zero simulated time), the same load generator as `benchmarks/peer_dynamo.py` (16-token streams of distinct
32-token prompts, closed loop, the mocker's prefix cache off: 0 reused prompt tokens). At each concurrency the
rounds alternate NATS's policy (every thread of it, set with sched_setscheduler): the default policy, then
SCHED_BATCH, and so on. Each row gives requests/s, TTFT and end to end, and the context switches per request of
each process (voluntary: it waited; involuntary: it was preempted), from /proc/PID/task/*/status. It matters where
the processes share busy cores, as on a small head node. Prints a table and writes benchmarks/results/<name>.json."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import table, write_result  # noqa: E402
from benchmarks.peer_dynamo import ISL, OSL, hpc_stack  # noqa: E402
from hpc import bench  # noqa: E402

POLICIES = {"default": os.SCHED_OTHER, "batch": os.SCHED_BATCH}


def threads(pid: int) -> list[int]:
    return [int(t) for t in os.listdir(f"/proc/{pid}/task")]


def switches(pids: dict[str, list[int]]) -> dict[str, tuple[int, int]]:
    """(voluntary, involuntary) context switches so far, over every thread of each named group of processes."""
    out = {}
    for name, group in pids.items():
        counts = [0, 0]
        for pid in group:
            for tid in threads(pid):
                for line in open(f"/proc/{pid}/task/{tid}/status"):
                    key = line.split(":")[0]
                    if key in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
                        counts[key.startswith("non")] += int(line.split()[1])
        out[name] = tuple(counts)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", default="1,64")
    p.add_argument("--requests", type=int, default=1500, help="per round")
    p.add_argument("--rounds", type=int, default=3, help="per policy")
    p.add_argument("--processes", type=int, default=2, help="frontend processes")
    p.add_argument("--name", default="nats_policy")
    args = p.parse_args()
    from engines.torch.tiny import make_tiny_model

    work = Path(tempfile.mkdtemp(prefix="hpc-nats-policy-"))
    stack = hpc_stack(make_tiny_model(work / "model"), work / "hpc", args.processes)
    rows = []
    try:
        pids = {c.name: c.popen.pid for c in stack.components}
        frontends = [int(k) for k in subprocess.run(["pgrep", "-P", str(pids["frontend"])], capture_output=True,
                                                    text=True, timeout=10).stdout.split()] or [pids["frontend"]]
        groups = {"frontends": frontends, "worker": [pids["aggregated/0"]], "nats": [stack.nats.popen.pid],
                  "load generator": [os.getpid()]}
        for c in (int(x) for x in args.concurrency.split(",")):
            bench.run_level(stack.url, "mock", bench.make_prompts(50, ISL, 10, 500, seed=-1 - c), OSL, c, 60)
            for rnd in range(2 * args.rounds):
                policy = "batch" if rnd % 2 else "default"
                for tid in threads(stack.nats.popen.pid):
                    os.sched_setscheduler(tid, POLICIES[policy], os.sched_param(0))
                before = switches(groups)
                results, wall, client = bench.run_level(stack.url, "mock", bench.make_prompts(
                    args.requests, ISL, 10, 500, seed=1000 * c + rnd), OSL, c, 60)
                after, done = switches(groups), max(1, len(results))
                s = bench.summarize(c, results, wall, client_cpu=client, processes=1)
                row = {"nats_policy": policy, "round": rnd // 2 + 1,
                       **{k: s[k] for k in ("concurrency", "requests", "errors", "req_s", "ttft_p50_ms", "ttft_p99_ms",
                                            "e2e_p50_ms", "cached_tokens")}}
                for name in groups:
                    row[f"{name} switches/req"] = "{:.2f} / {:.2f}".format(
                        *((a - b) / done for a, b in zip(after[name], before[name])))
                rows.append(row)
                print(row, flush=True)
    finally:
        stack.stop()
    path = write_result(args.name, rows, {"osl": OSL, "isl": ISL, "cpu_cores": os.cpu_count(),
                                          "frontend_processes": args.processes})
    print(table(rows, list(rows[0])))
    print("switches/req: voluntary / involuntary context switches per request, over every thread of the processes")
    print(f"Written to {path}")


if __name__ == "__main__":
    main()
