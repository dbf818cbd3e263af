"""Commands that run on Slurm: render, launch, submit, sweep, report, scale, stop, status, logs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from hpc.cli import app, console, err
from hpc.errors import HpcError


def _plan(dep, config: Path, alloc, port: Optional[int] = None, relative: bool = False):
    """The plan of `dep` in `alloc`. `relative` keeps paths as given: a script to run from this directory, with
    no paths of this machine in it."""
    from hpc.launch import STATE_ROOT
    from hpc.plan import plan

    state = STATE_ROOT / dep.name
    if relative:
        return plan(dep, alloc, str(config), str(state), port)
    return plan(dep, alloc, str(config.resolve()), str(state.resolve()), port)


def _future_allocation(dep, nodes: Optional[int], gpus_per_node: Optional[int]):
    """An allocation that does not exist yet (render, submit): nodes node0, node1, ..."""
    from hpc.plan import Allocation

    count = nodes or dep.cluster.nodes or 1
    return Allocation(None, tuple(f"node{i}" for i in range(count)),
                      gpus_per_node if gpus_per_node is not None else dep.cluster.gpus_per_node)


@app.command()
def render(config: Path = typer.Argument(..., help="Deployment YAML"),
           nodes: Optional[int] = typer.Option(None, help="Nodes of the allocation (default: cluster.nodes)"),
           gpus_per_node: Optional[int] = typer.Option(None, help="GPUs per node (default: cluster.gpus_per_node)"),
           port: Optional[int] = typer.Option(None, help="Frontend port (default: the config's)"),
           variant: Optional[str] = typer.Option(None, help="A variant: the config's base with its override_NAME "
                                                            "merged in"),
           output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write here instead of stdout")) -> None:
    """Print the launch as a readable srun_disaggregated.sh (or srun_aggregated.sh) to run inside salloc."""
    from hpc.config import load_deployment, resolve_variant
    from hpc.render import render_script

    config = resolve_variant(config, variant)
    dep = load_deployment(config)
    p = _plan(dep, config, _future_allocation(dep, nodes, gpus_per_node), port, relative=True)
    text = render_script(dep, p, str(config))
    if output:
        output.write_text(text)
        output.chmod(0o755)
        err.print(f"wrote {output}")
    else:
        sys.stdout.write(text)


@app.command()
def launch(config: Path = typer.Argument(..., help="Deployment YAML"),
           nodes: Optional[int] = typer.Option(None, help="Ask Slurm for this many nodes (salloc) when not "
                                                           "inside an allocation"),
           gpus_per_node: Optional[int] = typer.Option(None, help="GPUs per node (default: what Slurm reports, or "
                                                                   "cluster.gpus_per_node for a new allocation)"),
           time_limit: Optional[str] = typer.Option(None, "--time", help="Time limit of a new allocation"),
           partition: Optional[str] = typer.Option(None, help="Partition of a new allocation"),
           account: Optional[str] = typer.Option(None, help="Account of a new allocation"),
           port: Optional[int] = typer.Option(None, help="Frontend port (default: the config's; 0: a free one)"),
           detach: bool = typer.Option(False, "--detach", help="Return once ready; `hpc stop` ends it"),
           variant: Optional[str] = typer.Option(None, help="A variant: the config's base with its override_NAME "
                                                            "merged in"),
           run_dir: Optional[Path] = typer.Option(None, help="The run folder (default: runs/NAME-JOB/)"),
           dry_run: bool = typer.Option(False, "--dry-run", help="Show the plan (steps, nodes, GPUs, ranks, "
                                                                 "commands) and the script it would run; start "
                                                                 "nothing")) -> None:
    """Start the deployment in a Slurm allocation (the current one, or a new one with --nodes) and wait until
    the model is served. Ctrl-C (or `hpc stop`) stops exactly what it started."""
    import os
    import signal

    from hpc.config import load_deployment, resolve_variant
    from hpc.launch import Launcher, current_allocation, request_allocation, stop_deployment
    from hpc.plan import needed_gpus
    from hpc.slurm import commands

    config = resolve_variant(config, variant)
    dep = load_deployment(config)
    env = dict(os.environ)
    if dry_run:
        return _dry_run(dep, config, env, nodes, gpus_per_node, port)
    from hpc import preflight

    preflight.check(dep, config, env)  # before anything is asked of Slurm
    alloc = current_allocation(env, gpus_per_node)
    if alloc is None:
        if not nodes:
            raise HpcError("not inside a Slurm allocation: run this inside `salloc -N N ...`, or pass --nodes N "
                           "(and --gpus-per-node, --time, --partition, --account) so hpc asks for one")
        if gpus_per_node is None and needed_gpus(dep):  # the GPUs the config is written for
            gpus_per_node = dep.cluster.gpus_per_node
        with console.status(f"asking Slurm for {nodes} nodes") as status:
            alloc = request_allocation(dep.name, nodes, gpus_per_node, time_limit, partition, account, env,
                                       waiting=lambda msg: status.update(msg))
        console.print(f"  [green]✓[/green] allocation  job {alloc.job_id}: {', '.join(alloc.nodes)}")
    try:
        p = _plan(dep, config, alloc, port)
    except HpcError:
        if alloc.created:  # it cannot run here: give back what we asked for
            commands.scancel([alloc.job_id], env)
        raise
    launcher = Launcher(dep, p, env, run_dir=run_dir)
    from hpc.render import render_script

    launcher.record_run(config.read_text(), render_script(dep, _plan(dep, config, alloc, port, relative=True),
                                                          str(config)))
    stopping = False

    def ready(name: str, detail: str, seconds: float) -> None:
        console.print(f"  [green]✓[/green] {name:12} {detail:52} {seconds:6.1f} s")

    try:
        launcher.start(ready)
        console.print(f"ready: model [bold]{dep.model.name}[/bold] at [bold]{launcher.state.frontend_url}/v1"
                      f"[/bold]   (hpc stop to end; run folder {launcher.run_dir})")
        if detach:
            _detached_supervisor(dep.name, launcher.run_dir, env)
            return
        signal.signal(signal.SIGTERM, _interrupt)
        from hpc.supervise import Supervisor

        Supervisor(dep.name, env, say=lambda line: console.print(f"  [yellow]↻[/yellow] {line}")).run()
    except KeyboardInterrupt:
        stopping = True
    except BaseException:
        stopping = True
        raise
    finally:
        if stopping:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            console.print("stopping")
            left = stop_deployment(launcher.state, env)
            if left:
                err.print(f"[red]still there:[/red] {', '.join(left)}")
            else:
                console.print("stopped: no step of ours is left" + (f"; allocation {alloc.job_id} released"
                                                                      if alloc.created else ""))


def _dry_run(dep, config: Path, env: dict, nodes, gpus_per_node, port) -> None:
    """The plan as a table and the script it stands for; no allocation is asked for and nothing starts."""
    from hpc.launch import current_allocation
    from hpc.render import render_script
    from hpc.slurm.commands import srun_argv, step_env

    alloc = current_allocation(env, gpus_per_node) or _future_allocation(dep, nodes, gpus_per_node)
    p = _plan(dep, config, alloc, port, relative=True)
    table = Table("step", "nodes", "ranks", "GPUs", "environment", "command",
                  title=f"{dep.name}: dry run on {len(alloc.nodes)} node(s) x {alloc.gpus_per_node} GPUs"
                        + (f" (job {alloc.job_id})" if alloc.job_id else " (no allocation yet)"))
    for s in p.steps:
        argv = srun_argv(s, alloc.job_id, "python", dep.name, dep.container)
        command = " ".join(argv[argv.index("python") - len(s.launcher):])
        table.add_row(s.name, ",".join(s.nodes), str(s.ntasks), ",".join(map(str, s.gpus)) or "-",
                      " ".join(f"{k}={v}" for k, v in step_env(s).items()) or "-", command)
    console.print(table)
    sys.stdout.write(render_script(dep, p, str(config)))  # as written, for copying: no wrapping
    console.print("dry run: nothing was started")


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def _detached_supervisor(name: str, run_dir: Path, env: dict) -> None:
    """With --detach, a process of its own keeps restarting what dies (its log: RUN/supervisor.log)."""
    import time

    from hpc.launch import LaunchState
    from hpc.procs import Pid, spawn

    popen = spawn([sys.executable, "-m", "hpc.supervise", name], run_dir / "supervisor.log", env=env)
    pid = Pid.of(popen.pid)  # it records itself in the state; wait for that so `hpc stop` finds it
    t0 = time.monotonic()
    while time.monotonic() - t0 < 10 and LaunchState.load(name).supervisor.get("pid") != popen.pid:
        if not pid.alive():
            raise HpcError(f"the supervisor exited at start; see {run_dir / 'supervisor.log'}")
        time.sleep(0.05)


def _sbatch_extra(gpus_per_node, time_limit, partition, account) -> list[str]:
    extra = [f"--gres=gpu:{gpus_per_node}"] if gpus_per_node else []
    return extra + [f"--{k}={v}" for k, v in (("time", time_limit), ("partition", partition), ("account", account))
                    if v]


@app.command()
def submit(config: Path = typer.Argument(..., help="Deployment YAML"),
           nodes: int = typer.Option(..., help="Nodes to ask for"),
           time_limit: Optional[str] = typer.Option(None, "--time", help="Time limit, e.g. 2:00:00"),
           gpus_per_node: Optional[int] = typer.Option(None, help="GPUs per node"),
           partition: Optional[str] = typer.Option(None), account: Optional[str] = typer.Option(None),
           port: Optional[int] = typer.Option(None, help="Frontend port (0: a free one)"),
           variant: Optional[str] = typer.Option(None, help="A variant: the config's base with its override_NAME "
                                                            "merged in")) -> None:
    """Submit the launch as a batch job (sbatch); `hpc status`, `hpc logs` and `hpc stop` work on it."""
    import os

    from hpc.config import load_deployment, resolve_variant
    from hpc.launch import STATE_ROOT, LaunchState
    from hpc.render import template
    from hpc.slurm import commands

    config = resolve_variant(config, variant)
    dep = load_deployment(config)
    _plan(dep, config, _future_allocation(dep, nodes, gpus_per_node))  # refuse now, not in the queue hours later
    from hpc import preflight

    preflight.check(dep, config, dict(os.environ))
    state_dir = STATE_ROOT / dep.name
    state_dir.mkdir(parents=True, exist_ok=True)
    script = state_dir / "sbatch_launch.sh"
    script.write_text(template("sbatch_launch.sh.j2").render(
        name=dep.name, nodes=nodes, log=str((state_dir / "sbatch-%j.log").resolve()),
        extra=_sbatch_extra(gpus_per_node, time_limit, partition, account), python=sys.executable,
        config=str(config.resolve()), port=port))
    out = commands.run(["sbatch", "--parsable", str(script)], env=dict(os.environ))
    job = out.strip().split(";")[0]
    LaunchState(dep.name, str(config.resolve()), job, True, [], str(state_dir.resolve())).save()
    console.print(f"submitted job {job}: `hpc status {dep.name}`, `hpc logs frontend`, `hpc stop {dep.name}`")


@app.command()
def sweep(sweep_file: Path = typer.Argument(..., help="Sweep YAML"),
          results: Path = typer.Option(Path("results"), help="Results root; this sweep writes RESULTS/<name>/"),
          wait: bool = typer.Option(False, "--wait", help="Block until every task has finished"),
          variant: Optional[str] = typer.Option(None, help="The base config's variant (its override_NAME merged "
                                                           "in); or sweep variants with an axis `variant: [...]`")) -> None:
    """Run variants of a deployment as an sbatch job array; each task benchmarks its variant."""
    import os

    from hpc.render import template
    from hpc.slurm import commands
    from hpc.sweep import load_sweep, variants

    sw = load_sweep(sweep_file)
    if variant:
        sw = sw.model_copy(update={"variant": variant})
    out = (results / sw.name).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    points = variants(sw, sweep_file, out)
    script = out / "sbatch_sweep.sh"
    script.write_text(template("sbatch_sweep.sh.j2").render(
        sweep=sw.name, nodes=sw.nodes, count=len(points), results=str(out), python=sys.executable,
        extra=_sbatch_extra(sw.gpus_per_node, sw.time, sw.partition, sw.account)))
    argv = ["sbatch", "--parsable"] + (["--wait"] if wait else []) + [str(script)]
    try:
        job = commands.run(argv, env=dict(os.environ), timeout=24 * 3600 if wait else 30).strip().split(";")[0]
    except HpcError as e:
        if not wait:
            raise
        raise HpcError(f"some sweep tasks failed ({e}); logs in {out / 'logs'}") from None
    console.print(f"sweep {sw.name}: {len(points)} variants, job array {job or '(finished)'}; results in {out}; "
                  f"then `hpc report {out}`")


@app.command()
def report(results: Path = typer.Argument(..., help="A sweep's results folder"),
           plot: Optional[Path] = typer.Option(None, help="Write the chart here (PNG): TTFT p50 and p99 against "
                                                          "output tokens/s per GPU, one line per variant"),
           svg: bool = typer.Option(False, "--svg", help="With --plot, an SVG beside the PNG")) -> None:
    """The table of a sweep's results (and a chart)."""
    from hpc import bench as b
    from hpc.sweep import report_rows

    rows = report_rows(results)
    if not rows:
        raise HpcError(f"no task results (N.json) in {results}")
    columns = ["task", "variant", "concurrency", "errors", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms",
               "itl_p50_ms", "e2e_p50_ms", "output_tok_s", "output_tok_s_per_gpu", "goodput_req_s", "reused_share"]
    table = Table(*columns, title=str(results))
    for r in rows:
        table.add_row(*(str(r.get(k, "")) for k in columns))
    console.print(table)
    if plot:
        first = rows[0]
        b.plot(rows, plot, f"sweep {results.name}: TTFT against throughput, ISL {first['isl']} / OSL "
                           f"{first['osl']}, {first['date'] or ''}", svg)
        console.print(f"plot: {plot}" + (f" and {plot.with_suffix('.svg')}" if svg else ""))


