"""Commands that explain and tune: diagnose (where TTFT goes, and which engine holds it back), tune."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from hpc.cli import app, console
from hpc.errors import HpcError


def _frontend_url(deployment: Optional[str], url: Optional[str]) -> str:
    if url:
        return url.rstrip("/")
    from hpc.launch import LaunchState

    state = LaunchState.load(deployment)
    if not state.frontend_url:
        raise HpcError(f"{state.deployment} has no frontend URL yet (is it ready?)")
    return state.frontend_url


@app.command()
def diagnose(deployment: Optional[str] = typer.Argument(None, help="A deployment launched from here (default: "
                                                                   "the latest)"),
             url: Optional[str] = typer.Option(None, help="The frontend's URL instead (e.g. an `hpc serve`)"),
             window: float = typer.Option(60.0, help="Seconds of recent requests to look at"),
             trace: Optional[Path] = typer.Option(None, help="Replay a trace file (the run folder's trace.jsonl) "
                                                            "instead of asking the frontend"),
             as_json: bool = typer.Option(False, "--json", help="The summary and findings as JSON")) -> None:
    """Where TTFT goes (p50 and p99 by stage) and which engine holds it back, with the evidence. Exit code 0
    when healthy, 1 when a bottleneck is found."""
    import json
    from dataclasses import asdict

    from hpc.diagnose import diagnose as run, fetch, read_trace

    if trace:
        if not trace.is_file():
            raise HpcError(f"{trace}: no such trace file")
        records, workers, frontend_cpu = read_trace(trace, window), {}, None
    else:
        base = _frontend_url(deployment, url)
        try:
            records, workers, frontend_cpu = fetch(base, window)
        except OSError as e:
            raise HpcError(f"cannot read the frontend's stages at {base}: {e}") from None
    summary, findings = run(records, workers, frontend_cpu)
    healthy = findings[0].kind in ("healthy", "no data")
    if as_json:
        sys.stdout.write(json.dumps({"summary": summary, "findings": [asdict(f) for f in findings],
                                     "healthy": healthy}, indent=2) + "\n")
        raise typer.Exit(0 if healthy else 1)
    if summary.get("requests"):
        t = Table("stage", "p50 ms", "p99 ms", title=f"TTFT over {summary['requests']} requests: p50 "
                                                      f"{summary['ttft_p50_ms']} ms, p99 {summary['ttft_p99_ms']} ms")
        for stage, v in summary["stages_p50_ms"].items():
            t.add_row(stage, str(v), str(summary["stages_p99_ms"][stage]))
        console.print(t)
        w = Table("worker", "host", "requests", "queue p50 ms", "compute ms / 1k tokens", "TTFT p50 ms")
        for name, row in summary["workers"].items():
            w.add_row(name, str(row["host"]), str(row["requests"]), str(row["queue_p50_ms"]),
                      str(row["compute_ms_per_1k_tokens"]), str(row["ttft_p50_ms"]))
        console.print(w)
        if "second_token_p50_ms" in summary:
            console.print(f"time to the second token p50 {summary['second_token_p50_ms']} ms: KV transfer "
                          f"{summary['kv_transfer_p50_ms']} ms, first decode step {summary['decode_first_p50_ms']} ms")
    for f in findings:
        color = "green" if healthy else "red"
        console.print(f"[{color}]{f.kind}:[/{color}] {f.message}")
    raise typer.Exit(0 if healthy else 1)


tune_app = typer.Typer(help="Measure and tune: the prefill batch that saturates the engine; worker counts for a "
                            "load.", no_args_is_help=True)
app.add_typer(tune_app, name="tune")


def _prefill_role(dep, config: Path) -> str:
    for role in ("prefill", "aggregated"):
        if getattr(dep.workers, role) is not None:
            return role
    raise HpcError(f"{config}: no workers.prefill or workers.aggregated to tune")


def _srun_prefix(dep, role: str) -> list[str] | None:
    """Inside an allocation, a GPU engine is measured on an allocated node (an srun step of one task)."""
    import os

    from hpc.plan import uses_gpus

    if not os.environ.get("SLURM_JOB_ID") or not uses_gpus(dep, role):
        return None
    spec = getattr(dep.workers, role)
    return ["srun", "--overlap", "-N1", "-n1", f"--gres=gpu:{spec.gpus_per_worker}", "--job-name=hpc.tune"]


@tune_app.command("prefill")
def tune_prefill(config: Path = typer.Argument(..., help="Deployment YAML"),
                 tokens: str = typer.Option("256,512,1024,2048,4096,8192,16384",
                                            help="Tokens per forward to measure"),
                 repeats: int = typer.Option(3, help="Distinct prompts per size (the best counts)"),
                 isl: Optional[int] = typer.Option(None, help="Typical prompt length: also sets max_batch_size to "
                                                              "the prompts the knee holds"),
                 write: bool = typer.Option(False, "--write", help="Write max_num_tokens (and max_batch_size) into "
                                                                   "the prefill engine YAML"),
                 dry_run: bool = typer.Option(False, "--dry-run", help="Show the change; write nothing (the "
                                                                       "default without --write)"),
                 plot: Optional[Path] = typer.Option(None, help="Throughput and TTFT against batch, as a PNG"),
                 out: Optional[Path] = typer.Option(None, help="The table as JSON, with the command")) -> None:
    """Prefill throughput and TTFT at increasing tokens per forward (distinct prompts, no cache hits); the
    smallest batch within 5% of the best throughput, written into the prefill engine YAML."""
    import difflib
    import json
    import time

    from hpc.config import load_deployment
    from hpc.tune import knee, measure, plot as draw, set_yaml_fields

    dep = load_deployment(config)
    role = _prefill_role(dep, config)
    spec = getattr(dep.workers, role)
    sizes = sorted({int(t) for t in tokens.split(",") if t.strip()})
    if not sizes or min(sizes) < 1:
        raise HpcError(f"--tokens {tokens!r}: expected positive integers like 256,1024,4096")
    engine_yaml = dep.engine_config_path(role)
    srun = _srun_prefix(dep, role)
    with console.status(f"measuring the {spec.engine} {role} engine at {len(sizes)} sizes"
                        + (" on an allocated node" if srun else "")):
        rows = measure(spec.engine, dep.model.path, engine_yaml, sizes, repeats, dep.model.random_weights, srun)
    chosen = knee(rows)
    t = Table("tokens per forward", "TTFT ms", "tokens/s", "reused", title=f"{dep.name}: {role} engine "
                                                                          f"({spec.engine})")
    for r in rows:
        mark = " ← knee" if r is chosen else ""
        t.add_row(str(r["tokens"]) + mark, str(r["ttft_ms"]), str(r["tokens_per_s"]), str(r["reused"]))
    console.print(t)
    console.print(f"smallest batch within 5% of the best throughput: [bold]{chosen['tokens']}[/bold] tokens per "
                  f"forward ({chosen['tokens_per_s']:.0f} tokens/s, TTFT {chosen['ttft_ms']} ms)")
    fields = {"max_num_tokens": chosen["tokens"]}
    if isl:
        fields["max_batch_size"] = max(1, chosen["tokens"] // isl)
    if out:
        out.write_text(json.dumps({"command": " ".join(["hpc", *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d"),
                                   "deployment": dep.name, "engine": spec.engine, "knee": chosen, "rows": rows},
                                  indent=2))
    if plot:
        draw(rows, chosen, plot, f"{dep.name}: {role} prefill")
        console.print(f"plot: {plot}")
    if engine_yaml is None:
        console.print(f"workers.{role} has no engine_config: set {fields} in one to use it")
        return
    before = engine_yaml.read_text()
    after = set_yaml_fields(engine_yaml, fields)
    diff = "".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True), str(engine_yaml),
                                        str(engine_yaml)))
    if not diff:
        console.print(f"{engine_yaml} already says so")
    elif write and not dry_run:
        engine_yaml.write_text(after)
        console.print(f"wrote {', '.join(f'{k}: {v}' for k, v in fields.items())} into {engine_yaml}")
    else:
        sys.stdout.write(diff)
        console.print("dry run: nothing written (--write to apply)")


@tune_app.command("pd")
def tune_pd(config: Path = typer.Argument(..., help="Deployment YAML"),
            rate: float = typer.Option(..., help="Target requests/s"),
            isl: int = typer.Option(..., help="Input tokens per request"),
            osl: int = typer.Option(..., help="Output tokens per request"),
            ttft_ms: float = typer.Option(..., help="TTFT limit"),
            itl_ms: float = typer.Option(..., help="ITL limit"),
            decode_step_ms: Optional[float] = typer.Option(None, help="A decode step at batch 1 (default: the "
                                                                      "mocker's timing)"),
            decode_ms_per_sequence: Optional[float] = typer.Option(None, help="What each running sequence adds "
                                                                              "to a step"),
            sweep: Optional[Path] = typer.Option(None, help="Write a sweep that checks the recommendation: it and "
                                                            "one prefill worker fewer, at the load's concurrency, "
                                                            "with the limits as goodput SLOs (`hpc sweep FILE`)"))\
        -> None:
    """Prefill and decode workers for a target load, from the prefill engine measured at ISL and the decode step
    time; says which limit binds."""
    from hpc.config import load_deployment
    from hpc.tune import measure, recommend

    dep = load_deployment(config)
    role = _prefill_role(dep, config)
    spec = getattr(dep.workers, role)
    if decode_step_ms is None or decode_ms_per_sequence is None:
        mock = dep.engine_config("decode" if dep.workers.decode else role).mocker
        if mock is None:
            raise HpcError("--decode-step-ms and --decode-ms-per-sequence are needed for a real engine (measure "
                           "them with `hpc bench` at concurrency 1 and 16)")
        decode_step_ms = mock.decode_step_ms if decode_step_ms is None else decode_step_ms
        decode_ms_per_sequence = (mock.decode_ms_per_sequence if decode_ms_per_sequence is None
                                  else decode_ms_per_sequence)
    rows = measure(spec.engine, dep.model.path, dep.engine_config_path(role), [isl], 3, dep.model.random_weights,
                   _srun_prefix(dep, role))
    r = recommend(rate, isl, osl, rows[0]["tokens_per_s"], rows[0]["ttft_ms"] / 1000, decode_step_ms,
                  decode_ms_per_sequence, ttft_ms, itl_ms)
    console.print(f"prefill at ISL {isl}: {rows[0]['tokens_per_s']:.0f} tokens/s, TTFT {rows[0]['ttft_ms']} ms "
                  f"(reused {rows[0]['reused']})")
    console.print(f"recommendation for {rate:g} req/s: [bold]{r.prefill_workers} prefill[/bold] and "
                  f"[bold]{r.decode_workers} decode[/bold] workers (decode batch up to {r.decode_batch})")
    console.print(f"binding: {r.binding}")
    if sweep:
        import math

        import yaml

        # Little's law: requests in flight = rate x time in the system (TTFT + OSL steps at the ITL limit).
        concurrency = max(1, math.ceil(rate * (ttft_ms + osl * itl_ms) / 1000))
        prefill = sorted({max(1, r.prefill_workers - 1), r.prefill_workers})
        text = yaml.safe_dump({
            "name": f"{dep.name}-pd-check", "base": str(config.resolve()),
            "nodes": dep.cluster.nodes or 1,
            "axes": {"workers.prefill.replicas": prefill, "workers.decode.replicas": [r.decode_workers]},
            "bench": {"isl": isl, "osl": osl, "concurrency": str(concurrency), "requests": max(32, 4 * concurrency)},
            "slo": {"ttft_ms": ttft_ms, "itl_ms": itl_ms}}, sort_keys=False)
        sweep.write_text(f"# Written by `hpc tune pd`: checks {r.prefill_workers} prefill + {r.decode_workers} "
                         f"decode workers for {rate:g} req/s\n" + text)
        console.print(f"sweep: {sweep} (run `hpc sweep {sweep}`, then `hpc report`: the recommendation's goodput "
                      f"should equal its request rate)")


@app.command()
def doctor(config: Optional[Path] = typer.Argument(None, help="A deployment YAML: its paths, model, container "
                                                               "and GPUs per node are checked too"),
           nodes: Optional[int] = typer.Option(None, help="Ask Slurm for this many nodes when not inside an "
                                                          "allocation (released at the end)")) -> None:
    """Check what breaks multi-node serving silently, on every node of the allocation: Slurm's pmix plugin, pyxis
    for a container, GPUs per node, NIXL (a real transfer), the head node's ports from the other nodes, clocks,
    shared paths. One line per problem, with the fix; exit code 1 when there is any."""
    import json
    import os
    import time

    from hpc import preflight
    from hpc.doctor import problems
    from hpc.launch import STATE_ROOT, current_allocation, request_allocation
    from hpc.plan import needed_gpus
    from hpc.slurm import commands

    env = dict(os.environ)
    found: list[str] = preflight.srun_mpi(env)
    dep = None
    if config is not None:
        from hpc.config import load_deployment

        dep = load_deployment(config)
        found += preflight.shared_paths(dep, config, env) + preflight.model_files(dep)
        if dep.container and not commands.srun_supports_containers(env):
            found.append(f"{config}: container.image is set but this srun has no --container-image: install the "
                         f"pyxis plugin, or remove `container`")
    alloc = current_allocation(env, None)
    created = None
    if alloc is None:
        if not nodes:
            raise HpcError("not inside a Slurm allocation: run this inside `salloc -N N`, or pass --nodes N")
        created = alloc = request_allocation("doctor", nodes, None, None, None, None, env)
    try:
        rendezvous = (STATE_ROOT / "doctor" / f"{alloc.job_id}.json").resolve()
        rendezvous.parent.mkdir(parents=True, exist_ok=True)
        rendezvous.unlink(missing_ok=True)
        argv = ["srun", "--overlap", f"--jobid={alloc.job_id}", f"--nodes={len(alloc.nodes)}", "--ntasks-per-node=1",
                "--job-name=hpc.doctor", sys.executable, "-m", "hpc.doctor", str(rendezvous)]
        with console.status(f"checking {len(alloc.nodes)} nodes"):
            here = time.time()
            try:
                out = commands.run(argv, env=env, timeout=120)
            except HpcError as e:
                raise HpcError(f"the doctor step failed: {e}") from None
        reports = [json.loads(line.split(" ", 1)[1]) for line in out.splitlines() if line.startswith("HPC_DOCTOR ")]
        need = 0  # GPUs per node the plan puts there: only a config with GPU workers needs any
        if dep is not None and needed_gpus(dep):
            need = alloc.gpus_per_node or dep.cluster.gpus_per_node
        found += problems(reports, here, need, list(alloc.nodes))
        t = Table("node", "clock", "GPUs", "head node", "NIXL DRAM GB/s", title=f"job {alloc.job_id}")
        for r in sorted(reports, key=lambda r: r["rank"]):
            t.add_row(r["node"], f"{r['time'] - here:+.2f} s", str(r["gpus"]), r["ports"],
                      str(r["nixl_gbps"]) if r["nixl_gbps"] is not None else f"failed: {r['nixl_error']}")
        console.print(t)
    finally:
        if created is not None:
            commands.scancel([created.job_id], env)
    for line in found:
        console.print(f"[red]✗[/red] {line}")
    if found:
        raise typer.Exit(1)
    console.print("[green]✓[/green] no problem found")
