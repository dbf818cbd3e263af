"""What `hpc status` shows: every component of a launched deployment (node, Slurm step, state, restarts), each
worker's load from the reports it publishes on NATS (queue, running, KV blocks, prefill and decode tokens/s) and
the frontend's last minute (requests/s, TTFT and ITL p50/p99). A snapshot is plain data (`--json`); `render` makes
the rich view that `--watch` refreshes."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

from rich.console import Group
from rich.table import Table
from rich.text import Text

from hpc.errors import HpcError
from hpc.launch import LaunchState
from hpc.runtime.cpu_wait import SHORT_OF_CORES
from hpc.slurm import commands


def snapshot(state: LaunchState, env: dict, listen_s: float = 1.0) -> dict:
    job = commands.job_state(state.job_id, env) if state.job_id else None
    steps = commands.job_steps(state.job_id, env) if job else {}
    live = bool(state.endpoints and job)
    registered, loads = asyncio.run(_from_services(state, listen_s)) if live else (None, {})
    components = []
    for name, info in state.steps.items():
        sid = steps.get(f"hpc.{state.deployment}.{name}")
        if info.get("given_up"):
            status = "given up"
        elif info.get("retiring"):
            status = "stopping"
        elif sid:
            status = "running"
        else:
            status = "restarting" if job else "gone"
        row = {"name": name, "role": info.get("role"), "nodes": info["nodes"], "step": sid, "state": status,
               "restarts": len(info.get("restarts", [])),
               "last_restart": info["restarts"][-1]["cause"] if info.get("restarts") else None,
               "given_up": info.get("given_up"), "tail": info.get("tail")}
        if info.get("role"):
            row["registered"] = None if registered is None else name in registered
            row["load"] = loads.get(name)
        components.append(row)
    return {"deployment": state.deployment, "job": state.job_id, "job_state": job, "run_dir": state.run_dir,
            "supervisor": _supervisor(state),
            "frontend_url": state.frontend_url, "components": components,
            "frontend": _frontend(state.frontend_url) if live else None, "time": time.time()}


def _supervisor(state: LaunchState) -> str:
    """Whether something restarts this deployment's steps: running, gone, or on another host (unknown here)."""
    import socket

    from hpc.procs import Pid

    sup = state.supervisor
    if not sup:
        return "none"
    if sup.get("host") != socket.gethostname():
        return f"on {sup.get('host')}"
    return "running" if Pid(sup["pid"], sup["start"]).alive() else "gone"


def _get_json(url: str, timeout: float = 3) -> tuple[int, dict | None]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read())
        except ValueError:
            return e.code, None
    except (OSError, ValueError):
        return 0, None


def _frontend(url: str | None) -> dict | None:
    if not url:
        return None
    code, health = _get_json(f"{url}/health")
    _, recent = _get_json(f"{url}/stats")
    return {"health": (health or {}).get("status", "unreachable" if code == 0 else f"HTTP {code}"),
            "models": (health or {}).get("models"), "last_minute": recent}


async def _from_services(state: LaunchState, listen_s: float) -> tuple[set[str] | None, dict]:
    """Registered worker ids (etcd) and each worker's load over `listen_s` (its reports on NATS, every 0.25 s)."""
    from hpc.runtime.messaging import Bus
    from hpc.runtime.protocol import Subjects, decode_reply
    from hpc.supervise import credentials_of, registered_workers

    creds = credentials_of(state)
    registered = await registered_workers(state.deployment, state.endpoints["etcd"], creds)
    reports: dict[str, list[tuple[float, object]]] = {}
    try:
        bus = await Bus.connect(state.endpoints["nats"], "hpc-status", timeout=2, credentials=creds)
    except HpcError:
        return registered, {}

    async def on_load(msg) -> None:
        stats = decode_reply(msg.data)
        reports.setdefault(stats.worker_id, []).append((time.monotonic(), stats))

    try:
        await bus.subscribe(Subjects(state.deployment).load_all(), on_load)
        await asyncio.sleep(listen_s)
    finally:
        await bus.close()
    return registered, {wid: _load(seen) for wid, seen in reports.items()}


def _load(seen: list[tuple[float, object]]) -> dict:
    (t0, first), (t1, last) = seen[0], seen[-1]
    dt = t1 - t0
    rate = (lambda a, b: round((b - a) / dt, 1)) if dt > 0 else (lambda a, b: None)
    return {"waiting": last.waiting, "running": last.running, "kv_blocks_used": last.kv_blocks_total
            - last.kv_blocks_free, "kv_blocks_total": last.kv_blocks_total,
            "prefill_tok_s": rate(first.prompt_tokens, last.prompt_tokens),
            "decode_tok_s": rate(first.generated_tokens, last.generated_tokens), "cpu_waiting": last.cpu_waiting}


