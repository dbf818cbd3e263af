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
