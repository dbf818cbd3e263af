"""The head-node step: etcd and NATS for one deployment. Writes their URLs to STATE_DIR/endpoints.json (a shared
filesystem) and runs until SIGTERM, then stops both by PID.

It keeps both alive: one that exits is started again on the same port (etcd on the same data directory), and the
workers' clients reconnect by themselves. A restarted head step takes the ports of the endpoints file it finds,
so that every component's URLs stay right.

    python -m hpc.head --state-dir DIR"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from hpc.errors import HpcError
from hpc.runtime.credentials import Credentials
from hpc.services import start_etcd, start_nats


def advertise_host() -> str:
    """The address other nodes use to reach this one (HPC_ADVERTISE_HOST overrides the host name)."""
    return os.environ.get("HPC_ADVERTISE_HOST") or socket.gethostname()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m hpc.head", description=__doc__)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--deployment", help="its name: etcd's deployment user reaches /hpc/<name>/ only; without it, "
                                        "etcd and NATS run without authentication")
    a = p.parse_args(argv)
    state = Path(a.state_dir)
    data = Path(os.environ.get("TMPDIR", "/tmp")) / f"hpc-head-{os.getpid()}"  # node-local, like real clusters
    shutil.rmtree(data, ignore_errors=True)  # an earlier head with this PID may have left its etcd (and users)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    host = advertise_host()
    bind = "127.0.0.1" if host in ("127.0.0.1", "localhost") else "0.0.0.0"
    ports = _previous_ports(state / "endpoints.json", host)
    services = {}
    try:
        creds = Credentials.load_or_create(state / "credentials.json", a.deployment) if a.deployment else None
        services["etcd"] = start_etcd(data / "etcd", host=bind, advertise=host, port=ports.get("etcd", 0),
                                      credentials=creds, deployment=a.deployment)
        services["nats"] = start_nats(data / "nats", host=bind, advertise=host, port=ports.get("nats", 0),
                                      credentials=creds)
        endpoints = {"etcd": services["etcd"].url, "nats": services["nats"].url, "host": host, "pid": os.getpid(),
                     "credentials": str((state / "credentials.json").resolve()) if creds else None}
        tmp = state / "endpoints.json.tmp"
        tmp.write_text(json.dumps(endpoints))
        tmp.rename(state / "endpoints.json")
        print(f"HPC_HEAD_READY etcd={endpoints['etcd']} nats={endpoints['nats']}", flush=True)
        while not stop.wait(0.2):
            for name, service in services.items():
                if service.popen.poll() is not None:
                    services[name] = _restart(name, service, data, bind, host, creds, a.deployment)
    except HpcError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        for s in reversed(services.values()):
            s.stop()


def _port(url: str) -> int:
    return urlparse(url).port or 0


def _previous_ports(endpoints: Path, host: str) -> dict[str, int]:
    """The ports of the head step this one replaces (same host), so that URLs the others hold stay right."""
    try:
        old = json.loads(endpoints.read_text())
    except (OSError, ValueError):
        return {}
    if old.get("host") != host:
        return {}
    return {name: _port(old[name]) for name in ("etcd", "nats") if name in old}


def _restart(name: str, service, data: Path, bind: str, host: str, creds, deployment: str | None):
    print(f"HPC_RESTART {name}: exited with code {service.popen.returncode}; starting it again on "
          f"{service.url}", flush=True)
    for attempt in range(20):  # the old process may hold its port for a moment
        try:
            if name == "etcd":
                return start_etcd(data / name, host=bind, advertise=host, port=_port(service.url),
                                  peer_port=service.peer_port, credentials=creds, deployment=deployment)
            return start_nats(data / name, host=bind, advertise=host, port=_port(service.url), credentials=creds)
        except HpcError:
            time.sleep(0.5)
    raise HpcError(f"{name} exited and could not be started again on {service.url}")

if __name__ == "__main__":
    main()
