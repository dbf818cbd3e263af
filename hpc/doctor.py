"""`hpc doctor`: what breaks multi-node serving silently, checked on every node of an allocation. Each node runs
`python -m hpc.doctor` as one task of one srun step and prints one JSON line:

- its clock (compared with this host's, against skew that confuses leases and traces);
- its GPUs (nvidia-smi), against the GPUs per node the plan needs;
- NIXL: importable, and a 64 MiB DRAM transfer between two agents at a speed that rules out a broken UCX;
- the project directory and the Python environment, as this node sees them;
- the head node's ports: rank 0 (the head node) listens, every other node connects;
- the other way: each other node listens where its workers' direct ports would (on its address towards the head
  node) and the head node connects, as frontends do (hpc/runtime/direct.py).

The login side (`hpc doctor` itself) also checks srun's pmix plugin, pyxis when the config names a container, and
the preflight checks of the config."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from hpc.runtime.direct import local_address_towards

MIN_DRAM_GBPS = 0.5


def gpus() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def nixl_dram_gbps() -> tuple[float | None, str]:
    """A 64 MiB READ between two NIXL agents of this process, in DRAM."""
    try:
        import asyncio

        import torch

        from hpc.runtime.protocol import KvLayout
        from hpc.runtime.transfer import KvTransfer
    except Exception as e:
        return None, f"cannot import NIXL or torch: {e}"
    try:
        block = 1 << 20
        src = torch.arange(64 * block, dtype=torch.int32).view(torch.uint8)[: 64 * block].view(64, block).clone()
        dst = torch.zeros_like(src)
        layout = KvLayout("uint8", 1, 1, 1, block, block)
        a = KvTransfer(f"doctor-src-{os.getpid()}", src, layout, "localhost", progress_thread=True)
        b = KvTransfer(f"doctor-dst-{os.getpid()}", dst, layout, "localhost", progress_thread=False)
        try:
            result = asyncio.run(b.read(a.handle(list(range(64)), 64), list(range(64)), "doctor", 20))
            if not torch.equal(src, dst):
                return None, "the bytes arrived changed"
            return result.gbps, ""
        finally:
            a.close()
            b.close()
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"


def _node_file(rendezvous: Path, rank: int) -> Path:
    return rendezvous.with_name(f"{rendezvous.stem}.{rank}.json")


def ports(rank: int, size: int, rendezvous: Path, timeout: float = 20) -> dict:
    """Rank 0 listens on a free port and writes it to the shared `rendezvous` file; the others connect to it. Then
    the other way: each other node listens and writes its address to a file of its own; rank 0 connects to each."""
    if size == 1:
        return {"ports": "one node: nothing to reach"}
    host = os.environ.get("HPC_ADVERTISE_HOST") or socket.gethostname()
    if rank == 0:
        with socket.socket() as s:
            s.bind(("0.0.0.0", 0))
            s.listen()
            s.settimeout(timeout)
            rendezvous.write_text(json.dumps({"host": host, "port": s.getsockname()[1]}))
            seen = 0
            deadline = time.monotonic() + timeout
            while seen < size - 1 and time.monotonic() < deadline:
                try:
                    conn, _ = s.accept()
                    conn.close()
                    seen += 1
                except OSError:
                    break
        back = 0
        for other in range(1, size):  # each node's listener, as a frontend reaches a worker's direct port
            path = _node_file(rendezvous, other)
            while not path.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            try:
                target = json.loads(path.read_text())
                with socket.create_connection((target["host"], target["port"]), timeout=5):
                    back += 1
            except (OSError, ValueError, KeyError):
                pass
        return {"ports": f"{seen} of {size - 1} nodes reached this head node; it reached {back} of {size - 1}",
                "reached": seen == size - 1}
    deadline = time.monotonic() + timeout
    while not rendezvous.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        target = json.loads(rendezvous.read_text())
        here = local_address_towards(f"tcp://{target['host']}:{target['port']}")
        with socket.socket(socket.AF_INET6 if ":" in here else socket.AF_INET) as listener:
            listener.bind((here, 0))
            listener.listen()
            listener.settimeout(timeout + 10)  # rank 0 first waits up to `timeout` for every node to connect
            _node_file(rendezvous, rank).write_text(json.dumps({"host": here, "port": listener.getsockname()[1]}))
            with socket.create_connection((target["host"], target["port"]), timeout=5):
                pass
            reached = f"reached {target['host']}:{target['port']}"
            try:
                listener.accept()[0].close()
                return {"ports": f"{reached}; the head node reached {here}", "reached": True, "reached_back": True}
            except OSError as e:
                return {"ports": f"{reached}; the head node did not reach {here}:{listener.getsockname()[1]} "
                                 f"({e or 'timed out'})", "reached": True, "reached_back": False}
    except (OSError, ValueError, KeyError) as e:
        return {"ports": f"cannot reach the head node: {e}", "reached": False}


def main() -> None:
    rank, size = int(os.environ.get("SLURM_PROCID", "0")), int(os.environ.get("SLURM_NTASKS", "1"))
    rendezvous = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".hpc/doctor-rendezvous.json")
    report = {"node": os.environ.get("SLURMD_NODENAME") or socket.gethostname(), "rank": rank, "time": time.time(),
              "gpus": gpus(), "cwd_visible": Path.cwd().is_dir(), "python": sys.executable,
              "python_exists": Path(sys.executable).exists()}
    report.update(ports(rank, size, rendezvous))
    gbps, error = nixl_dram_gbps()
    report.update(nixl_gbps=None if gbps is None else round(gbps, 2), nixl_error=error)
    print("HPC_DOCTOR " + json.dumps(report), flush=True)
    # NIXL's agents can crash the interpreter's teardown (seen under srun): the report is out, leave at once.
    os._exit(0)


def problems(reports: list[dict], here_time: float, gpus_per_node: int, nodes: list[str]) -> list[str]:
    """One line per problem, with what to do."""
    out = []
    seen = {r["node"] for r in reports}
    for n in nodes:
        if n not in seen:
            out.append(f"{n}: no report (the step did not run there; `hpc logs` of the doctor step, or srun -w {n} "
                       f"hostname)")
    for r in reports:
        n = r["node"]
        if abs(r["time"] - here_time) > 1.0:
            out.append(f"{n}: clock {r['time'] - here_time:+.1f} s off this host's: leases and traces go wrong; "
                       f"run chrony or ntpd on every node")
        if gpus_per_node and r["gpus"] < gpus_per_node:
            out.append(f"{n}: {r['gpus']} GPUs visible, the plan puts {gpus_per_node} per node: check "
                       f"--gres=gpu:{gpus_per_node} and nvidia-smi on that node")
        if r.get("reached") is False:
            out.append(f"{n}: {r['ports']}: open the head node's ports to the other nodes (firewall) or set "
                       f"HPC_ADVERTISE_HOST to an address they can reach")
        if r.get("reached_back") is False:
            out.append(f"{n}: {r['ports']}: frontends will send its workers' requests through NATS, a hop slower; "
                       f"open this node's ports to the head node (firewall), or set frontend.direct_connections: "
                       f"false")
        if r["nixl_gbps"] is None:
            out.append(f"{n}: NIXL failed ({r['nixl_error']}): install the nixl package in the environment the "
                       f"steps run")
        elif r["nixl_gbps"] < MIN_DRAM_GBPS:
            out.append(f"{n}: NIXL moved DRAM at {r['nixl_gbps']} GB/s: UCX has fallen back to a slow transport; "
                       f"check UCX_TLS and that UCX sees shared memory")
        if not r["cwd_visible"] or not r["python_exists"]:
            out.append(f"{n}: the project directory or {r['python']} is not visible there: put both on a shared "
                       f"filesystem")
    return out


if __name__ == "__main__":
    main()
