"""Matrix products with few rows, as in a decode step (one row per sequence), as a Triton kernel (GPUs with Triton).

At batch 1 a decode step is the weights read once; each projection is a matrix-vector product whose time is its
weight bytes over the memory bandwidth. These kernels stream the weight matrix in tiles along its rows (the
contiguous direction) and keep the few input rows in registers: one for a single row (no tensor cores), one for up
to 16 (a tensor-core tile). Unlike cuBLAS at these shapes they need no split-K reduction kernel, and on an H200
they took a batch-1 decode step of the Llama-3-8B shape from 4.73 to 4.43 ms (benchmarks/decode_profile.py puts
them beside cuBLAS, shape by shape)."""

from __future__ import annotations

import torch

from engines.torch.paged_attention import triton

MAX_ROWS = 16  # one tensor-core tile of rows; larger batches go to cuBLAS

if triton is not None:
    import triton.language as tl

    def _autotuned(configs):
        """Tuned per weight shape (N, K) among a few configurations: those an H200 chose for the Llama-3-8B shapes
        out of 56 tried (benchmarks/decode_profile.py). Few, and timed briefly, so that tuning every shape of a model
        at engine start (warm_up) takes seconds, not the 40 s that the full set took."""
        configs = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for n, k, w, s in configs]
        try:
            return triton.autotune(configs=configs, key=["N", "K"], warmup=5, rep=20)
        except TypeError:  # a Triton without these arguments
            return triton.autotune(configs=configs, key=["N", "K"])

    @_autotuned([(32, 128, 4, 3), (32, 256, 4, 4), (32, 512, 4, 4), (64, 128, 4, 4), (64, 256, 8, 4)])
    @triton.jit
    def _skinny(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        rk = tl.arange(0, BLOCK_K)
        n_ok = rn < N
        m_ok = rm < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        w_ptrs = w_ptr + rn[:, None] * stride_wn + rk[None, :]
        x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
        for k in range(0, K, BLOCK_K):
            k_ok = (rk + k) < K
            w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            acc += tl.dot(x, tl.trans(w))
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])

    @_autotuned([(4, 512, 4, 3), (8, 512, 4, 3), (16, 512, 4, 4), (16, 1024, 8, 3), (16, 1024, 8, 4)])
    @triton.jit
    def _gemv(x_ptr, w_ptr, b_ptr, out_ptr, N, K, stride_wn,
              HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One row: no tensor-core tile to fill, so a program can take as few as 4 weight rows, and small
        matrices still spread over every SM."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        n_ok = rn < N
        acc = tl.zeros((BLOCK_N,), tl.float32)
        for k in range(0, K, BLOCK_K):
            k_ok = (rk + k) < K
            w = tl.load(w_ptr + rn[:, None] * stride_wn + (rk + k)[None, :], mask=n_ok[:, None] & k_ok[None, :],
                        other=0.0)
            x = tl.load(x_ptr + rk + k, mask=k_ok, other=0.0)
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], 1)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rn, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


def tuned() -> dict[str, dict]:
    """The configuration the autotuner chose for each (N, K) so far, per kernel (for benchmarks' records)."""
    if triton is None:
        return {}
    return {name: {str(key): str(config) for key, config in kernel.cache.items()}
            for name, kernel in (("gemv", _gemv), ("skinny", _skinny))}


def warm_up(linears) -> None:
    """Tune both kernels for every weight shape now: the autotuner otherwise runs the first time a shape meets a
    product of few rows, which in a serving worker can be in the middle of a request (a prefill of a few tokens
    after a cached prefix, the first decode step)."""
    seen = set()
    for lin in linears:
        w = lin.weight
        if (tuple(w.shape), w.dtype) in seen:
            continue
        seen.add((tuple(w.shape), w.dtype))
        for rows in (1, 2):
            x = torch.zeros((rows, w.shape[1]), dtype=w.dtype, device=w.device)
            if usable(x, w):
                skinny_linear(x, w, lin.bias)


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (triton is not None and x.is_cuda and x.dim() == 2 and x.shape[0] <= MAX_ROWS
            and x.dtype in (torch.bfloat16, torch.float16) and weight.stride(1) == 1 and x.stride(1) == 1)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T (+ bias) for M <= MAX_ROWS, as F.linear computes it (float32 accumulation)."""
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    if m == 1:
        _gemv[grid](x, weight, bias if bias is not None else weight, out, n, k, weight.stride(0),
                    HAS_BIAS=bias is not None)
        return out
    _skinny[grid](x, weight, bias if bias is not None else weight, out, m, n, k, x.stride(0), weight.stride(0),
                  out.stride(0), HAS_BIAS=bias is not None, BLOCK_M=MAX_ROWS)
    return out
