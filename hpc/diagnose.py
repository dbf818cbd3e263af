"""`hpc diagnose`: which engine holds TTFT back, and why, from the stages of the requests a deployment served.

The frontend records each request's stages (durations measured on one host each, never a difference of two hosts'
clocks): preprocess (tokenize, media) and the prefill round trip as the frontend sees them; the prefill worker's
own queue wait, compute and encode; in disaggregated serving also the decode side's KV transfer and first decode
step. In hpc the first token comes from the prefill worker, so those two are part of the time to the second token,
not of TTFT, and are reported as such. The input is the frontend's window (`/stats/requests`, `/stats/workers`) or
a trace file (the JSONL the frontend writes to the run folder)."""

from __future__ import annotations

import json
import statistics
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from hpc.runtime.cpu_wait import SHORT_OF_CORES

SLOW_FACTOR = 1.5  # a worker this much slower per 1k tokens than its peers' median is slow
OVERLOAD_SHARE = 1.5  # a worker receiving this multiple of its fair share
QUEUE_SHARE = 0.5  # queue wait as a share of TTFT that means saturated
TRANSFER_SHARE = 0.3  # KV transfer as a share of the time to the second token
DECODE_SHARE = 0.3
KV_FULL = 0.9
DISPATCH_SHARE = 0.5  # network and dispatch as a share of TTFT that means the processes, not the engines, hold it
DISPATCH_MIN = 0.005  # and at least this many seconds: a few ms of messaging are the floor of a healthy path


@dataclass
class Finding:
    kind: str  # compute | queue wait | dispatch | KV transfer | decode | healthy | no data
    worker: str | None
    message: str
    evidence: dict = field(default_factory=dict)


def fetch(url: str, window: float, timeout: float = 5.0) -> tuple[list[dict], dict, dict | None]:
    """The frontend's requests of the last `window` seconds, its workers, and its event loops' CPU (/stats)."""
    def get(path: str):
        with urllib.request.urlopen(f"{url.rstrip('/')}{path}", timeout=timeout) as r:
            return json.loads(r.read())

    return (get(f"/stats/requests?window={window:g}")["requests"], get("/stats/workers"),
            get("/stats").get("cpu"))


def read_trace(path: Path, window: float | None = None) -> list[dict]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if window and records:
        last = max(r["time"] for r in records)
        records = [r for r in records if r["time"] >= last - window]
    return records


def p(values: list[float], q: float) -> float | None:
    values = sorted(v for v in values if v is not None)
    return values[min(len(values) - 1, int(q * len(values)))] if values else None


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 2)


def per_worker(records: list[dict]) -> dict[str, dict]:
    """For each prefill (or aggregated) worker: requests, host, queue wait and compute per 1k computed tokens."""
    out: dict[str, dict] = {}
    for r in records:
        w = r.get("prefill_worker")
        if not w:
            continue
        stages = r.get("prefill") or {}
        computed = max(1, r["prompt_tokens"] - r.get("cached_tokens", 0))
        row = out.setdefault(w, {"host": r.get("prefill_host"), "gpus": r.get("prefill_gpus") or [], "n": 0,
                                 "queue": [], "compute_per_1k": [], "ttft": [], "queue_share": []})
        row["n"] += 1
        row["ttft"].append(r["ttft"])
        if "queue" in stages:
            row["queue"].append(stages["queue"])
            row["queue_share"].append(stages["queue"] / r["ttft"] if r["ttft"] else 0)
        if "compute" in stages:
            row["compute_per_1k"].append(stages["compute"] / computed * 1000)
    return out


def decode_pairs(records: list[dict]) -> dict[tuple[str, str], dict]:
    out: dict[tuple[str, str], dict] = {}
    for r in records:
        d = r.get("decode") or {}
        if "kv_transfer" not in d or not r.get("second_token"):
            continue
        row = out.setdefault((r.get("prefill_host"), r.get("decode_host")), {"transfer": [], "gbps": [],
                                                                              "share": []})
        row["transfer"].append(d["kv_transfer"])
        row["share"].append(d["kv_transfer"] / r["second_token"])
        if d["kv_transfer"] > 0:
            row["gbps"].append(d.get("kv_bytes", 0) / d["kv_transfer"] / 1e9)
    return out


