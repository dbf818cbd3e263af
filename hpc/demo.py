"""`make demo`: bring up the local Slurm cluster, validate the demo config and show where things would run."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from hpc.config import load_deployment
from hpc.slurm import commands
from hpc.slurm.localcluster import ClusterSpec, LocalCluster

REPO = Path(__file__).resolve().parent.parent
console = Console()


def main() -> None:
    cluster = LocalCluster()
    with console.status("local Slurm cluster: starting munge, slurmctld and 3 slurmd"):
        cluster.up(ClusterSpec(nodes=3, gpus_per_node=4, cpus_per_node=4))
    console.print(f"[green]✓[/green] local cluster up   (export SLURM_CONF={cluster.conf})")
    for node in commands.nodes(env=cluster.env()):
        console.print(f"    {node.name}  {node.state:6}  {node.cpus} CPUs  {node.gres}")
    config = REPO / "configs" / "tiny-disagg.yaml"
    dep = load_deployment(config)
    console.print(f"[green]✓[/green] {config.relative_to(REPO)} is valid: model {dep.model.name}, workers "
                  + ", ".join(f"{role} x{spec.replicas} ({spec.engine})" for role, spec in dep.workers.items()))
    console.print("stop the cluster with: .venv/bin/hpc localcluster down")


if __name__ == "__main__":
    main()
