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


# ---- the double's vision tower -------------------------------------------------------------------------------------
def vision(model_dir: str) -> dict | None:
    """A vision-language checkpoint's image token and embedding shape; None for a text-only model. The double makes
    one embedding more per image than the frontend's LLaVA-1.5 count (an "image newline", as LLaVA-NeXT adds), so
    the adapter cannot lean on the frontend's count: TensorRT-LLM expands image tokens by its own rules."""
    data = json.loads((Path(model_dir) / "config.json").read_text())
    v = data.get("vision_config")
    if not v:
        return None
    text = data.get("text_config") or data
    return {"image_token_id": int(data.get("image_token_index", data.get("image_token_id"))),
            "hidden_size": int(text["hidden_size"]), "tokens": (v["image_size"] // v["patch_size"]) ** 2 + 1}


def encode_image(pixels: np.ndarray, info: dict) -> np.ndarray:
    """Embeddings [tokens, hidden] (float32) that depend on every pixel."""
    import hashlib

    seed = int.from_bytes(hashlib.sha256(pixels.tobytes() + str(pixels.shape).encode()).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal((info["tokens"], info["hidden_size"])).astype(np.float32)


def image_context(embeddings: np.ndarray, vocab: int) -> list[int]:
    """What the language model "sees" of each embedding row: its first 16 signs as a number (robust to any dtype
    the embeddings travelled in)."""
    bits = (np.asarray(embeddings, dtype=np.float32)[:, :16] > 0).astype(np.int64)
    return [int(b @ (1 << np.arange(16))) % vocab for b in bits]
