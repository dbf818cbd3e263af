"""The `hpc` command line."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from hpc.errors import HpcError

app = typer.Typer(help="Disaggregated LLM serving on Slurm clusters.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
localcluster_app = typer.Typer(help="A real multi-node Slurm cluster on this host, for tests and laptops.",
                               no_args_is_help=True)
app.add_typer(localcluster_app, name="localcluster")
# Piped or captured output (logs, CI, `| grep`) gets wide lines instead of rich's 80 columns, so tables keep their
# names whole; COLUMNS still wins.
console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() or "COLUMNS" in os.environ else 160)


@app.command()
def validate(configs: List[Path] = typer.Argument(..., help="Deployment YAML files")) -> None:
    """Check deployment configs and their engine YAMLs; print OK or every problem."""
    from hpc.config import validate_files

    results = validate_files(configs)
    for path, problems in results.items():
        if problems:
            for p in problems:
                err.print(p, markup=False, highlight=False)
        else:
            console.print(f"[green]OK[/green] {path}")
    if any(results.values()):
        raise typer.Exit(1)


@localcluster_app.command("up")
def localcluster_up(nodes: int = typer.Option(3, help="Number of slurmd nodes"),
                    gpus_per_node: int = typer.Option(4, help="Fake GPUs (GRES) per node"),
                    cpus_per_node: int = typer.Option(4, help="CPUs each node declares")) -> None:
    """Start munge, slurmctld and one slurmd per node (idempotent)."""
    from hpc.slurm.localcluster import ClusterSpec, LocalCluster

    cluster = LocalCluster()
    with console.status("starting the local Slurm cluster"):
        cluster.up(ClusterSpec(nodes, gpus_per_node, cpus_per_node))
    _print_nodes(cluster)
    console.print(f"export SLURM_CONF={cluster.conf}    [dim](or: source {cluster.env_file})[/dim]")


@localcluster_app.command("down")
def localcluster_down() -> None:
    """Cancel all jobs and stop exactly the daemons `up` started."""
    from hpc.slurm.localcluster import LocalCluster

    stuck = LocalCluster().down()
    if stuck:
        raise HpcError(f"could not stop: {', '.join(stuck)}")
    console.print("local cluster stopped")


@localcluster_app.command("status")
def localcluster_status() -> None:
    """Daemons and node states."""
    from hpc.slurm.localcluster import LocalCluster

    cluster = LocalCluster()
    running = cluster.running()
    if not running or not any(running.values()):
        console.print(f"no local cluster running (state in {cluster.root})")
        raise typer.Exit(1)
    for name, ok in running.items():
        console.print(f"  {'[green]✓[/green]' if ok else '[red]✗[/red]'} {name}")
    _print_nodes(cluster)


def _print_nodes(cluster) -> None:
    from hpc.slurm import commands

    table = Table("node", "state", "CPUs", "GRES")
    for node in commands.nodes(env=cluster.env()):
        table.add_row(node.name, node.state, str(node.cpus), node.gres)
    console.print(table)


def _register_commands() -> None:
    from hpc.commands import serving, slurm, tuning  # noqa: F401  (importing registers their commands)


_register_commands()


def main() -> None:
    try:
        app()
    except HpcError as e:  # one clear message, unwrapped, no markup read into it
        err.print(Text("error: ", style="red") + Text(str(e)), soft_wrap=True, highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
