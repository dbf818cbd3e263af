"""Residual add + RMSNorm, and SiLU(gate) x up, as one Triton kernel each (GPUs with Triton; elsewhere the PyTorch
path in model.py). Like rotary.py, for decode steps, where each small kernel costs its few microseconds whatever
its size: these take three kernels a layer off the step."""

from __future__ import annotations

import torch

from engines.torch.paged_attention import triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _add_rms_norm(x_ptr, res_ptr, w_ptr, out_ptr, n, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < n
        x = tl.load(x_ptr + row * n + cols, mask=m, other=0.0)
        if HAS_RES:  # the sum rounded to the model's dtype first, as `residual + x` in PyTorch is
            x = (x.to(tl.float32) + tl.load(res_ptr + row * n + cols, mask=m, other=0.0).to(tl.float32))
            x = x.to(res_ptr.dtype.element_ty)
            tl.store(res_ptr + row * n + cols, x, mask=m)
        x = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / n + eps)
        w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n + cols, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _silu_mul(gu_ptr, out_ptr, n, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < n
        g = tl.load(gu_ptr + row * 2 * n + cols, mask=m, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * 2 * n + n + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n + cols, (g / (1.0 + tl.exp(-g)) * u).to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _chunk_argmax(x_ptr, val_ptr, idx_ptr, n, chunks, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        cols = chunk * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * n + cols, mask=cols < n, other=float("-inf"))
        best, at = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(val_ptr + row * chunks + chunk, best)
        tl.store(idx_ptr + row * chunks + chunk, chunk * BLOCK + at)

    @triton.jit
    def _row_argmax(val_ptr, idx_ptr, out_ptr, chunks, CHUNKS_PAD: tl.constexpr):
        row = tl.program_id(0)
        c = tl.arange(0, CHUNKS_PAD)
        v = tl.load(val_ptr + row * chunks + c, mask=c < chunks, other=float("-inf"))
        _, at = tl.max(v, 0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(out_ptr + row, tl.load(idx_ptr + row * chunks + at))


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm(residual + x) with `residual` updated in place to residual + x; RMSNorm(x) without one. x, residual
    [T, N] contiguous."""
    t, n = x.shape
    out = torch.empty_like(x)
    _add_rms_norm[(t,)](x, residual if residual is not None else x, weight, out, n, eps,
                        HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(n),
                        num_warps=16 if t <= 64 and n >= 4096 else 4)  # decode: 1.6 us a row of 4096, 2.0 with 4
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of gate_up [T, 2F] (gate first, as fuse_projections lays it out) -> [T, F]."""
    t, f2 = gate_up.shape
    f = f2 // 2
    out = torch.empty((t, f), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul[(t, triton.cdiv(f, block))](gate_up, out, f, BLOCK=block)
    return out


ARGMAX_CHUNK = 4096


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """The first index of each row's largest value, as torch.argmax(dim=-1) gives it: in two small kernels over
    chunks of the row (torch's one reduction took 26 us for a 128k vocabulary, in every decode step)."""
    if triton is None or not logits.is_cuda:
        return logits.argmax(dim=-1)
    rows, n = logits.shape
    chunks = triton.cdiv(n, ARGMAX_CHUNK)
    vals = torch.empty((rows, chunks), dtype=logits.dtype, device=logits.device)
    idx = torch.empty((rows, chunks), dtype=torch.long, device=logits.device)
    _chunk_argmax[(rows, chunks)](logits.contiguous(), vals, idx, n, chunks, BLOCK=ARGMAX_CHUNK)
    out = torch.empty(rows, dtype=torch.long, device=logits.device)
    _row_argmax[(rows,)](vals, idx, out, chunks, CHUNKS_PAD=triton.next_power_of_2(chunks))
    return out
