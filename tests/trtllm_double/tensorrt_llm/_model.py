"""The double's "model": a deterministic next-token rule, split by vocabulary shards the way tensor parallelism
splits the LM head, so several MPI ranks must each contribute to every token."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def load(model_dir: str) -> dict:
    """What a rank needs from the checkpoint: raises as TensorRT-LLM does when config.json is missing."""
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found: not a Hugging Face model directory")
    data = json.loads(config.read_text())
    text = data.get("text_config") or data
    eos = data.get("eos_token_id", text.get("eos_token_id"))
    return {"vocab_size": int(text["vocab_size"]), "eos_token_id": eos[0] if isinstance(eos, list) else eos}


def _context_key(context: list[int]) -> int:
    h = 1469598103934665603
    for t in context[-8:]:
        h = ((h ^ int(t)) * 1099511628211) % (1 << 61)
    return h % (1 << 32)


def shard_best(contexts: list[list[int]], lo: int, hi: int) -> list[tuple[int, int]]:
    """(score, token) of the best token in [lo, hi) for each context."""
    v = np.arange(lo, hi, dtype=np.uint64)
    out = []
    for ctx in contexts:
        scores = ((v * np.uint64(2654435761)) ^ np.uint64(_context_key(ctx))) % np.uint64(1000003)
        i = int(np.argmax(scores))
        out.append((int(scores[i]), lo + i))
    return out


def shard(vocab: int, rank: int, world: int) -> tuple[int, int]:
    return vocab * rank // world, vocab * (rank + 1) // world


def combine(per_rank: list[list[tuple[int, int]]]) -> list[int]:
    """The best token over all shards (ties: the lowest id)."""
    return [max(choices, key=lambda c: (c[0], -c[1]))[1] for choices in zip(*per_rank)]
