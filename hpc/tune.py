"""`hpc tune prefill`: the smallest prefill batch (tokens per forward) that saturates the engine, measured where the
engine runs, written into the prefill engine YAML; and the prefill and decode worker counts a target load needs.

NVIDIA's guidance for disaggregated serving is to run the prefill engine at the smallest batch that saturates the
GPUs: larger batches add TTFT and no throughput. The knee is the smallest size within KNEE of the best throughput
measured."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hpc.errors import HpcError

KNEE = 0.95


def knee(rows: list[dict], within: float = KNEE) -> dict:
    best = max(r["tokens_per_s"] for r in rows)
    return next(r for r in sorted(rows, key=lambda r: r["tokens"]) if r["tokens_per_s"] >= within * best)


def measure(engine: str, model: str, engine_config: Path | None, tokens: list[int], repeats: int,
            random_weights: bool, srun: list[str] | None = None, env: dict | None = None,
            timeout: float = 1800) -> list[dict]:
    """Runs `python -m workers.tune` here, or under `srun` (a step on an allocated GPU node)."""
    argv = [sys.executable, "-m", "workers.tune", "--engine", engine, "--model", model,
            "--tokens", ",".join(map(str, tokens)), "--repeats", str(repeats)]
    if engine_config:
        argv += ["--engine-config", str(engine_config)]
    if random_weights:
        argv.append("--random-weights")
    try:
        out = subprocess.run((srun or []) + argv, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise HpcError(f"the prefill measurement did not finish within {timeout:.0f} s") from None
    if out.returncode != 0:
        last = [line for line in out.stderr.splitlines() if line.strip()][-1:] or ["no output"]
        raise HpcError(f"the prefill measurement failed: {last[0]}")
    rows = json.loads(out.stdout.strip().splitlines()[-1])["rows"]
    reused = [r for r in rows if r["reused"]]
    if reused:
        raise HpcError(f"the prefix cache served {reused[0]['reused']} tokens at {reused[0]['tokens']} tokens: "
                       f"these are not compute figures")
    return rows


def set_yaml_fields(path: Path, fields: dict) -> str:
    """The engine YAML with top-level `fields` set (lines replaced in place, comments kept); returns the text."""
    text = path.read_text() if path.exists() else ""
    for key, value in fields.items():
        line = f"{key}: {value}"
        pattern = re.compile(rf"^{re.escape(key)}:.*$", re.MULTILINE)
        text = pattern.sub(line, text) if pattern.search(text) else (text.rstrip("\n") + "\n" + line + "\n").lstrip("\n")
    return text


def plot(rows: list[dict], chosen: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, [r["tokens_per_s"] / 1000 for r in rows], "o-", label="prefill k tokens/s")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per forward (max_num_tokens)")
    ax.set_ylabel("k tokens/s")
    ax.axvline(chosen["tokens"], color="gray", linestyle="--", label=f"knee: {chosen['tokens']}")
    ax2 = ax.twinx()
    ax2.plot(xs, [r["ttft_ms"] for r in rows], "s:", color="tab:red", label="TTFT ms")
    ax2.set_ylabel("TTFT ms")
    fig.legend(loc="upper left")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass(frozen=True)
class Recommendation:
    prefill_workers: int
    decode_workers: int
    decode_batch: int
    binding: str  # which limit decides each count
    detail: dict


def recommend(rate: float, isl: int, osl: int, prefill_tokens_per_s: float, prefill_ttft_s: float,
              decode_step_ms: float, decode_ms_per_sequence: float, ttft_limit_ms: float, itl_limit_ms: float,
              utilization: float = 0.8) -> Recommendation:
    """Workers for `rate` requests/s of ISL/OSL tokens. Prefill: enough workers that their load stays under
    `utilization` (queues grow without bound near 1), and the prefill itself fits the TTFT limit. Decode: the
    largest batch whose step time meets the ITL limit, and enough workers that rate x OSL tokens/s fit."""
    if prefill_ttft_s * 1000 > ttft_limit_ms:
        raise HpcError(f"one prefill at this batch takes {1000 * prefill_ttft_s:.0f} ms: over the TTFT limit of "
                       f"{ttft_limit_ms:g} ms before any queueing; tune for a smaller batch")
    if decode_step_ms >= itl_limit_ms:
        raise HpcError(f"a decode step takes {decode_step_ms:g} ms even at batch 1: over the ITL limit of "
                       f"{itl_limit_ms:g} ms")
    load = rate * isl / prefill_tokens_per_s  # prefill workers' worth of work
    prefill = max(1, math.ceil(load / utilization))
    batch = max(1, int((itl_limit_ms - decode_step_ms) / max(decode_ms_per_sequence, 1e-9)))
    per_worker = batch / ((decode_step_ms + decode_ms_per_sequence * batch) / 1000)  # tokens/s at that batch
    decode = max(1, math.ceil(rate * osl / per_worker))
    binding = (f"prefill: throughput ({load:.2f} workers of work at {100 * utilization:.0f}% utilization); decode: "
               f"the ITL limit caps the batch at {batch}, {per_worker:.0f} tokens/s per worker")
    return Recommendation(prefill, decode, batch, binding,
                          {"prefill_load": round(load, 3), "decode_tokens_per_s_per_worker": round(per_worker, 1)})
