"""Several frontend processes on one port.

Python runs one request's work at a time per process; at high concurrency the event loop is the queue. With
`frontend.processes: N` the frontend starts N processes that each bind the public port with SO_REUSEPORT (the
kernel spreads connections over them) and each keep their own discovery watch and NATS connection, so nothing is
shared on the request path.

What an operator reads stays one view: each process also listens on a loopback port of its own, and /stats,
/stats/requests and /metrics, asked of any process, gather every process's share from those ports and merge them
(counters and histograms summed, the last minute's samples pooled). /stats/workers is the same in every process:
each hears every worker's load reports.

The parent process starts the children, prints the ready line once all are ready, forwards SIGTERM, and exits when
any child exits (the launcher's supervisor restarts the frontend as one component)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

READY = "HPC_FRONTEND_READY"
CHILD_READY = "HPC_FRONTEND_CHILD_READY"
PEER_TIMEOUT_S = 2.0


def default_processes() -> int:
    """What the head node's cores allow: a process per 2 cores the step may use (etcd, NATS and the kernel's
    network work need the rest), at least 1, at most 8. A process near a whole core of its own makes every request
    wait for its turns: on a 16-core host 8 processes gave a sooner first token than 4 at concurrency 64, in every
    run (docs/benchmarks.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores // 2))


def reuseport_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host, port))
    s.listen(2048)
    s.set_inheritable(True)
    return s


def run_parent(argv: list[str], n: int, ready_line: str) -> int:
    """Start `n` children (`python -m frontend ARGV --child I --peer-ports ...`), print `ready_line` when all are
    ready, and return the first child's exit code."""
    from hpc.procs import free_port

    peers = [free_port() for _ in range(n)]
    children = [subprocess.Popen([sys.executable, "-m", "frontend", *argv, "--child", str(i),
                                  "--peer-ports", ",".join(map(str, peers))],
                                 stdout=subprocess.PIPE, text=True, bufsize=1) for i in range(n)]
    ready = threading.Semaphore(0)

    def forward(child: subprocess.Popen) -> None:
        for line in child.stdout:
            if line.startswith(CHILD_READY):
                ready.release()
            else:
                sys.stdout.write(line)
                sys.stdout.flush()

    for c in children:
        threading.Thread(target=forward, args=(c,), daemon=True).start()
    stopping = threading.Event()

    def stop(signum, frame):
        stopping.set()
        for c in children:
            if c.poll() is None:
                c.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def announce() -> None:
        for _ in children:
            ready.acquire()
        if not stopping.is_set():
            print(ready_line, flush=True)

    threading.Thread(target=announce, daemon=True).start()
    code = None
    while code is None:  # the first child to end ends the frontend
        for c in children:
            if c.poll() is not None:
                code = c.returncode
                break
        else:
            stopping.wait(0.2)
    stop(None, None)
    for c in children:
        try:
            c.wait(timeout=10)
        except subprocess.TimeoutExpired:
            c.kill()
            c.wait()
    if stopping.is_set() and code in (0, -signal.SIGTERM):
        return 0
    return code if code >= 0 else 128 - code  # killed by a signal: the shell's convention


class Peers:
    """The other processes' loopback ports, and what /stats and /metrics gather from them."""

    def __init__(self, me: int, ports: list[int], api_key: str | None = None):
        self.me, self.ports = me, ports
        self.urls = [f"http://127.0.0.1:{p}" for i, p in enumerate(ports) if i != me]
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}  # for metrics_need_key

    async def gather_json(self, path: str) -> list:
        return [r for r in await self._get_all(path, json=True) if r is not None]

    async def gather_text(self, path: str) -> list[str]:
        return [r for r in await self._get_all(path, json=False) if r is not None]

    async def _get_all(self, path: str, json: bool) -> list:
        timeout = aiohttp.ClientTimeout(total=PEER_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout, headers=self.headers) as session:
            async def one(url):
                try:
                    async with session.get(url + path) as r:
                        return await (r.json() if json else r.text())
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    return None  # a process that is restarting: the view is partial for a moment
            return await asyncio.gather(*(one(u) for u in self.urls))


def merge_metrics(texts: list[str], keep_max: tuple[str, ...] = ("hpc_worker_queue_depth",)) -> str:
    """Prometheus expositions of several processes as one: samples of the same series summed (counters,
    histograms, in-flight gauges), `_created` the earliest, and the gauges in `keep_max` (the same worker report
    every process heard) the largest."""
    families: dict[str, tuple[str, str, dict]] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            _, _, series = families.setdefault(fam.name, (fam.type, fam.documentation, {}))
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                if key not in series:
                    series[key] = s.value
                elif s.name.endswith("_created"):
                    series[key] = min(series[key], s.value)
                elif fam.name in keep_max:
                    series[key] = max(series[key], s.value)
                else:
                    series[key] += s.value
    lines = []
    for name, (kind, doc, series) in families.items():
        lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]
        for (sample, labels), value in series.items():
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            lines.append(f"{sample}{{{label_text}}} {_number(value)}" if labels else f"{sample} {_number(value)}")
    return "\n".join(lines) + "\n"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(v: float) -> str:
    return repr(float(v)) if v != int(v) or abs(v) > 1e15 else f"{int(v)}.0"