def _where(name: str, row: dict) -> str:
    gpus = row.get("gpus") or []
    return f"{name} on {row.get('host') or '?'}" + (f" (GPUs {','.join(map(str, gpus))})" if gpus else "")


def engine_seconds(record: dict) -> float:
    """The part of a request's TTFT its prefill (or aggregated) worker reports: queue, compute, encode."""
    return sum((record.get("prefill") or {}).get(k, 0.0) for k in ("queue", "compute", "encode"))


def diagnose(records: list[dict], workers: dict | None = None,
             frontend_cpu: dict | None = None) -> tuple[dict, list[Finding]]:
    """A summary (TTFT p50/p99 and its parts) and the findings, worst first; [healthy] when nothing holds TTFT.
    `workers` and `frontend_cpu` as `fetch` gives them (a trace file has neither)."""
    workers = workers or {}
    if not records:
        return {"requests": 0}, [Finding("no data", None, "no requests in the window: send traffic, or widen "
                                                          "--window")]
    ttft = [r["ttft"] for r in records]
    stage = {name: [(r.get("prefill") or {}).get(name, 0.0) for r in records] for name in ("queue", "compute",
                                                                                               "encode")}
    other = [r["ttft"] - r["preprocess"] - engine_seconds(r) for r in records]
    summary = {"requests": len(records), "ttft_p50_ms": ms(p(ttft, 0.5)), "ttft_p99_ms": ms(p(ttft, 0.99)),
               "stages_p50_ms": {"preprocess": ms(p([r["preprocess"] for r in records], 0.5)),
                                 **{k: ms(p(v, 0.5)) for k, v in stage.items()},
                                 "network and dispatch": ms(p(other, 0.5))},
               "stages_p99_ms": {"preprocess": ms(p([r["preprocess"] for r in records], 0.99)),
                                 **{k: ms(p(v, 0.99)) for k, v in stage.items()},
                                 "network and dispatch": ms(p(other, 0.99))}}
    second = [r["second_token"] for r in records if r.get("second_token")]
    if any(r.get("decode") for r in records):
        summary["second_token_p50_ms"] = ms(p(second, 0.5))
        summary["kv_wait_p50_ms"] = ms(p([(r.get("decode") or {}).get("kv_wait") for r in records], 0.5))
        summary["kv_transfer_p50_ms"] = ms(p([(r.get("decode") or {}).get("kv_transfer") for r in records], 0.5))
        summary["decode_first_p50_ms"] = ms(p([(r.get("decode") or {}).get("decode_first") for r in records], 0.5))
    rows = per_worker(records)
    summary["workers"] = {w: {"host": row["host"], "requests": row["n"], "queue_p50_ms": ms(p(row["queue"], 0.5)),
                              "compute_ms_per_1k_tokens": ms(p(row["compute_per_1k"], 0.5)),
                              "ttft_p50_ms": ms(p(row["ttft"], 0.5))} for w, row in sorted(rows.items())}
    findings = _slow(rows) + _overloaded(rows, workers) + _saturated(rows, workers) \
        + _dispatch(records, workers, frontend_cpu) + _transfer(records) + _kv_full(records) + _decode(records, workers)
    return summary, findings or [Finding("healthy", None, "TTFT is the prefill compute itself; nothing to fix",
                                         {"compute_p50_ms": ms(p(stage["compute"], 0.5)),
                                          "ttft_p50_ms": ms(p(ttft, 0.5))})]


def _slow(rows: dict) -> list[Finding]:
    speed = {w: p(r["compute_per_1k"], 0.5) for w, r in rows.items() if r["compute_per_1k"]}
    out = []
    for w, s in speed.items():
        peers = [v for k, v in speed.items() if k != w]
        if peers and s > SLOW_FACTOR * statistics.median(peers):
            peer = statistics.median(peers)
            out.append(Finding("compute", w, f"{_where(w, rows[w])} takes {1000 * s:.0f} ms per 1k prompt tokens; "
                                             f"its peers take {1000 * peer:.0f}: a slow node or GPU",
                               {"ms_per_1k": round(1000 * s, 1), "peers_ms_per_1k": round(1000 * peer, 1)}))
    return out


