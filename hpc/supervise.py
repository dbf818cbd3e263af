"""Keeps a launched deployment running: a step that exits, or a worker missing from etcd while its step runs, is
started again with the same command line in the same allocation (backoff, at most `restart.max` times per window);
one that keeps failing is given up with its log's tail. Every restart is logged with its cause in the run folder's
restarts.log and counted in the state `hpc status` reads.

The supervisor is the `hpc launch` process itself (interactive, and under `hpc submit`), or, with `--detach`, this
module in a process of its own:  python -m hpc.supervise DEPLOYMENT"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from hpc.errors import HpcError
from hpc.launch import LaunchState, locked_state, spawn_step
from hpc.procs import Pid, log_tail
from hpc.slurm import commands

REGISTRATION_CHECK_S = 2.0  # etcd is asked this often which workers are registered
MAX_BACKOFF_S = 30.0


class Supervisor:
    def __init__(self, deployment: str, env: dict | None = None, say=print):
        self.deployment = deployment
        self.env = dict(env if env is not None else os.environ)
        self.say = say
        self.children: list[subprocess.Popen] = []  # steps this process started again: reaped as they end
        self.next_registration_check = 0.0
        self.registered: set[str] | None = None

    def claim(self) -> None:
        """Record this process as the deployment's supervisor (`hpc stop` stops it first)."""
        with locked_state(self.deployment) as state:
            me = Pid.of(os.getpid())
            state.supervisor = {"pid": me.pid, "start": me.start, "host": socket.gethostname()}

    def run(self, interval: float = 0.25) -> None:
        """Until interrupted (KeyboardInterrupt, or a signal handler that raises)."""
        self.claim()
        while True:
            time.sleep(interval)
            self.tick()

    def tick(self) -> None:
        self.children = [p for p in self.children if p.poll() is None]
        now = time.time()
        if now >= self.next_registration_check:
            self.next_registration_check = now + REGISTRATION_CHECK_S
            self.registered = self._registered()
        with locked_state(self.deployment) as state:
            policy = state.restart or {"max": 0}
            for name, info in state.steps.items():
                if info.get("retiring") or info.get("given_up") or "argv" not in info:
                    continue
                self._check(state, name, info, policy, now)

    def _check(self, state: LaunchState, name: str, info: dict, policy: dict, now: float) -> None:
        alive = Pid(info["pid"], info.get("start", 0)).alive()
        if alive and info.get("role") and self.registered is not None:
            if name in self.registered:
                info["seen_registered"] = True
                info.pop("missing_since", None)
            elif info.get("seen_registered"):
                info.setdefault("missing_since", now)
                if now - info["missing_since"] > policy.get("unregistered_s", 20):
                    self._log(state, f"{name}: not registered in etcd for {now - info['missing_since']:.0f} s "
                                     f"while its step runs; cancelling the step")
                    info["cause"] = "left etcd while its step ran"
                    self._cancel(name)
                    info.pop("missing_since", None)
        if alive:
            info.pop("dead_since", None)
            return
        if "dead_since" not in info:
            info["dead_since"] = now
            info.setdefault("cause", f"its step ended ({_last_words(Path(info['log']))})")
            self._log(state, f"{name}: {info['cause']}")
            if info.get("role") and state.endpoints:  # its registration goes now, not at the end of its lease
                asyncio.run(forget_worker(state.deployment, state.endpoints["etcd"], info["role"], name,
                                          credentials_of(state)))
        recent = [r for r in info.get("restarts", []) if now - r["time"] < policy.get("window_s", 600)]
        if len(recent) >= policy.get("max", 0):
            info["given_up"] = (f"{len(recent)} restarts in {policy.get('window_s', 600):g} s"
                                if recent else "restarts are off (restart.max: 0)")
            info["tail"] = log_tail(Path(info["log"]), 10)
            self._log(state, f"{name}: given up: {info['given_up']}; last log lines:\n{info['tail']}")
            return
        backoff = min(MAX_BACKOFF_S, policy.get("backoff_s", 1.0) * 2 ** len(recent))
        if now - info["dead_since"] < backoff:
            return
        cause = info.pop("cause")
        number = len(info.get("restarts", [])) + 1
        popen = spawn_step(info["argv"], info["env"], Path(info["log"]), header=f"restart {number}: {cause}")
        self.children.append(popen)
        info.update(pid=popen.pid, start=Pid.of(popen.pid).start, seen_registered=False)
        info.pop("dead_since", None)
        info.setdefault("restarts", []).append({"time": now, "cause": cause})
        self._log(state, f"{name}: started again (restart {number}, after {backoff:g} s)")

    def _cancel(self, name: str) -> None:
        state = LaunchState.load(self.deployment)
        try:
            sid = commands.job_steps(state.job_id, self.env).get(f"hpc.{self.deployment}.{name}")
            if sid:
                commands.scancel([sid], self.env, signal="KILL")
        except HpcError as e:
            self.say(f"cannot cancel {name}: {e}")

    def _registered(self) -> set[str] | None:
        try:
            state = LaunchState.load(self.deployment)
        except HpcError:
            return None
        if not state.endpoints:
            return None
        return asyncio.run(registered_workers(state.deployment, state.endpoints["etcd"], credentials_of(state)))

    def _log(self, state: LaunchState, line: str) -> None:
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}"
        self.say(stamped)
        if state.run_dir:
            with open(Path(state.run_dir) / "restarts.log", "a") as f:
                f.write(stamped + "\n")


