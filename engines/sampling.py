"""Token sampling: greedy, temperature, top-k, top-p, with per-request seeds.

A seeded request draws token i from a generator seeded with (seed, i), not from one running generator, so the
tokens are the same whether one worker samples them all or a prefill worker samples the first and a decode worker
the rest."""

from __future__ import annotations

import torch

from engines.base import SamplingParams


def sample(logits: torch.Tensor, params: SamplingParams, step: int) -> int:
    """One token from a row of float32 logits; `step` is the index of the token among the generated ones."""
    if params.temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k > 0:
        k = min(params.top_k, logits.shape[-1])
        kth = torch.topk(logits, k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = cumulative - sorted_probs > params.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    gen = None
    if params.seed is not None:
        gen = torch.Generator(device="cpu").manual_seed((params.seed * 1_000_003 + step) % (2**63))
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))