def _prefill_names(rows: dict, workers: dict) -> set[str]:
    """Every prefill (or aggregated) worker: those that served requests and those registered that got none."""
    return set(rows) | {w for w, info in workers.items() if info.get("role") in ("prefill", "aggregated")}


def _overloaded(rows: dict, workers: dict) -> list[Finding]:
    total = sum(r["n"] for r in rows.values())
    names = _prefill_names(rows, workers)
    out = []
    for w, r in rows.items():
        if len(names) < 2 or not r["queue"]:
            continue
        share, fair = r["n"] / total, 1 / len(names)
        peer_queues = [q for k, x in rows.items() if k != w for q in x["queue"]]
        mine, theirs = p(r["queue"], 0.5), p(peer_queues, 0.5) or 0.0  # a peer that got nothing waited for nothing
        if share > OVERLOAD_SHARE * fair and mine > 3 * theirs and mine > 0.1 * p(r["ttft"], 0.5):
            out.append(Finding("queue wait", w, f"{_where(w, r)} receives {share / fair:.1f}x its share: queue wait "
                                                f"p50 {1000 * mine:.0f} ms vs {1000 * theirs:.0f} ms on its peers "
                                                f"(the router sends it more than it can take)",
                               {"share": round(share, 3), "fair_share": round(fair, 3),
                                "queue_p50_ms": ms(mine), "peers_queue_p50_ms": ms(theirs)}))
    return out


def _saturated(rows: dict, workers: dict) -> list[Finding]:
    shares = {w: p(r["queue_share"], 0.5) for w, r in rows.items() if r["queue_share"]}
    if shares and set(shares) == _prefill_names(rows, workers) and all(s >= QUEUE_SHARE for s in shares.values()):
        low = min(shares.values())
        return [Finding("queue wait", None, f"queue wait is {100 * low:.0f}% of TTFT or more on every prefill "
                                            f"worker: add prefill workers or raise max_num_tokens",
                        {"queue_share_p50": {w: round(s, 3) for w, s in shares.items()}})]
    return []


def _dispatch(records: list[dict], workers: dict, frontend_cpu: dict | None) -> list[Finding]:
    """TTFT spent outside the engines: in the round trip to the worker beyond its queue and compute (the connection,
    the worker's event loop), or in the frontend after the worker answered (its event loop). Where the processes'
    event loops waited for a CPU, that is the likely cause, and the finding says which."""
    ttft = p([r["ttft"] for r in records], 0.5)
    other = p([r["ttft"] - r["preprocess"] - engine_seconds(r) for r in records], 0.5)
    if not ttft or other < DISPATCH_MIN or other < DISPATCH_SHARE * ttft:
        return []
    timed = [r for r in records if r.get("prefill_rtt") is not None]
    to_worker = p([r["prefill_rtt"] - engine_seconds(r) for r in timed], 0.5) or 0.0
    in_frontend = p([r["ttft"] - r["preprocess"] - r["prefill_rtt"] for r in timed], 0.5) or 0.0
    evidence = {"ttft_p50_ms": ms(ttft), "dispatch_p50_ms": ms(other), "worker_round_trip_p50_ms": ms(to_worker),
                "frontend_after_worker_p50_ms": ms(in_frontend),
                "engine_p50_ms": ms(p([engine_seconds(r) for r in records], 0.5))}
    head = (f"{1000 * other:.1f} ms of the {1000 * ttft:.1f} ms TTFT p50 is outside the engines (their queue and "
            f"compute: {evidence['engine_p50_ms']} ms): ")
    waiting = {f"worker {w}": info["cpu_waiting"] for w, info in sorted(workers.items())
               if info.get("cpu_waiting") is not None}
    if frontend_cpu:
        waiting = {"the frontend processes (the one that waited most)": frontend_cpu["waiting"], **waiting}
    evidence["cpu_waiting"] = waiting
    if to_worker >= in_frontend:
        why = (f"{1000 * to_worker:.1f} ms in the round trip to the workers beyond their engines (the connection, the "
               f"workers' event loops): worker processes short of CPU (a busy host, many streams per worker) or a "
               f"slow network path")
    else:
        why = (f"{1000 * in_frontend:.1f} ms in the frontend after the worker answered (its event loop): add "
               f"frontend processes (frontend.processes) or cores on the head node")
    starved = {who: share for who, share in waiting.items() if share >= SHORT_OF_CORES}
    if starved:
        why += ("; short of cores: " + ", ".join(f"{who} waited for a CPU {100 * share:.0f}% of the time"
                                                 for who, share in starved.items())
                + ": give them more cores (fewer busy processes on their nodes, or more CPUs for their Slurm steps)")
    return [Finding("dispatch", None, head + why, evidence)]


