"""Runs a Plan inside a Slurm allocation: one srun step per component, readiness in order (etcd and NATS,
frontend, every worker registered, the model served), a state file, logs per component; on stop, exactly its own
steps are cancelled (scancel JOB.STEP) and, if it asked for the allocation, the allocation too."""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from hpc.config import Deployment
from hpc.errors import HpcError
from hpc.plan import Allocation, Plan, Step
from hpc.procs import Pid, http_ok, log_tail, stop
from hpc.slurm import commands

STATE_ROOT = Path(".hpc")


@dataclass
class LaunchState:
    deployment: str
    config: str
    job_id: str | None
    created_allocation: bool
    nodes: list[str]
    state_dir: str
    gpus_per_node: int = 0
    endpoints: dict = field(default_factory=dict)
    frontend_url: str | None = None
    # name -> {"nodes", "role", "ntasks", "log", "pid", "start", "argv", "env", "restarts", ...}: what runs, and
    # how to run it again (the supervisor restarts a step with the same command line)
    steps: dict = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    ready_after: float | None = None
    run_dir: str = ""  # runs/<deployment>-<job or time>/: config, script, plan, logs, restarts, benchmarks
    supervisor: dict = field(default_factory=dict)  # {"pid", "start", "host"} of the process that restarts steps
    restart: dict = field(default_factory=dict)  # the deployment's restart policy

    @staticmethod
    def path(deployment: str) -> Path:
        return STATE_ROOT / f"{deployment}.json"

    def save(self) -> None:
        p = self.path(self.deployment)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".json.tmp")  # readers never see half a file
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.rename(p)

    @classmethod
    def load(cls, deployment: str | None) -> "LaunchState":
        if deployment is None:
            files = sorted(STATE_ROOT.glob("*.json"), key=lambda p: p.stat().st_mtime)
            if not files:
                raise HpcError(f"no deployment launched from here (no state in {STATE_ROOT}/)")
            path = files[-1]
        else:
            path = cls.path(deployment)
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise HpcError(f"no deployment {deployment!r} launched from here ({path} not found)") from None


