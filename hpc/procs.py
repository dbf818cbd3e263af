"""Starting and stopping the processes we own, by PID, with logs; free ports; readiness waits."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from hpc.errors import HpcError


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel says is free now; every fake node shares 127.0.0.1, so nothing may assume fixed ports."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _start_time(pid: int) -> int | None:
    """The process start time in clock ticks (field 22 of /proc/PID/stat): tells a PID from its reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":  # a zombie has finished; its parent just has not reaped it yet
        return None
    return int(fields[19])


@dataclass(frozen=True)
class Pid:
    """A PID together with its start time, so we never signal a process that merely reused the number."""

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> "Pid":
        return cls(pid, _start_time(pid) or 0)

    def alive(self) -> bool:
        return _start_time(self.pid) == self.start

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"pid": self.pid, "start": self.start}))

    @classmethod
    def load(cls, path: Path) -> "Pid | None":
        try:
            data = json.loads(path.read_text())
            return cls(int(data["pid"]), int(data["start"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None


def spawn(argv: Sequence[str], log: Path, env: dict | None = None, cwd: Path | None = None,
          batch: bool = False) -> subprocess.Popen:
    """Start a process in its own session (it outlives us if asked to), output appended to `log`. With `batch`,
    it and all its threads run under Linux's SCHED_BATCH policy (see `batch_policy`)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out, batch_policy(batch):
        try:
            return subprocess.Popen(
                list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, cwd=cwd, start_new_session=True,
            )
        except FileNotFoundError as e:
            raise HpcError(f"cannot start {argv[0]}: {e.strerror}") from None


@contextmanager
def batch_policy(enabled: bool = True):
    """The calling thread under SCHED_BATCH while the block runs, so that a process started in it inherits the
    policy (for every thread it will have). SCHED_BATCH is SCHED_OTHER with the same share of the CPU, except
    that its wake-ups never preempt a running task (sched(7)): a server that wakes for every message waits for a
    core to come free instead of cutting another process's turn short. Needs no privilege; where it is refused
    or missing the block runs with the policy unchanged."""
    before = None
    if enabled:
        try:
            before = os.sched_getscheduler(0), os.sched_getparam(0)
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        except (AttributeError, OSError):
            before = None
    try:
        yield
    finally:
        if before:
            os.sched_setscheduler(0, *before)


def stop(pid: Pid, timeout: float = 10.0, popen: subprocess.Popen | None = None) -> bool:
    """SIGTERM, wait up to `timeout`, then SIGKILL. True when the process is gone."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if not pid.alive():
            break
        try:
            os.kill(pid.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if popen is not None:
                try:
                    popen.wait(timeout=0.05)
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(0.05)
            if not pid.alive():
                break
    if popen is not None and popen.poll() is None:
        popen.wait(timeout=1)
    return not pid.alive()


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_until(check: Callable[[], bool], timeout: float, what: str, alive: Callable[[], bool] | None = None,
               log: Path | None = None, interval: float = 0.1) -> None:
    """Poll `check` until true. Fails early if the process died, and with the log's tail either way."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if alive is not None and not alive():
            raise HpcError(f"{what}: the process exited while starting. Log {log}:\n{log_tail(log) if log else ''}")
        time.sleep(interval)
    raise HpcError(f"{what}: not ready after {timeout:.0f} s. Log {log}:\n{log_tail(log) if log else ''}")


def tcp_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when GET url answers 200 within the timeout (a readiness probe, e.g. a frontend's /health)."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False