def _transfer(records: list[dict]) -> list[Finding]:
    pairs = decode_pairs(records)
    out = []
    for (src, dst), r in pairs.items():
        share = p(r["share"], 0.5)
        if share is not None and share >= TRANSFER_SHARE:
            gbps = p(r["gbps"], 0.5) or 0.0
            others = [p(x["gbps"], 0.5) for k, x in pairs.items() if k != (src, dst) and x["gbps"]]
            versus = f" against {max(others):.1f} GB/s on other pairs" if others else ""
            out.append(Finding("KV transfer", None, f"KV transfer is {100 * share:.0f}% of the time to the second "
                                                    f"token between {src} and {dst}: {gbps:.2f} GB/s{versus}",
                               {"share": round(share, 3), "gbps": round(gbps, 3),
                                "transfer_p50_ms": ms(p(r["transfer"], 0.5))}))
    return out


def _decode_stage(records: list[dict], stage: str) -> list[tuple[float, float, str | None]]:
    """(a decode-side stage's seconds, the time to the second token, the decode worker) of each request with both."""
    return [(r["decode"][stage], r["second_token"], r.get("decode_worker"))
            for r in records if (r.get("decode") or {}).get(stage) is not None and r.get("second_token")]


def _kv_full(records: list[dict]) -> list[Finding]:
    """Decode requests that waited for room in a full KV cache (the decode worker measures the wait)."""
    waits = _decode_stage(records, "kv_wait")
    share = p([w / s for w, s, _ in waits], 0.5)
    if share is None or share < DECODE_SHARE:
        return []
    by_worker: dict[str, list[float]] = {}
    for w, _, worker in waits:
        by_worker.setdefault(worker or "?", []).append(w)
    worst = max(by_worker, key=lambda k: p(by_worker[k], 0.5))
    wait = p([w for w, _, _ in waits], 0.5)
    return [Finding("decode KV full", worst, f"decode requests wait {1000 * wait:.0f} ms (p50) for room in the decode "
                                             f"workers' KV cache, {100 * share:.0f}% of the time to the second token: "
                                             f"add decode workers, or give them more KV blocks (num_kv_blocks, "
                                             f"kv_cache_config.free_gpu_memory_fraction)",
                    {"kv_wait_p50_ms": ms(wait), "share": round(share, 3),
                     "kv_wait_p50_ms_by_worker": {k: ms(p(v, 0.5)) for k, v in sorted(by_worker.items())}})]


def _decode(records: list[dict], workers: dict) -> list[Finding]:
    waits = _decode_stage(records, "decode_first")
    if not waits:
        return []
    share = p([w / s for w, s, _ in waits], 0.5)
    wait = p([w for w, _, _ in waits], 0.5)
    full = {w: (1 - info["kv_blocks_free"] / info["kv_blocks_total"], info.get("running") or 0)
            for w, info in workers.items() if info.get("role") == "decode" and info.get("kv_blocks_total")}
    busiest = max(full.items(), key=lambda kv: kv[1][0], default=(None, (0.0, 0)))
    batch_full = any((info.get("running") or 0) > (info.get("max_batch_size") or 1 << 30)
                     for info in workers.values() if info.get("role") == "decode")
    if share >= DECODE_SHARE and (busiest[1][0] >= KV_FULL or batch_full or wait > 0.05):
        why = (f"decode workers are full (KV blocks {100 * busiest[1][0]:.0f}% used on {busiest[0]})"
               if busiest[1][0] >= KV_FULL else "decode workers run more requests than their batch takes"
               if batch_full else "the decode batch is slow to take new requests")
        return [Finding("decode", busiest[0], f"the first decode step waits {1000 * wait:.0f} ms "
                                              f"({100 * share:.0f}% of the time to the second token): {why}",
                        {"decode_first_p50_ms": ms(wait), "share": round(share, 3),
                         "kv_used": {w: round(u, 3) for w, (u, _) in full.items()}})]
    return []