@contextmanager
def locked_state(deployment: str) -> Iterator[LaunchState]:
    """Read, change and write the state under a lock: the supervisor, `hpc scale` and `hpc stop` all write it."""
    STATE_ROOT.mkdir(parents=True, exist_ok=True)
    with open(STATE_ROOT / f"{deployment}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = LaunchState.load(deployment)
        before = json.dumps(asdict(state))
        yield state
        if json.dumps(asdict(state)) != before:  # unchanged: untouched, so "the latest deployment" stays right
            state.save()


def spawn_step(argv: list[str], env: dict, log: Path, header: str | None = None) -> subprocess.Popen:
    """Start one srun step with its output in `log`: a fresh log, or appended after `header` (a restart)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab" if header else "wb") as out:
        if header:
            out.write(f"\n--- {header} ---\n".encode())
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **env}, start_new_session=True)


def run_folder(dep_name: str, job_id: str | None, root: Path = Path("runs")) -> Path:
    """runs/<deployment>-<job>/ (or -<date-time> outside Slurm), never reused."""
    base = root / f"{dep_name}-{job_id or time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}.{n}")
    return path


def current_allocation(env: dict, gpus_per_node: int | None) -> Allocation | None:
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    nodes = commands.expand_hostnames(env["SLURM_JOB_NODELIST"], env=env)
    return Allocation(job, tuple(nodes), gpus_per_node if gpus_per_node is not None else _gpus_from_env(env))


def _gpus_from_env(env: dict) -> int:
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = env.get(key, "")
        if value.split(":")[-1].isdigit():
            return int(value.split(":")[-1])
    return 0


def request_allocation(name: str, nodes: int, gpus_per_node: int | None, time_limit: str | None,
                       partition: str | None, account: str | None, env: dict,
                       waiting: Callable[[str], None] = lambda s: None) -> Allocation:
    """salloc --no-shell: returns once the allocation is granted, however long the queue takes (as salloc does;
    Ctrl-C reaches salloc too, which then withdraws the request). `waiting` hears when the job is queued."""
    argv = ["salloc", "--no-shell", f"--nodes={nodes}", f"--job-name=hpc.{name}"]
    if gpus_per_node:
        argv.append(f"--gres=gpu:{gpus_per_node}")
    for flag, value in (("--time", time_limit), ("--partition", partition), ("--account", account)):
        if value:
            argv.append(f"{flag}={value}")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    job_id, lines = None, []
    for line in proc.stdout:  # salloc reports "Pending job allocation N", then "Granted job allocation N"
        lines.append(line.strip())
        m = re.search(r"job allocation (\d+)", line)
        if m:
            job_id = m.group(1)
            if "Pending" in line or "queued" in line:
                waiting(f"job {job_id} is waiting in the queue")
    if proc.wait() != 0 or job_id is None:
        raise HpcError(f"salloc failed: {' '.join(lines) or 'no output'}")
    nodelist = commands.run(["squeue", "-h", f"--jobs={job_id}", "-o", "%N"], env=env).strip()
    return Allocation(job_id, tuple(commands.expand_hostnames(nodelist, env=env)), gpus_per_node or 0, created=True)


class Launcher:
    def __init__(self, dep: Deployment, plan: Plan, env: dict | None = None, python: str = sys.executable,
                 state: LaunchState | None = None, run_dir: Path | None = None):
        self.dep, self.plan = dep, plan
        self.env = dict(env if env is not None else os.environ)
        self.python = python if dep.container is None else "python3"
        self.state_dir = (STATE_ROOT / dep.name).resolve()
        # A submitted job (hpc submit) is ours to end: `hpc stop` then cancels the whole job.
        ours = plan.allocation.created or self.env.get("HPC_SUBMITTED") == "1"
        if state is None:
            run = (run_dir or run_folder(dep.name, plan.allocation.job_id)).resolve()
            state = LaunchState(dep.name, plan.config, plan.allocation.job_id, ours, list(plan.allocation.nodes),
                                str(self.state_dir), plan.allocation.gpus_per_node, run_dir=str(run),
                                restart=dep.restart.model_dump())
        self.state = state
        self.run_dir = Path(self.state.run_dir or self.state_dir)
        self.popens: dict[str, subprocess.Popen] = {}

    def _spawn(self, step: Step, extra_env: dict) -> None:
        log = self.run_dir / "logs" / f"{step.name}.log"
        argv = commands.srun_argv(step, self.plan.allocation.job_id, self.python, self.dep.name, self.dep.container)
        # What differs from this environment: kept in the state, so the supervisor starts the step the same way.
        env = {**self.env, **extra_env, **commands.step_env(step)}
        if self.dep.container:
            env.update(self.dep.container.env)
        env = {k: v for k, v in env.items() if os.environ.get(k) != v}
        popen = spawn_step(argv, env, log)  # fresh: readiness is read from this log
        self.popens[step.name] = popen
        info = {"nodes": list(step.nodes), "pid": popen.pid, "start": Pid.of(popen.pid).start, "log": str(log),
                "role": step.role, "ntasks": step.ntasks, "argv": argv, "env": env, "restarts": []}
        self.state.steps[step.name] = info
        if self.state.path(self.dep.name).exists():
            with locked_state(self.dep.name) as fresh:  # a supervisor may be writing too
                fresh.steps[step.name] = info
        else:
            self.state.save()

    def record_run(self, config_text: str, script: str) -> None:
        """The run folder: what was launched (resolved config, engine YAMLs, script, plan), before it starts."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(config_text)
        for role, spec in self.dep.workers.items():
            if spec.engine_config:
                source = Path(self.plan.config).parent / spec.engine_config
                if source.is_file():
                    (self.run_dir / "engines").mkdir(exist_ok=True)
                    (self.run_dir / "engines" / f"{role}.yaml").write_text(source.read_text())
        (self.run_dir / "script.sh").write_text(script)
        (self.run_dir / "plan.json").write_text(json.dumps(asdict(self.plan), indent=2, default=str))
        (self.run_dir / "run.json").write_text(json.dumps(
            {"deployment": self.dep.name, "config": self.plan.config, "job_id": self.plan.allocation.job_id,
             "nodes": list(self.plan.allocation.nodes), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
             "command": " ".join(["hpc", *sys.argv[1:]])}, indent=2))

    def _wait(self, name: str, check: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        log = Path(self.state.steps[name]["log"])
        while not check():
            # A component that gives up says why in one `error:` line, and that ends the wait at once: the step
            # itself may linger (other MPI ranks of a TensorRT-LLM worker wait until srun ends them).
            error = _error_line(log)
            if error:
                raise HpcError(f"{name} failed: {error} (log {log})")
            popen = self.popens[name]
            if popen.poll() is not None:
                raise HpcError(f"{name} exited (srun code {popen.returncode}). Log {log}:\n{log_tail(log, 25)}")
            if time.monotonic() > deadline:
                raise HpcError(f"{name}: not ready after {timeout:.0f} s; log {log}")
            time.sleep(0.1)

    def start(self, on_ready: Callable[[str, str, float], None] = lambda *a: None, timeout: float = 600) -> None:
        if self.dep.container and not commands.srun_supports_containers(self.env):
            raise HpcError("container.image is set but this srun has no --container-image (install the pyxis "
                           "plugin, or remove `container` from the config)")
        t0 = time.monotonic()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "endpoints.json").unlink(missing_ok=True)
        (self.state_dir / "credentials.json").unlink(missing_ok=True)  # new secrets for every launch
        self.state.save()
        head = self.plan.step("head")
        self._spawn(head, {})
        endpoints = self.state_dir / "endpoints.json"
        self._wait("head", endpoints.exists, 60)
        self.state.endpoints = json.loads(endpoints.read_text())
        on_ready("etcd", f"{head.nodes[0]}  {self.state.endpoints['etcd']}", time.monotonic() - t0)
        on_ready("nats", f"{head.nodes[0]}  {self.state.endpoints['nats']}", time.monotonic() - t0)
        services = self.services()
        self._spawn(self.plan.step("frontend"), {**services, "HPC_TRACE_FILE": str(self.run_dir / "trace.jsonl")})
        for step in self.plan.workers():  # workers load while the frontend starts
            self._spawn(step, services)
        fe_log = Path(self.state.steps["frontend"]["log"])
        self._wait("frontend", lambda: "HPC_FRONTEND_READY" in fe_log.read_text(errors="replace"), 60)
        self.state.frontend_url = re.search(r"HPC_FRONTEND_READY (\S+)", fe_log.read_text()).group(1)
        self._pin_frontend_port()
        on_ready("frontend", f"{head.nodes[0]}  {self.state.frontend_url}", time.monotonic() - t0)
        self.wait_workers(self.plan.workers(), on_ready, t0, timeout)
        self._wait("frontend", self.healthy, 60)
        self.state.ready_after = time.monotonic() - t0
        with locked_state(self.dep.name) as fresh:
            fresh.ready_after, fresh.endpoints = self.state.ready_after, self.state.endpoints
        on_ready("model", f"{self.dep.model.name} at {self.state.frontend_url}/v1", self.state.ready_after)

    def _pin_frontend_port(self) -> None:
        """A frontend started on a free port (--port 0) comes back on the same one if it is restarted."""
        port = self.state.frontend_url.rsplit(":", 1)[-1]
        with locked_state(self.dep.name) as fresh:
            argv = fresh.steps["frontend"]["argv"]
            argv[argv.index("--port") + 1] = port
            fresh.frontend_url = self.state.frontend_url
            self.state.steps["frontend"]["argv"] = argv

    def wait_workers(self, steps: list[Step], on_ready, t0: float, timeout: float) -> None:
        for step in steps:
            log = Path(self.state.steps[step.name]["log"])
            self._wait(step.name, lambda: f"HPC_WORKER_READY {step.name}" in log.read_text(errors="replace"),
                       timeout)
            gpus = f" GPUs {','.join(map(str, step.gpus))}" if step.gpus else ""
            on_ready(step.name, f"{','.join(step.nodes)} ({step.ntasks} rank{'s' * (step.ntasks > 1)}{gpus})",
                     time.monotonic() - t0)

    def scale_up(self, steps: list[Step], on_ready, timeout: float = 600) -> None:
        """Start more worker steps in the running deployment (the head services are already there)."""
        services = self.services()
        for step in steps:
            self._spawn(step, services)
        self.wait_workers(steps, on_ready, time.monotonic(), timeout)

    def services(self) -> dict:
        """What every step after the head needs: the services' URLs and the path of the deployment's credentials
        (a path: the secrets never go on a command line or into the environment)."""
        env = {"HPC_ETCD": self.state.endpoints["etcd"], "HPC_NATS": self.state.endpoints["nats"]}
        if self.state.endpoints.get("credentials"):
            env["HPC_CREDENTIALS"] = self.state.endpoints["credentials"]
        return env

    def healthy(self) -> bool:
        return http_ok(f"{self.state.frontend_url}/health")


def _error_line(log: Path, tail_bytes: int = 65536) -> str | None:
    """The `error: ...` line a component writes as it gives up (its last words, so only the log's tail is read:
    a TensorRT-LLM load can log megabytes while we poll)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - tail_bytes))
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return None
    lines = [line for line in text.splitlines() if line.startswith("error: ")]
    return lines[-1].removeprefix("error: ") if lines else None


def stop_steps(state: LaunchState, names: list[str], env: dict, timeout: float = 60) -> list[str]:
    """Cancel some worker steps (SIGTERM: each worker leaves etcd, then finishes its requests) and wait. They are
    marked as retiring first, so the supervisor does not start them again."""
    with locked_state(state.deployment) as fresh:
        for n in names:
            if n in fresh.steps:
                fresh.steps[n]["retiring"] = True
    running = commands.job_steps(state.job_id, env)
    ids = [running[f"hpc.{state.deployment}.{n}"] for n in names if f"hpc.{state.deployment}.{n}" in running]
    # SIGTERM, not a cancel: a cancelled step is killed after KillWait, mid-drain; signalled, the worker marks
    # itself draining, finishes its requests, leaves etcd and exits, and the step ends with it.
    try:
        commands.scancel(ids, env, signal="TERM")
    except HpcError:  # scancel --signal reports "Invalid job id" for steps it has in fact signalled (seen on 23.x)
        pass
    deadline = time.monotonic() + timeout
    left = list(names)
    while time.monotonic() < deadline:
        left = [n for n in names if f"hpc.{state.deployment}.{n}" in commands.job_steps(state.job_id, env)]
        if not left:
            break
        time.sleep(0.2)
    else:
        commands.scancel([running[f"hpc.{state.deployment}.{n}"] for n in left
                          if f"hpc.{state.deployment}.{n}" in running], env)  # past the deadline: cancel them
    with locked_state(state.deployment) as fresh:
        for n in names:
            if n not in left:
                fresh.steps.pop(n, None)
        state.steps = fresh.steps
    return left


def stop_supervisor(state: LaunchState, timeout: float = 60) -> bool:
    """Stop the process that restarts steps (on this host) before stopping the steps. An interactive `hpc launch`
    is that process: it then stops the deployment itself. True when none is left running."""
    sup = state.supervisor
    if not sup or sup.get("host") != socket.gethostname() or sup.get("pid") == os.getpid():
        return True
    return stop(Pid(sup["pid"], sup["start"]), timeout=timeout)


def stop_deployment(state: LaunchState, env: dict, timeout: float = 30) -> list[str]:
    """Cancel the deployment's own steps (workers first, then frontend, then head), confirm they are gone,
    release the allocation if we asked for it. Returns what is still there."""
    left = [] if stop_supervisor(state) else [f"supervisor (pid {state.supervisor['pid']})"]
    if state.job_id and commands.job_state(state.job_id, env):
        names = list(state.steps)
        order = [n for n in names if n not in ("frontend", "head")] + [n for n in ("frontend", "head") if n in names]
        running = commands.job_steps(state.job_id, env)
        for name in order:
            sid = running.get(f"hpc.{state.deployment}.{name}")
            if sid:
                commands.scancel([sid], env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            mine = [n for n in commands.job_steps(state.job_id, env) if n.startswith(f"hpc.{state.deployment}.")]
            if not mine:
                break
            time.sleep(0.2)
        else:
            left.extend(mine)
    for name, info in state.steps.items():  # the srun clients end with their steps; make sure, by PID
        pid = Pid(info["pid"], info.get("start", 0))
        if pid.alive() and not stop(pid, timeout=5):
            left.append(f"srun {name} (pid {pid.pid})")
    if state.created_allocation and state.job_id:
        commands.scancel([state.job_id], env)
        deadline = time.monotonic() + timeout
        while commands.job_state(state.job_id, env) and time.monotonic() < deadline:
            time.sleep(0.2)
        if commands.job_state(state.job_id, env):
            left.append(f"job {state.job_id}")
    if not left:
        LaunchState.path(state.deployment).unlink(missing_ok=True)
    return left
