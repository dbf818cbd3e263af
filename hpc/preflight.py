"""Checks before anything is allocated or started (`hpc launch`, `submit`, `serve`, and `hpc doctor`): each problem
is one line that says what is wrong, where, and what to do.

- the deployment is not already running from here;
- what the compute nodes must read (the project, its Python environment, the model, the engine YAMLs, the state
  directory) is not on a node-local path such as /tmp: each node has its own, and a step there fails late and
  cryptically ("couldn't chdir", "execve(): No such file or directory");
- the model directory has config.json and a tokenizer;
- this srun has the pmix MPI plugin the worker steps use."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hpc.config import Deployment
from hpc.errors import HpcError

NODE_LOCAL = ("/tmp", "/var/tmp", "/dev/shm", "/run/user")


def node_local_root(path: str | Path, env: dict | None = None) -> str | None:
    """The node-local directory `path` lies under, if any."""
    env = os.environ if env is None else env
    real = os.path.realpath(path)
    roots = list(NODE_LOCAL) + ([os.path.realpath(env["TMPDIR"])] if env.get("TMPDIR") else [])
    for root in roots:
        if real == root or real.startswith(root.rstrip("/") + "/"):
            return root
    return None


def already_running(dep: Deployment, env: dict) -> str | None:
    from hpc.launch import LaunchState
    from hpc.slurm import commands

    path = LaunchState.path(dep.name)
    if not path.exists():
        return None
    try:
        state = LaunchState.load(dep.name)
    except HpcError:
        return None
    if state.job_id == env.get("SLURM_JOB_ID") and env.get("HPC_SUBMITTED") == "1":
        return None  # the batch job `hpc submit` queued, launching itself
    if state.job_id and commands.job_state(state.job_id, env):
        where = f"job {state.job_id} on {', '.join(state.nodes) or 'its nodes'}"
        return (f"deployment {dep.name} is already running from here ({where}, frontend "
                f"{state.frontend_url or 'starting'}): `hpc stop {dep.name}` first, or give the config another name")
    return None


def shared_paths(dep: Deployment, config: Path, env: dict) -> list[str]:
    from hpc.launch import STATE_ROOT

    checks = [("the project directory", Path.cwd()), ("the deployment config", config),
              ("the state directory", STATE_ROOT), ("model.path", Path(dep.model.path))]
    if dep.container is None:  # in a container, the interpreter is the image's
        checks.append(("the Python environment", Path(sys.prefix)))
    for role, _ in dep.workers.items():
        path = dep.engine_config_path(role)
        if path:
            checks.append((f"workers.{role}.engine_config", path))
    problems = []
    for label, path in checks:
        root = node_local_root(path, env)
        if root:
            problems.append(f"{label} {path} is under {root}, which each node has its own copy of: the compute "
                            f"nodes will not see it. Move it to a shared filesystem (your home or project "
                            f"directory)")
    return problems


def model_files(dep: Deployment) -> list[str]:
    d = Path(dep.model.path)
    if not d.is_dir():
        return []  # not reachable from here (a path inside the container or on the nodes): the workers check it
    problems = []
    if not (d / "config.json").exists():
        problems.append(f"model.path {d} has no config.json (expected a Hugging Face model directory)")
    tokenizer = Path(dep.model.tokenizer) if dep.model.tokenizer else d
    if not any((tokenizer / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        problems.append(f"model.path {tokenizer} has no tokenizer.json: the frontend tokenizes with it (set "
                        f"model.tokenizer to a directory that has one)")
    return problems


def srun_mpi(env: dict) -> list[str]:
    from hpc.slurm import commands

    try:
        out = commands.run(["srun", "--mpi=list"], env=env, timeout=10)
    except HpcError as e:
        return [f"srun --mpi=list failed ({e}): is Slurm's client installed on this node?"]
    if "pmix" not in out:
        return ["this srun has no pmix MPI plugin (srun --mpi=list): worker steps run with --mpi=pmix; install "
                "Slurm's pmix plugin (Debian: slurm-wlm's libpmix support) or ask your admins"]
    return []


def check(dep: Deployment, config: Path, env: dict, slurm: bool = True) -> None:
    """Raise one HpcError listing every problem found before launching."""
    problems = []
    if slurm:
        running = already_running(dep, env)
        if running:
            raise HpcError(running)
        problems += shared_paths(dep, config, env)
    problems += model_files(dep)
    if slurm:
        problems += srun_mpi(env)
    if problems:
        raise HpcError("preflight: " + "\n  ".join([""] + problems).lstrip("\n"))
