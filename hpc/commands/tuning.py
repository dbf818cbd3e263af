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
        records, workers = read_trace(trace, window), {}
    else:
        base = _frontend_url(deployment, url)
        try:
            records, workers = fetch(base, window)
        except OSError as e:
            raise HpcError(f"cannot read the frontend's stages at {base}: {e}") from None
    summary, findings = run(records, workers)
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
