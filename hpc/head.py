"""The head-node step: etcd and NATS for one deployment. Writes their URLs to STATE_DIR/endpoints.json (a shared
filesystem) and runs until SIGTERM, then stops both by PID.

    python -m hpc.head --state-dir DIR"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from hpc.errors import HpcError
from hpc.services import start_etcd, start_nats


def advertise_host() -> str:
    """The address other nodes use to reach this one (HPC_ADVERTISE_HOST overrides the host name)."""
    return os.environ.get("HPC_ADVERTISE_HOST") or socket.gethostname()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m hpc.head", description=__doc__)
    p.add_argument("--state-dir", required=True)
    a = p.parse_args(argv)
    state = Path(a.state_dir)
    data = Path(os.environ.get("TMPDIR", "/tmp")) / f"hpc-head-{os.getpid()}"  # node-local, like real clusters
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    host = advertise_host()
    bind = "127.0.0.1" if host in ("127.0.0.1", "localhost") else "0.0.0.0"
    services = []
    try:
        services.append(start_etcd(data / "etcd", host=bind, advertise=host))
        services.append(start_nats(data / "nats", host=bind, advertise=host))
        endpoints = {"etcd": services[0].url, "nats": services[1].url, "host": host, "pid": os.getpid()}
        tmp = state / "endpoints.json.tmp"
        tmp.write_text(json.dumps(endpoints))
        tmp.rename(state / "endpoints.json")
        print(f"HPC_HEAD_READY etcd={endpoints['etcd']} nats={endpoints['nats']}", flush=True)
        stop.wait()
    except HpcError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        for s in reversed(services):
            s.stop()


if __name__ == "__main__":
    main()