COLORS = {"running": "green", "restarting": "yellow", "stopping": "yellow", "given up": "red", "gone": "red"}


def render(snap: dict) -> Group:
    head = Text.from_markup(f"deployment [bold]{snap['deployment']}[/bold]  job {snap['job']} "
                            f"({snap['job_state'] or 'gone'})  frontend {snap['frontend_url']}  "
                            f"run {snap['run_dir'] or '-'}")
    table = Table("component", "nodes", "step", "state", "restarts", "etcd", "queue", "run", "KV used",
                  "prefill/s", "decode/s", "CPU wait", title="tokens/s over the last reports; CPU wait: the share of "
                  "the time the event loop waited for a CPU", title_justify="right")
    for c in snap["components"]:
        load = c.get("load") or {}
        reg = {None: "", True: "[green]yes[/green]", False: "[red]no[/red]"}[c.get("registered")]
        kv = (f"{load['kv_blocks_used']}/{load['kv_blocks_total']}" if load.get("kv_blocks_total") else "")
        color = COLORS.get(c["state"], "white")
        table.add_row(c["name"], ",".join(c["nodes"]), c["step"] or "-", f"[{color}]{c['state']}[/{color}]",
                      str(c["restarts"]) if c["restarts"] else "", reg, _num(load.get("waiting")),
                      _num(load.get("running")), kv, _num(load.get("prefill_tok_s")), _num(load.get("decode_tok_s")),
                      _share(load.get("cpu_waiting")))
    parts = [head, table]
    if snap.get("supervisor") in ("gone", "none") and snap.get("job_state"):
        parts.append(Text(f"supervisor: {snap['supervisor']}: nothing restarts steps that die (start one with "
                          f"`python -m hpc.supervise {snap['deployment']}`)", style="red"))
    fe = snap.get("frontend")
    if fe:
        m = fe.get("last_minute") or {}
        parts.append(Text(f"frontend: {fe['health']}; last minute: {m.get('requests', 0)} requests "
                          f"({m.get('req_s', 0)}/s, {m.get('errors', 0)} errors), TTFT p50/p99 "
                          f"{_num(m.get('ttft_p50_ms'), '-')}/{_num(m.get('ttft_p99_ms'), '-')} ms, ITL p50/p99 "
                          f"{_num(m.get('itl_p50_ms'), '-')}/{_num(m.get('itl_p99_ms'), '-')} ms"))
        if m.get("direct"):
            parts.append(_direct_line(m["direct"]))
        if m.get("cpu"):
            parts.append(_cpu_line(m["cpu"]))
    for c in snap["components"]:
        if c.get("given_up"):
            parts.append(Text(f"{c['name']} was given up ({c['given_up']}); its last lines:\n{c['tail']}",
                              style="red"))
        elif c.get("last_restart"):
            parts.append(Text(f"{c['name']}: last restart because {c['last_restart']}", style="yellow"))
    return Group(*parts)


def _direct_line(d: dict) -> Text:
    """The frontend processes' direct connections to workers (counted once per process and worker)."""
    if not d.get("enabled"):
        return Text("direct connections: off (frontend.direct_connections: false): requests go through NATS")
    labels = {"open": "open", "opening": "opening", "none": "not used yet", "failing": "failing"}
    line = "direct connections (one per frontend process and worker): " + ", ".join(
        f"{d.get(state, 0)} {label}" for state, label in labels.items() if d.get(state) or state == "open")
    if d.get("failing"):
        return Text(line + ": those workers' requests go through NATS; the frontend's log says why (`hpc doctor` "
                           "checks that the head node reaches the other nodes' ports)", style="yellow")
    return Text(line)


def _cpu_line(cpu: dict) -> Text:
    """The frontend processes' event loops over the last seconds: CPU used, and the most any waited for a CPU."""
    line = (f"frontend event loops, last 10 s: {cpu['cores']:.2f} cores busy; the one that waited most waited for a "
            f"CPU {100 * cpu['waiting']:.0f}% of the time")
    if cpu["waiting"] >= SHORT_OF_CORES:
        return Text(line + ": the head node is short of cores, and requests wait for a CPU, not for the engines "
                           "(more cores, or fewer busy processes on it)", style="yellow")
    return Text(line)


def _share(v) -> str:
    if v is None:
        return ""
    text = f"{100 * v:.0f}%"
    return f"[yellow]{text}[/yellow]" if v >= SHORT_OF_CORES else text


def _num(v, missing: str = "") -> str:
    return missing if v is None else str(v)
