"""Commands without Slurm: serve (local processes) and bench (load generator)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from hpc.cli import app, console
from hpc.errors import HpcError


@app.command()
def serve(config: Path = typer.Argument(..., help="Deployment YAML"),
          port: int = typer.Option(0, help="Frontend port (0: a free one)"),
          host: str = typer.Option("127.0.0.1", help="Frontend address"),
          gpus: str = typer.Option("", help="GPUs to hand out, one per GPU worker in turn, e.g. 0,1 "
                                            "(default: every worker sees all)")) -> None:
    """Run a deployment on this machine without Slurm: etcd, NATS, workers and frontend as local processes.
    Ctrl-C stops everything."""
    import signal
    import threading

    from hpc.config import load_deployment
    from hpc.serve import LocalDeployment

    dep = load_deployment(config)
    from hpc import preflight

    preflight.check(dep, config, {}, slurm=False)
    local = LocalDeployment(dep, Path(".hpc") / "serve" / dep.name, port=port, host=host,
                            gpus=tuple(g.strip() for g in gpus.split(",") if g.strip()))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # Ctrl-C even when started in the background of a script, whose shell hands its children SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def ready(c) -> None:
        console.print(f"  [green]✓[/green] {c.name:12} {c.detail:28} {c.ready_after:5.1f} s")

    try:
        console.print(f"starting {dep.name} (model {dep.model.name})")
        local.start(ready)
        console.print(f"ready: model {dep.model.name} at [bold]{local.url}/v1[/bold]   (Ctrl-C to stop)")
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        # A second Ctrl-C (or the TERM a wrapper forwards) must not cut the cleanup short and orphan workers.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        console.print("stopping")
        stuck = local.stop()
        if stuck:
            raise HpcError(f"could not stop: {', '.join(stuck)}")


@app.command()
def bench(url: str = typer.Option(..., help="Frontend URL, e.g. http://n001:8000"),
          model: Optional[str] = typer.Option(None, help="Model name (default: the first served)"),
          isl: int = typer.Option(1000, help="Input tokens per request"),
          osl: int = typer.Option(100, help="Output tokens per request"),
          concurrency: str = typer.Option("1,4,16,64", help="Comma-separated concurrency levels (closed loop: "
                                                             "each stream sends its next request when one ends)"),
          rates: str = typer.Option("", help="Comma-separated request rates, requests/s, instead: open loop, "
                                             "Poisson arrivals whatever the server's pace (at most the largest "
                                             "--concurrency level in flight)"),
          requests: int = typer.Option(0, help="Requests per level (default: 4 x concurrency, at least 8; at a "
                                                "rate: 10 s of arrivals, at least 8)"),
          tokenizer: Optional[str] = typer.Option(None, help="Model directory with tokenizer.json "
                                                             "(default: the one the server reports)"),
          out: Path = typer.Option(Path("bench.json"), help="JSON results"),
          plot: Optional[Path] = typer.Option(None, help="Write a TTFT vs throughput PNG here"),
          svg: bool = typer.Option(False, "--svg", help="With --plot, an SVG beside the PNG"),
          gpus: int = typer.Option(0, help="GPUs serving (default: from the deployment launched here at this URL)"),
          slo_ttft_ms: Optional[float] = typer.Option(None, help="Goodput: TTFT limit per request, ms"),
          slo_itl_ms: Optional[float] = typer.Option(None, help="Goodput: limit on a request's mean time per "
                                                                "output token after the first (TPOT), ms"),
          export: Optional[Path] = typer.Option(None, help="Also write aiperf-style profile exports into this "
                                                          "folder, one subfolder per concurrency"),
          client_processes: int = typer.Option(1, min=1, help="Load-generating processes (a busy one's own "
                                                               "queueing shows in the latencies: see client_cores)"),
          timeout: float = typer.Option(600, help="Per-request timeout, seconds")) -> None:
    """Load-test a server: TTFT, ITL, TPOT, latency percentiles, throughput (per GPU) and goodput per
    concurrency."""
    import asyncio
    import json
    import time as clock

    from rich.progress import Progress

    from hpc import bench as b

    url = url.rstrip("/")
    levels = _numbers(concurrency, int, "--concurrency", "positive integers like 1,4,16")
    per_s = _numbers(rates, float, "--rates", "positive request rates like 50,100,200") if rates.strip() else []
    steps = [(max(levels), r) for r in per_s] if per_s else [(c, None) for c in levels]
    name, root = asyncio.run(b.discover(url, model, 10))
    first, vocab = b.vocabulary(tokenizer or root)
    gpus = gpus or _gpus_of_deployment_at(url)
    slo = b.Slo(slo_ttft_ms, slo_itl_ms)
    command = " ".join(["hpc", *sys.argv[1:]])
    rows = []
    with Progress(console=console, transient=True) as progress:
        for c, rate in steps:
            n = requests or max(8, int(10 * rate) if rate else 4 * c)
            task = progress.add_task(f"rate {rate:g}/s" if rate else f"concurrency {c}", total=n)
            prompts = b.make_prompts(n, isl, first, vocab, seed=int(rate * 1000) if rate else c)
            results, wall, cpu = b.run_level(url, name, prompts, osl, c, timeout, rate, client_processes,
                                             lambda: progress.advance(task))
            rows.append(b.summarize(c, results, wall, gpus, slo, rate, cpu, client_processes))
            if export:
                b.export_aiperf(export, results, wall, c, name, url, command, rate)
    table = Table("rate/s" if per_s else "conc", "req", "err", "TTFT p50/p90/p99 ms", "TPOT p50/p99 ms",
                  "ITL p50/p99 ms", "E2E p50/p99 ms", "out tok/s", "tok/s/GPU", "req/s", "goodput", "reused",
                  title=f"{name}  isl={isl} osl={osl}" + (f"  {gpus} GPUs" if gpus else ""))
    for r in rows:
        table.add_row(f"{r['rate_req_s']:g}" if per_s else str(r["concurrency"]), str(r["requests"]),
                      str(r["errors"]),
                      f"{r['ttft_p50_ms']}/{r['ttft_p90_ms']}/{r['ttft_p99_ms']}",
                      f"{r['tpot_p50_ms']}/{r['tpot_p99_ms']}", f"{r['itl_p50_ms']}/{r['itl_p99_ms']}",
                      f"{r['e2e_p50_ms']}/{r['e2e_p99_ms']}", str(r["output_tok_s"]),
                      str(r["output_tok_s_per_gpu"] or "-"), str(r["req_s"]), str(r["goodput_req_s"]),
                      f"{100 * r['reused_share']:.0f}%")
    console.print(table)
    if slo.ttft_ms is None and slo.itl_ms is None:
        console.print("goodput: no --slo-ttft-ms or --slo-itl-ms given, so every successful request counts")
    behind = [r for r in rows if (r.get("late_p99_ms") or 0) > 10]
    if behind:
        console.print(f"[yellow]the load generator fell behind:[/yellow] at {behind[0]['rate_req_s']:g} requests/s "
                      f"1% of requests left over {behind[0]['late_p99_ms']} ms after their arrival time (this "
                      f"machine's CPU, or --concurrency caps those in flight), so that row's rate was not offered")
    busy = [r for r in rows if (r.get("client_cores") or 0) >= 0.9]
    if busy:
        at = f"{busy[0]['rate_req_s']:g} requests/s" if per_s else f"concurrency {busy[0]['concurrency']}"
        console.print(f"[yellow]the load generator was busy:[/yellow] at {at} each of its processes used "
                      f"{busy[0]['client_cores']} of a core, so its own queueing is in the latencies: add "
                      f"--client-processes (on a machine with cores to spare)")
    if any(r["timing"] == "text" for r in rows):
        console.print("[yellow]timed by text:[/yellow] the server sent no usage per chunk "
                      "(stream_options.continuous_usage_stats), so a token with empty text is not seen")
    out.write_text(json.dumps({"url": url, "model": name, "isl": isl, "osl": osl, "gpus": gpus,
                               "date": clock.strftime("%Y-%m-%d"), "command": command, "rows": rows}, indent=2))
    console.print(f"results: {out}")
    run_dir = _run_dir_of_deployment_at(url)
    if run_dir:  # the run folder keeps what was measured against it
        kept = run_dir / "bench" / f"{clock.strftime('%Y%m%d-%H%M%S')}-{out.name}"
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text(out.read_text())
        console.print(f"kept in the run folder: {kept}")
    if export:
        console.print(f"aiperf-style exports: {export}/" + ("request_rate_R/" if per_s else "concurrency_N/"))
    if plot:
        b.plot(rows, plot, f"{name}: TTFT against throughput, ISL {isl} / OSL {osl}, "
                           f"{clock.strftime('%Y-%m-%d')}", svg)
        console.print(f"plot: {plot}")
    errors = [r.get("first_error") for r in rows if r["errors"]]
    if errors:
        raise HpcError(f"{sum(r['errors'] for r in rows)} requests failed; first: {errors[0]}")


def _numbers(text: str, kind: type, option: str, expected: str) -> list:
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise HpcError(f"{option} {text!r}: expected {expected}")
    return values


def _run_dir_of_deployment_at(url: str) -> Path | None:
    import json

    from hpc.launch import STATE_ROOT

    for state in STATE_ROOT.glob("*.json"):
        try:
            data = json.loads(state.read_text())
        except (OSError, ValueError):
            continue
        if (data.get("frontend_url") or "").rstrip("/") == url and data.get("run_dir"):
            return Path(data["run_dir"])
    return None


def _gpus_of_deployment_at(url: str) -> int:
    """The GPUs of the deployment launched from here whose frontend is at `url` (0 when none is)."""
    import json

    from hpc.config import load_deployment
    from hpc.launch import STATE_ROOT
    from hpc.plan import worker_gpus

    for state in STATE_ROOT.glob("*.json"):
        try:
            data = json.loads(state.read_text())
            if (data.get("frontend_url") or "").rstrip("/") == url:
                return worker_gpus(load_deployment(data["config"]))
        except (OSError, ValueError, KeyError, HpcError):
            continue
    return 0
