"""etcd and NATS as child processes on free ports, each with its own data directory.

Used by tests, by `hpc serve` and by the head-node step of a Slurm launch."""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from hpc.errors import HpcError
from hpc.runtime.credentials import enable_etcd_auth, nats_config
from hpc.procs import Pid, free_port, spawn, stop, tcp_open, wait_until

MAX_PAYLOAD = 64 << 20  # NATS's hard ceiling; the frontend's request body cap (32 MiB) is below it
PROVIDED_BY = {"etcd": "etcd-server", "nats-server": "nats-server"}


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise HpcError(f"{name} not found on PATH; it comes with the Debian package {PROVIDED_BY.get(name, name)} "
                       f"(`make setup` installs it)")
    return path


@dataclass
class Service:
    name: str
    url: str
    data_dir: Path
    log: Path
    popen: subprocess.Popen = field(repr=False)
    peer_port: int = 0  # etcd's: a restart on the same data directory keeps its member's peer URL

    @property
    def pid(self) -> Pid:
        return Pid.of(self.popen.pid)

    def stop(self) -> bool:
        return stop(Pid.of(self.popen.pid), popen=self.popen)


def _etcd_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
            return b'"health":"true"' in r.read()
    except OSError:
        return False


def start_etcd(data_dir: Path, host: str = "127.0.0.1", port: int = 0, timeout: float = 20,
               advertise: str | None = None, peer_port: int = 0, credentials=None,
               deployment: str | None = None) -> Service:
    """etcd listening on `host` (0.0.0.0 for every interface), reachable by others as `advertise`. With
    `credentials`, authentication is on and the deployment's user reaches /hpc/<deployment>/ only."""
    exe = require_binary("etcd")
    port = port or free_port(host)
    peer = peer_port or free_port(host)
    listen, url = f"http://{host}:{port}", f"http://{advertise or host}:{port}"
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / "etcd.log"
    popen = spawn([exe, "--name", f"hpc-{port}", "--data-dir", str(data_dir / "data"),
                   "--listen-client-urls", listen, "--advertise-client-urls", url,
                   "--listen-peer-urls", f"http://{host}:{peer}",
                   "--initial-advertise-peer-urls", f"http://{advertise or host}:{peer}",
                   "--initial-cluster", f"hpc-{port}=http://{advertise or host}:{peer}",
                   "--log-level", "warn"], log)
    service = Service("etcd", url, data_dir, log, popen, peer)
    try:
        local = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"
        wait_until(lambda: _etcd_healthy(local), timeout, f"etcd on {url}", alive=lambda: popen.poll() is None,
                   log=log)
        if credentials is not None:
            enable_etcd_auth(local, credentials, deployment)
    except BaseException:
        service.stop()
        raise
    return service


def start_nats(data_dir: Path, host: str = "127.0.0.1", port: int = 0, timeout: float = 20,
               advertise: str | None = None, credentials=None) -> Service:
    """nats-server; with `credentials`, only a client with the deployment's user and password connects."""
    exe = require_binary("nats-server")
    port = port or free_port(host)
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / "nats.log"
    # Images travel inside requests (the frontend checked them, up to media.max_file_size_mb): NATS's 1 MiB
    # default payload is too small for them.
    conf = data_dir / "nats.conf"
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the password
    with os.fdopen(fd, "w") as f:
        f.write(f"max_payload: {MAX_PAYLOAD}\n" + nats_config(credentials))
    # SCHED_BATCH: NATS's Go runtime wakes its threads two to three times a request under load; where every core
    # is busy, each of those wake-ups preempted a frontend or worker in the middle of its event-loop turn. Under
    # SCHED_BATCH NATS waits for a free core and forwards what accumulated in one go; its share of the CPU is
    # unchanged (benchmarks/nats_policy.py; docs/benchmarks.md).
    popen = spawn([exe, "-c", str(conf), "-a", host, "-p", str(port), "-js", "-sd", str(data_dir / "jetstream")],
                  log, batch=True)
    service = Service("nats", f"nats://{advertise or host}:{port}", data_dir, log, popen)
    try:
        wait_until(lambda: tcp_open("127.0.0.1" if host == "0.0.0.0" else host, port), timeout, f"nats-server on {host}:{port}",
                   alive=lambda: popen.poll() is None, log=log)
    except BaseException:
        service.stop()
        raise
    return service