def _last_words(log: Path) -> str:
    lines = [line for line in log_tail(log, 5).splitlines() if line.strip()]
    return lines[-1][-200:] if lines else "no output"


def credentials_of(state: LaunchState):
    """The deployment's credentials (None for services without authentication)."""
    from hpc.runtime.credentials import Credentials

    path = (state.endpoints or {}).get("credentials")
    return Credentials.load(path) if path else None


async def registered_workers(deployment: str, etcd_url: str, credentials=None) -> set[str] | None:
    """The worker ids registered in etcd now; None when etcd does not answer (then nothing is concluded)."""
    from hpc.runtime import discovery
    from hpc.runtime.discovery import WorkerDirectory
    from hpc.runtime.protocol import Keys

    try:
        client = await discovery.connect(etcd_url, timeout=2, credentials=credentials, deployment=deployment)
    except HpcError:
        return None
    try:
        d = WorkerDirectory(client, Keys(deployment).workers)
        await asyncio.wait_for(d.refresh(), 3)
        return {w.worker_id for w in d.workers.values()}
    except Exception:
        return None
    finally:
        try:
            await asyncio.wait_for(client.close(), 3)
        except Exception:
            pass


async def forget_worker(deployment: str, etcd_url: str, role: str, worker_id: str, credentials=None) -> None:
    """End a dead worker's lease: its keys go, and every watcher (frontends, status) hears it at once."""
    from hpc.runtime import discovery
    from hpc.runtime.protocol import Keys

    try:
        client = await discovery.connect(etcd_url, timeout=2, credentials=credentials, deployment=deployment)
    except HpcError:
        return
    try:
        kv = await asyncio.wait_for(client.get(Keys(deployment).worker(role, worker_id).encode()), 3)
        if kv is not None and kv.lease:
            await asyncio.wait_for(client.revoke_lease(kv.lease), 3)
    except Exception:
        pass  # the lease ends by itself
    finally:
        try:
            await asyncio.wait_for(client.close(), 3)
        except Exception:
            pass


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m hpc.supervise", description=__doc__)
    p.add_argument("deployment")
    a = p.parse_args(argv)

    def leave(*_):  # `hpc stop` stops us first, then the steps
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGINT, leave)
    try:
        Supervisor(a.deployment, say=lambda line: print(line, flush=True)).run()
    except HpcError as e:  # the state is gone: the deployment was stopped
        print(f"supervisor ends: {e}", flush=True)


if __name__ == "__main__":
    main()
