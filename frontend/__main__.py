"""python -m frontend --deployment NAME --etcd URL --nats URL [--host H --port P --router POLICY --model NAME]"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys

import uvicorn

from frontend.app import Frontend, create_app
from frontend.http_protocol import HttpProtocol
from frontend.processes import CHILD_READY, READY, Peers, default_processes, reuseport_socket, run_parent
from hpc.errors import HpcError
from hpc.procs import free_port


async def check_services(etcd: str, nats_url: str, credentials, deployment: str) -> None:
    from hpc.runtime import discovery
    from hpc.runtime.messaging import Bus

    client = await discovery.connect(etcd, timeout=5, credentials=credentials, deployment=deployment)
    await client.close()
    bus = await Bus.connect(nats_url, "frontend-check", timeout=5, credentials=credentials)
    await bus.close()


def api_keys_from_file(path: str | None) -> list[str]:
    if not path:
        return []
    try:
        return [line.strip() for line in open(path) if line.strip() and not line.startswith("#")]
    except OSError as e:
        raise HpcError(f"frontend.api_key_file {path}: {e.strerror}") from None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m frontend", description=__doc__)
    p.add_argument("--deployment", required=True)
    p.add_argument("--etcd", default=os.environ.get("HPC_ETCD"), help="etcd URL (env HPC_ETCD)")
    p.add_argument("--nats", default=os.environ.get("HPC_NATS"), help="NATS URL (env HPC_NATS)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000, help="0: a free port")
    p.add_argument("--router", default="round-robin", choices=["round-robin", "least-loaded", "kv-aware"])
    p.add_argument("--model", action="append", default=[], help="a model this deployment serves (for /health "
                                                                 "and 503 before its workers register)")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--config", help="deployment YAML: its media limits (ALLOWED_LOCAL_MEDIA_PATH and "
                                    "MAX_FILE_SIZE_MB override them)")
    p.add_argument("--credentials", default=os.environ.get("HPC_CREDENTIALS"),
                   help="the deployment's credentials file (env HPC_CREDENTIALS; written by the head step)")
    p.add_argument("--insecure", action="store_true", help="etcd and NATS without credentials")
    p.add_argument("--trace-file", default=os.environ.get("HPC_TRACE_FILE"),
                   help="append each request's stages here as JSONL (env HPC_TRACE_FILE)")
    p.add_argument("--processes", type=int, help="frontend processes on the port (default: frontend.processes of "
                                                  "--config, else one per 2 cores, at most 8)")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)  # set by the parent of several processes
    p.add_argument("--peer-ports", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.processes is not None and a.processes < 1:
        p.error(f"--processes {a.processes}: expected 1 or more")
    if not a.etcd or not a.nats:
        p.error("--etcd and --nats are required (or HPC_ETCD and HPC_NATS)")
    logging.basicConfig(level=os.environ.get("HPC_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:  # fail with one clear line, before uvicorn, when a service is unreachable
        from hpc.runtime.credentials import Credentials

        if not a.credentials and not a.insecure:
            raise HpcError("no credentials for etcd and NATS: give --credentials FILE (HPC_CREDENTIALS), or "
                           "--insecure for services that run without authentication")
        credentials = Credentials.load(a.credentials) if a.credentials else None
        asyncio.run(check_services(a.etcd, a.nats, credentials, a.deployment))
    except HpcError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    from frontend.media import MediaPolicy

    keys, metrics_need_key = [k.strip() for k in os.environ.get("HPC_API_KEY", "").split(",") if k.strip()], False
    processes = a.processes
    direct = True
    try:
        if a.config:
            from hpc.config import load_deployment

            dep = load_deployment(a.config, check_files=False)
            policy = MediaPolicy.from_config(dep.media)
            keys += dep.frontend.api_keys + api_keys_from_file(dep.frontend.api_key_file)
            metrics_need_key = dep.frontend.metrics_need_key
            processes = processes or dep.frontend.processes
            direct = dep.frontend.direct_connections
        else:
            from hpc.config import Media

            policy = MediaPolicy.from_config(Media())
    except HpcError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    port = a.port or free_port()
    shown = a.host if a.host not in ("0.0.0.0", "::") else (os.environ.get("HPC_ADVERTISE_HOST")
                                                             or socket.gethostname())
    ready_line = f"{READY} http://{shown}:{port}"
    processes = processes or default_processes()
    if a.child is None and processes > 1:  # this process starts the others and waits
        raw = list(argv if argv is not None else sys.argv[1:])
        sys.exit(run_parent(raw + ["--port", str(port)], processes, ready_line))
    fe = Frontend(a.deployment, a.etcd, a.nats, a.router, a.model, a.request_timeout, policy,
                  a.trace_file, credentials, direct)
    fe.set_api_keys(keys, metrics_need_key)
    sockets = None
    if a.child is not None:
        ports = [int(x) for x in a.peer_ports.split(",")]
        fe.peers = Peers(a.child, ports, keys[0] if keys else None)
        sockets = [reuseport_socket(a.host, port), reuseport_socket("127.0.0.1", ports[a.child])]
        ready_line = CHILD_READY
    app = create_app(fe, on_ready=lambda: print(ready_line, flush=True))
    try:
        # uvloop and httptools (HttpProtocol: an event stream's head leaves with its first chunk); no access log,
        # proxy-header rewriting or server header: work per request that nothing here reads.
        config = uvicorn.Config(app, host=a.host, port=port, log_level="warning", loop="uvloop", http=HttpProtocol,
                                access_log=False, proxy_headers=False, server_header=False,
                                timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=sockets)
    except SystemExit as e:
        sys.exit(e.code)
    except OSError as e:  # the port is taken, most often
        print(f"error: frontend on {a.host}:{port}: {e.strerror}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
