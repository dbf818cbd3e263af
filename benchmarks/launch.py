"""Launch-to-ready and stop times of `hpc launch` on the local Slurm cluster, with mocker workers.

    python benchmarks/launch.py [--runs 3]

Each run: `hpc launch configs/tiny-mocker.yaml --nodes 3` from outside any allocation (salloc, head services,
frontend, 2 prefill + 2 decode workers registered, model served), then `hpc stop`, timed until no process of the
deployment is left and the allocation is gone. Prints a table, writes benchmarks/results/launch.json."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import table, write_result  # noqa: E402
from hpc.slurm.localcluster import ClusterSpec, LocalCluster  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    cluster = LocalCluster()
    cluster.up(ClusterSpec(3, 4, 4))
    model = REPO / ".hpc" / "models" / "tiny-llama"
    if not (model / "config.json").exists():
        from engines.torch.tiny import make_tiny_model

        make_tiny_model(model)
    env = {**cluster.env(), "HPC_MODEL_DIR": str(model)}
    hpc = [sys.executable, "-m", "hpc"]
    rows = []
    for i in range(args.runs):
        t0 = time.monotonic()
        subprocess.run(hpc + ["launch", "configs/tiny-mocker.yaml", "--nodes", "3", "--port", "0", "--detach"],
                       env=env, cwd=REPO, check=True, capture_output=True)
        ready = time.monotonic() - t0
        t0 = time.monotonic()
        subprocess.run(hpc + ["stop", "tiny-mocker"], env=env, cwd=REPO, check=True, capture_output=True)
        stopped = time.monotonic() - t0
        while subprocess.run(["pgrep", "-f", "tiny-mocker.yaml"], capture_output=True).returncode == 0:
            time.sleep(0.05)
        gone = time.monotonic() - t0
        queue = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout.strip()
        rows.append({"run": i, "ready_s": round(ready, 2), "stop_returned_s": round(stopped, 2),
                     "processes_gone_s": round(gone, 2), "squeue_empty": queue == ""})
        print(rows[-1], flush=True)
    summary = {k: round(statistics.median(r[k] for r in rows), 2)
               for k in ("ready_s", "stop_returned_s", "processes_gone_s")}
    path = write_result("launch", rows, {"median": summary, "workers": "2 prefill + 2 decode (mocker)",
                                         "nodes": 3})
    print(table(rows, list(rows[0])))
    print(f"median: {summary}. Written to {path}")


if __name__ == "__main__":
    main()