@app.command(context_settings={"ignore_unknown_options": True})  # so that -1 is the change, not an option
def scale(role: str = typer.Argument(..., help="prefill, decode, aggregated or encode"),
          change: str = typer.Argument(..., help="+N to add workers, -N to drain and stop some"),
          deployment: Optional[str] = typer.Option(None, help="Deployment name (default: the latest)")) -> None:
    """Add worker steps to the running deployment, or drain and stop some."""
    import os
    import re

    from hpc.config import load_deployment
    from hpc.launch import Launcher, LaunchState, stop_steps
    from hpc.plan import Allocation

    m = re.fullmatch(r"([+-])(\d+)", change.strip())
    if not m or int(m.group(2)) == 0:
        raise HpcError(f"{change!r}: expected +N or -N, e.g. +1")
    state = LaunchState.load(deployment)
    env = dict(os.environ)
    current = sorted((n for n, i in state.steps.items() if i.get("role") == role), key=lambda n: int(n.rsplit("-", 1)[1]))
    if m.group(1) == "-":
        victims = current[-int(m.group(2)):]
        if not victims:
            raise HpcError(f"{state.deployment} has no {role} workers")
        left = stop_steps(state, victims, env)
        if left:
            raise HpcError(f"still running after 60 s: {', '.join(left)}")
        console.print(f"drained and stopped {', '.join(victims)}")
        return
    dep = load_deployment(state.config)
    spec = getattr(dep.workers, role, None) if role in ("prefill", "decode", "aggregated", "encode") else None
    if spec is None:
        raise HpcError(f"{state.deployment} has no workers.{role} in {state.config}")
    total = len(current) + int(m.group(2))
    bigger = dep.model_copy(update={"workers": dep.workers.model_copy(
        update={role: spec.model_copy(update={"replicas": total})})})
    alloc = Allocation(state.job_id, tuple(state.nodes), state.gpus_per_node, state.created_allocation)
    p = _plan(bigger, Path(state.config), alloc)
    new = [s for s in p.workers() if s.role == role and s.name not in state.steps]
    launcher = Launcher(bigger, p, env, state=state)
    launcher.scale_up(new, lambda name, detail, secs: console.print(f"  [green]✓[/green] {name:12} {detail} "
                                                                     f"{secs:6.1f} s"))
    console.print(f"{role}: {total} workers")


