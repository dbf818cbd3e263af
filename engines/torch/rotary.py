"""Rotary embedding of q and k, and the new tokens' k and v written to the paged pool, in one Triton kernel (GPUs
with Triton; elsewhere the PyTorch path in model.py).

In PyTorch that is about a dozen small kernels a layer (the products, the half rotation, its negation and
concatenation, two indexed writes). At decode a step is latency-bound: every small kernel costs a few
microseconds whatever its size, about 1,100 of them a step for a 32-layer model. This kernel replaces them with
one per layer, computing the angles from the positions itself (in float32)."""

from __future__ import annotations

import torch

from engines.torch.paged_attention import triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _rope_and_store(q_ptr, k_ptr, v_ptr, pos_ptr, inv_freq_ptr, pool_ptr, slot_block_ptr, slot_off_ptr,
                        layer_offset, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                        stride_block, stride_kv, stride_token, stride_head,
                        H: tl.constexpr, KVH: tl.constexpr, H_PAD: tl.constexpr, KVH_PAD: tl.constexpr,
                        HALF: tl.constexpr, HALF_PAD: tl.constexpr):
        t = tl.program_id(0)
        i = tl.arange(0, HALF_PAD)
        used = i < HALF
        angle = tl.load(pos_ptr + t).to(tl.float32) * tl.load(inv_freq_ptr + i, mask=used, other=0.0)
        cos = tl.cos(angle)[None, :]
        sin = tl.sin(angle)[None, :]
        # q, in place: x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin (Hugging Face's rotate_half convention)
        h = tl.arange(0, H_PAD)[:, None]
        m = (h < H) & used[None, :]
        q1p = q_ptr + t * stride_qt + h * stride_qh + i[None, :]
        q1 = tl.load(q1p, mask=m, other=0.0).to(tl.float32)
        q2 = tl.load(q1p + HALF, mask=m, other=0.0).to(tl.float32)
        tl.store(q1p, (q1 * cos - q2 * sin).to(q_ptr.dtype.element_ty), mask=m)
        tl.store(q1p + HALF, (q2 * cos + q1 * sin).to(q_ptr.dtype.element_ty), mask=m)
        # k: rotated, in place and into the pool; v: into the pool
        g = tl.arange(0, KVH_PAD)[:, None]
        mk = (g < KVH) & used[None, :]
        k1p = k_ptr + t * stride_kt + g * stride_kh + i[None, :]
        k1 = tl.load(k1p, mask=mk, other=0.0).to(tl.float32)
        k2 = tl.load(k1p + HALF, mask=mk, other=0.0).to(tl.float32)
        r1 = (k1 * cos - k2 * sin).to(k_ptr.dtype.element_ty)
        r2 = (k2 * cos + k1 * sin).to(k_ptr.dtype.element_ty)
        tl.store(k1p, r1, mask=mk)
        tl.store(k1p + HALF, r2, mask=mk)
        block = tl.load(slot_block_ptr + t)
        slot = (pool_ptr + layer_offset + block * stride_block + tl.load(slot_off_ptr + t) * stride_token
                + g * stride_head + i[None, :])
        tl.store(slot, r1, mask=mk)
        tl.store(slot + HALF, r2, mask=mk)
        v1p = v_ptr + t * stride_vt + g * stride_vh + i[None, :]
        tl.store(slot + stride_kv, tl.load(v1p, mask=mk, other=0.0), mask=mk)
        tl.store(slot + stride_kv + HALF, tl.load(v1p + HALF, mask=mk, other=0.0), mask=mk)


def rope_and_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                   inv_freq: torch.Tensor, pool: torch.Tensor, layer: int, slot_block: torch.Tensor,
                   slot_off: torch.Tensor) -> None:
    """q [T, H, D] and k [T, KVH, D] rotated in place (views with unit stride in the last dimension); k and v of
    token t written to pool[slot_block[t], layer, 0 / 1, slot_off[t]]."""
    t, h, d = q.shape
    kvh = k.shape[1]
    half = d // 2
    _rope_and_store[(t,)](
        q, k, v, positions, inv_freq, pool, slot_block, slot_off, layer * pool.stride(1),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        pool.stride(0), pool.stride(2), pool.stride(3), pool.stride(4),
        H=h, KVH=kvh, H_PAD=triton.next_power_of_2(h), KVH_PAD=triton.next_power_of_2(kvh), HALF=half,
        HALF_PAD=triton.next_power_of_2(half),
        num_warps=2 if t <= 64 else 4)  # a decode step's few tokens: 2.7 us on an H200, 3.6 with 4 warps
