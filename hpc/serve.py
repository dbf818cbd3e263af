"""`hpc serve CONFIG`: a deployment on this machine with no Slurm: etcd, NATS, the workers and the frontend as
local processes. Every process is started here and stopped here, by PID."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from hpc.config import Deployment
from hpc.errors import HpcError
from hpc.runtime.credentials import Credentials
from hpc.plan import uses_gpus
from hpc.procs import Pid, free_port, http_ok, log_tail, spawn, stop
from hpc.services import Service, start_etcd, start_nats


@dataclass
class Component:
    name: str
    popen: subprocess.Popen | None = None
    log: Path | None = None
    ready_after: float | None = None
    detail: str = ""


@dataclass
class LocalDeployment:
    dep: Deployment
    state_dir: Path
    port: int = 0
    host: str = "127.0.0.1"
    lease_ttl: int = 5
    # GPUs for the workers that use one, handed out in turn, one per worker (CUDA_VISIBLE_DEVICES); empty: every
    # worker sees what this process sees.
    gpus: tuple[str, ...] = ()
    etcd: Service | None = None
    nats: Service | None = None
    components: list[Component] = field(default_factory=list)
    credentials: Credentials | None = None  # the deployment's, generated at start (state_dir/credentials.json)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def model_path(self) -> str:
        return str(Path(self.dep.model.path).expanduser().resolve())

    @property
    def owner_file(self) -> Path:
        return self.state_dir / "serve.json"

    def already_running(self) -> str | None:
        """Who serves this deployment from this state directory now, if anyone (a second one would wait behind
        etcd's data-directory lock)."""
        try:
            owner = json.loads(self.owner_file.read_text())
        except (OSError, ValueError):
            return None
        if Pid(owner["pid"], owner["start"]).alive():
            return (f"deployment {self.dep.name} is already served from {self.state_dir} by PID {owner['pid']} at "
                    f"{owner['url']}: stop it first (Ctrl-C in its terminal, or kill {owner['pid']})")
        return None

    def start(self, on_ready: Callable[[Component], None] = lambda c: None, timeout: float = 120) -> None:
        running = self.already_running()
        if running:
            raise HpcError(running)
        t0 = time.monotonic()
        try:
            self._start(on_ready, t0, timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, on_ready, t0: float, timeout: float) -> None:
        dep, logs = self.dep, self.state_dir / "logs"
        if not Path(self.model_path(), "config.json").exists():
            raise HpcError(f"model.path {dep.model.path}: no config.json there (expected a Hugging Face model "
                           f"directory)")
        shutil.rmtree(self.state_dir / "etcd", ignore_errors=True)  # users and keys of an earlier run go too
        self.credentials = Credentials.generate(dep.name)
        secrets = self.state_dir / "credentials.json"
        self.credentials.save(secrets)
        self.port = self.port or free_port()
        me = Pid.of(os.getpid())
        self.owner_file.write_text(json.dumps({"pid": me.pid, "start": me.start, "url": self.url}))
        self.etcd = start_etcd(self.state_dir / "etcd", credentials=self.credentials, deployment=dep.name)
        on_ready(Component("etcd", ready_after=time.monotonic() - t0, detail=self.etcd.url))
        self.nats = start_nats(self.state_dir / "nats", credentials=self.credentials)
        on_ready(Component("nats", ready_after=time.monotonic() - t0, detail=self.nats.url))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HPC_ETCD": self.etcd.url, "HPC_NATS": self.nats.url,
               "HPC_CREDENTIALS": str(secrets.resolve())}
        env.setdefault("OMP_NUM_THREADS", "1")
        pending = []
        gpu_turn = 0
        for role, spec in dep.workers.items():
            if self.gpus and uses_gpus(dep, role) and spec.gpus_per_worker > 1:
                raise HpcError(f"workers.{role}: hpc serve gives each worker one GPU; tensor_parallel_size "
                               f"{spec.tensor_parallel_size} needs a launch with several ranks")
            for i in range(spec.replicas):
                worker_env = dict(spec.env)
                if self.gpus and uses_gpus(dep, role):
                    worker_env["CUDA_VISIBLE_DEVICES"] = self.gpus[gpu_turn % len(self.gpus)]
                    gpu_turn += 1
                name = f"{role}/{i}"
                argv = [sys.executable, "-m", "workers", "--config", str(dep.source), "--role", role,
                        "--model", self.model_path(), "--worker-id", f"{role}-{i}", "--lease-ttl",
                        str(self.lease_ttl)]
                c = Component(name, log=logs / f"{role}-{i}.log")
                c.popen = spawn(argv, c.log, env={**env, **worker_env})
                self.components.append(c)
                pending.append(c)
        self.port = self.port or free_port()
        fe = Component("frontend", log=logs / "frontend.log", detail=self.url)
        fe.popen = spawn([sys.executable, "-m", "frontend", "--deployment", dep.name, "--host", self.host,
                          "--port", str(self.port), "--router", dep.frontend.router, "--model", dep.model.name,
                          "--request-timeout", str(dep.frontend.request_timeout_s), "--config", str(dep.source)],
                         fe.log, env=env)
        self.components.append(fe)
        pending.append(fe)
        deadline = t0 + timeout
        while pending:
            for c in list(pending):
                if c.popen.poll() is not None:
                    raise HpcError(f"{c.name} exited with code {c.popen.returncode}. Log {c.log}:\n"
                                   f"{log_tail(c.log, 20)}")
                marker = "HPC_FRONTEND_READY" if c.name == "frontend" else "HPC_WORKER_READY"
                if c.log.exists() and marker in c.log.read_text(errors="replace"):
                    c.ready_after = time.monotonic() - t0
                    pending.remove(c)
                    on_ready(c)
            if time.monotonic() > deadline:
                raise HpcError(f"not ready after {timeout:.0f} s: {', '.join(c.name for c in pending)}; logs in "
                               f"{logs}")
            time.sleep(0.05)
        while not self.healthy():  # every model has a complete path
            if time.monotonic() > deadline:
                raise HpcError(f"{self.url}/health not ready after {timeout:.0f} s")
            time.sleep(0.05)

    def healthy(self) -> bool:
        return http_ok(f"{self.url}/health")

    def stop(self) -> list[str]:
        """Frontend first (no new requests), then workers (they drain), then NATS and etcd. Returns what would
        not stop."""
        stuck = []
        for c in reversed(self.components):
            if c.popen is not None and not stop(Pid.of(c.popen.pid), timeout=15, popen=c.popen):
                stuck.append(c.name)
        self.components.clear()
        for s in (self.nats, self.etcd):
            if s is not None and not s.stop():
                stuck.append(s.name)
        self.nats = self.etcd = None
        if not stuck:
            self.owner_file.unlink(missing_ok=True)
        return stuck

    def client(self, **kwargs):
        """A ServingClient of this deployment, with its credentials."""
        from hpc.runtime.client import ServingClient

        return ServingClient(self.dep.name, self.etcd.url, self.nats.url, credentials=self.credentials, **kwargs)
