"""Shared by the GPU benchmarks: the Llama-3-8B shape, random-weight model directories, result files."""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "max_position_embeddings": 131072, "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
}

# The engine YAML of a mocker that takes no time (the frontend benchmarks). Its prefix cache is off on purpose: the
# benchmarks send a prompt more than once (warm-up, straight to the workers), and no reused token should touch a
# measured one.
ZERO = ("mocker: {prefill_tokens_per_s: 1.0e12, prefill_overhead_ms: 0, decode_step_ms: 0, "
        "decode_ms_per_sequence: 0, decode_ms_per_1k_context: 0, kv_bytes_per_token: 64, vocab_size: 500}\n"
        "max_batch_size: 256\nkv_cache_config: {enable_block_reuse: false}\n")


def model_dir(layers: int = 32) -> Path:
    """A config-only model directory; engines built with random_weights=True need nothing else."""
    d = Path(tempfile.mkdtemp(prefix="llama3-8b-shape-"))
    (d / "config.json").write_text(json.dumps({**LLAMA3_8B, "num_hidden_layers": layers}))
    return d


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def write_result(name: str, rows: list[dict], meta: dict) -> Path:
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"command": " ".join([Path(sys.executable).name] + sys.argv), "date": time.strftime(
        "%Y-%m-%d %H:%M:%S"), "host": platform.node(), "gpu": gpu_name(), **meta, "rows": rows}, indent=2))
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    lines = [" | ".join(c.rjust(widths[c]) for c in columns), "-+-".join("-" * widths[c] for c in columns)]
    lines += [" | ".join(str(r.get(c, "")).rjust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


Readings = dict[int, tuple[str, float]]  # pid -> (the name of its root, CPU seconds): what process_cpu returns


def process_cpu(roots: dict[str, int]) -> Readings:
    """CPU time (user + system) used so far by each process of `roots` (name: pid) and of all their descendants,
    from /proc, whatever language it is written in: pid -> (the name of its root, seconds)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue  # it has just exited
            fields = stat[stat.rindex(")") + 2 :].split()
            stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)  # ppid, utime+stime
    found, todo = {}, [(pid, name) for name, pid in roots.items() if pid in stats]
    while todo:
        pid, name = todo.pop()
        found[pid] = (name, stats[pid][1])
        todo.extend((p, name) for p, (ppid, _) in stats.items() if ppid == pid and p not in found)
    return found


def cpu_used(before: Readings, after: Readings) -> Readings:
    """Each process's CPU seconds between two `process_cpu` readings (one started in between: all of its own)."""
    return {pid: (name, cpu - before.get(pid, (name, 0.0))[1]) for pid, (name, cpu) in after.items()}


def delayed_acks() -> int:
    """TCP ACKs this host's kernel has held back so far (TcpExt DelayedACKs, /proc/net/netstat). A sender that
    leaves Nagle's algorithm on waits for one of these: 40 ms at least on Linux. Host-wide, so read it around a
    run with nothing else talking."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split()[1:], values.split()[1:]))["DelayedACKs"])
    raise RuntimeError("/proc/net/netstat has no TcpExt line")