@app.command("stop")
def stop_cmd(deployment: Optional[str] = typer.Argument(None, help="Deployment name (default: the latest)")) -> None:
    """Cancel exactly the steps `hpc launch` started (scancel JOB.STEP), and its allocation if it made one."""
    import os
    import time

    from hpc.launch import LaunchState, stop_deployment

    state = LaunchState.load(deployment)
    t0 = time.monotonic()
    left = stop_deployment(state, dict(os.environ))
    if left:
        raise HpcError(f"still there after stopping: {', '.join(left)}")
    console.print(f"stopped {state.deployment} in {time.monotonic() - t0:.1f} s; no step of ours is "
                  f"left" + (f"; allocation {state.job_id} released" if state.created_allocation else ""))


@app.command()
def status(deployment: Optional[str] = typer.Argument(None, help="Deployment name (default: the latest)"),
           watch: bool = typer.Option(False, "--watch", "-w", help="A live view, refreshed until Ctrl-C"),
           interval: float = typer.Option(2.0, help="Seconds between refreshes with --watch"),
           as_json: bool = typer.Option(False, "--json", help="The snapshot as JSON, for scripts")) -> None:
    """Every component: node, step, state, restarts, registration; each worker's queue, running requests, KV
    blocks and tokens/s; the frontend's last minute (requests/s, TTFT and ITL p50/p99)."""
    import json
    import os

    from rich.live import Live

    from hpc.launch import LaunchState
    from hpc.status import render, snapshot

    env = dict(os.environ)
    state = LaunchState.load(deployment)
    if as_json:
        sys.stdout.write(json.dumps(snapshot(state, env), indent=2) + "\n")
        return
    if not watch:
        console.print(render(snapshot(state, env)))
        return
    try:
        with Live(render(snapshot(state, env)), console=console, auto_refresh=False) as live:
            while True:
                live.update(render(snapshot(LaunchState.load(state.deployment), env, listen_s=interval)),
                            refresh=True)
    except KeyboardInterrupt:
        pass


