"""Thin wrappers over Slurm's commands. Every call has a timeout."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

from hpc.errors import HpcError


def run(argv: list[str], env: dict | None = None, timeout: float = 30) -> str:
    try:
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise HpcError(f"{argv[0]} not found: is Slurm installed here (Debian package slurm-client)?") from None
    except subprocess.TimeoutExpired:
        raise HpcError(f"{' '.join(argv)} did not answer within {timeout:.0f} s") from None
    if out.returncode != 0:
        raise HpcError(f"{' '.join(argv)} failed: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


@dataclass(frozen=True)
class Node:
    name: str
    state: str
    cpus: int
    gres: str


def nodes(env: dict | None = None) -> list[Node]:
    out = run(["sinfo", "-h", "-N", "-o", "%N|%T|%c|%G"], env=env, timeout=10)
    result = []
    for line in out.splitlines():
        name, state, cpus, gres = line.split("|")
        result.append(Node(name, state, int(cpus), gres))
    return result


def expand_hostnames(nodelist: str, env: dict | None = None) -> list[str]:
    return run(["scontrol", "show", "hostnames", nodelist], env=env, timeout=10).split()


def srun_argv(step, job_id: str | None, python: str, deployment: str, container=None) -> list[str]:
    """The srun command line of one plan step. Every step may share its nodes (--overlap): head services are
    CPU-only, and GPU workers get their GPUs from CUDA_VISIBLE_DEVICES set by the plan."""
    argv = ["srun", "--overlap", "--kill-on-bad-exit=1", f"--job-name=hpc.{deployment}.{step.name}",
            f"--nodes={len(step.nodes)}", f"--ntasks-per-node={step.ntasks_per_node}",
            f"--nodelist={','.join(step.nodes)}"]
    if job_id:
        argv.append(f"--jobid={job_id}")
    if step.mpi:
        argv.append("--mpi=pmix")
    if container is not None:
        argv.append(f"--container-image={container.image}")
        if container.mounts:
            argv.append(f"--container-mounts={','.join(container.mounts)}")
        names = sorted({*container.env, *(k for k, _ in step.env)})
        if names:
            argv.append(f"--container-env={','.join(names)}")
    return argv + [*step.launcher, python, "-m", step.module, *step.args]


def step_env(step) -> dict[str, str]:
    env = dict(step.env)
    if step.gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, step.gpus))
    return env


def job_steps(job_id: str, env: dict | None = None) -> dict[str, str]:
    """Step name -> step id (JOB.STEP) of a job's running steps."""
    out = run(["squeue", "-h", "--steps", f"--jobs={job_id}", "-o", "%i|%j"], env=env, timeout=10)
    return {name: sid for sid, name in (line.split("|", 1) for line in out.splitlines() if "|" in line)}


def job_state(job_id: str, env: dict | None = None) -> str | None:
    """PENDING, RUNNING, ... or None when the job is gone."""
    try:
        out = run(["squeue", "-h", f"--jobs={job_id}", "-o", "%T"], env=env, timeout=10).strip()
    except HpcError:
        return None
    return out or None


def scancel(ids: list[str], env: dict | None = None, signal: str | None = None) -> None:
    if ids:
        run(["scancel", *([f"--signal={signal}"] if signal else []), *ids], env=env, timeout=15)


def srun_supports_containers(env: dict | None = None) -> bool:
    try:
        return "--container-image" in run(["srun", "--help"], env=env, timeout=10)
    except HpcError:
        return False
