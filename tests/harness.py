"""Starting real worker processes for tests, and stopping them by PID."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from hpc.procs import Pid, log_tail, stop

REPO = Path(__file__).resolve().parent.parent
ENGINE_YAML = REPO / "configs" / "engines" / "tiny" / "torch.yaml"
MOCKER_YAML = REPO / "configs" / "engines" / "tiny" / "mocker.yaml"


class WorkerProc:
    def __init__(self, popen: subprocess.Popen, log: Path, worker_id: str):
        self.popen, self.log, self.worker_id = popen, log, worker_id

    def wait_ready(self, timeout: float = 60) -> "WorkerProc":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if f"HPC_WORKER_READY {self.worker_id}" in self.log.read_text(errors="replace"):
                return self
            if self.popen.poll() is not None:
                raise RuntimeError(f"worker {self.worker_id} exited {self.popen.returncode}:\n{log_tail(self.log, 40)}")
            time.sleep(0.05)
        raise RuntimeError(f"worker {self.worker_id} not ready after {timeout} s:\n{log_tail(self.log, 40)}")

    def stop(self) -> bool:
        return stop(Pid.of(self.popen.pid), timeout=15, popen=self.popen)

    def kill(self) -> None:
        self.popen.kill()
        self.popen.wait(timeout=10)


def start_worker(log_dir: Path, role: str, model: Path, etcd: str, nats: str, deployment: str,
                 engine: str = "torch", engine_config: Path = ENGINE_YAML, worker_id: str | None = None,
                 extra: list[str] = (), served_name: str = "tiny-llama") -> WorkerProc:
    worker_id = worker_id or f"{role}-{os.urandom(3).hex()}"
    log = log_dir / f"{worker_id}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "workers", "--role", role, "--engine", engine, "--deployment", deployment,
            "--model", str(model), "--served-name", served_name, "--engine-config", str(engine_config),
            "--etcd", etcd, "--nats", nats, "--worker-id", worker_id, "--lease-ttl", "2", *extra]
    if "--credentials" not in extra:
        argv.append("--insecure")
    with open(log, "wb") as out:
        popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    return WorkerProc(popen, log, worker_id)


HPC = [sys.executable, "-m", "hpc"]


def config_variant(source: str, name: str, out_dir: Path, extra: str = "") -> Path:
    """configs/SOURCE.yaml renamed NAME, written to OUT_DIR (its engine YAMLs by absolute path), with EXTRA YAML
    appended."""
    text = (REPO / "configs" / f"{source}.yaml").read_text().replace(f"name: {source}", f"name: {name}")
    path = out_dir / f"{name}.yaml"
    path.write_text(text.replace("engines/tiny/", f"{REPO}/configs/engines/tiny/") + extra)
    return path


def hpc(args: list[str], env: dict, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
    """The `hpc` CLI as a user runs it, from the repository root."""
    out = subprocess.run(HPC + args, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check:
        assert out.returncode == 0, f"hpc {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
    return out


def squeue(env: dict, steps: bool = False) -> list[str]:
    out = subprocess.run(["squeue", "-h"] + (["--steps"] if steps else []), env=env, capture_output=True,
                         text=True, timeout=10)
    return out.stdout.split("\n")[:-1]