@app.command()
def runs(root: Path = typer.Option(Path("runs"), help="Where run folders are")) -> None:
    """The run folders of launches from here, newest first: deployment, job, start, restarts, state."""
    import json

    from hpc.launch import STATE_ROOT

    folders = sorted((d for d in root.glob("*/run.json")), key=lambda p: p.stat().st_mtime, reverse=True)
    if not folders:
        raise HpcError(f"no runs in {root}/ yet (each `hpc launch` makes one)")
    live = set()
    for f in STATE_ROOT.glob("*.json"):
        try:
            live.add(json.loads(f.read_text()).get("run_dir"))
        except (OSError, ValueError):
            pass
    table = Table("run", "deployment", "job", "started", "restarts", "state", title=f"runs in {root}/")
    for f in folders:
        run = json.loads(f.read_text())
        restarts = f.parent / "restarts.log"
        count = sum("started again" in line for line in restarts.read_text().splitlines()) if restarts.exists() else 0
        table.add_row(f.parent.name, run["deployment"], str(run.get("job_id") or "-"), run["started"], str(count),
                      "[green]running[/green]" if str(f.parent.resolve()) in live else "ended")
    console.print(table)


def _log_of(component: str, deployment: Optional[str]) -> Path:
    """The component's log: of the running deployment, else of the latest run folder (of that deployment)."""
    from hpc.launch import LaunchState

    name = component.replace("/", "-")
    try:
        state = LaunchState.load(deployment)
        runs = [Path(state.run_dir)] if state.run_dir else []
        info = state.steps.get(name)
        if info:
            return Path(info["log"])
        known = list(state.steps)
    except HpcError:
        pattern = f"{deployment}-*" if deployment else "*"
        runs = sorted(Path("runs").glob(f"{pattern}/run.json"), key=lambda p: p.stat().st_mtime)[-1:]
        runs = [r.parent for r in runs]
        known = []
    for run in runs:
        log = run / "logs" / f"{name}.log"
        if log.exists():
            return log
        known = known or sorted(p.stem for p in (run / "logs").glob("*.log"))
    raise HpcError(f"no log of {component!r}" + (f" (have: {', '.join(known)})" if known else
                                                 " (no deployment or run folder here)"))


@app.command()
def logs(component: str = typer.Argument(..., help="e.g. frontend, head, prefill-0"),
         deployment: Optional[str] = typer.Option(None, help="Deployment name (default: the latest)"),
         follow: bool = typer.Option(False, "-f", "--follow", help="Keep printing new lines")) -> None:
    """Print a component's log (of the running deployment, else of the latest run)."""
    import time

    with open(_log_of(component, deployment), errors="replace") as f:
        sys.stdout.write(f.read())
        while follow:
            line = f.readline()
            if line:
                sys.stdout.write(line)
                sys.stdout.flush()
            else:
                time.sleep(0.2)
