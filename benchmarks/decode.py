"""Decode step time of the reference engine on one GPU, eager against CUDA graphs, beside the memory-bandwidth
limit.

    python benchmarks/decode.py [--context 2000] [--steps 100] [--batches 1,16]

Llama-3-8B shape, random bf16 weights. For each batch size: that many distinct prompts of `--context` tokens are
prefilled (not timed), then `--steps` decode steps run with every sequence decoding; the time per step is the
inter-token latency a stream sees. The floor is reading the weights once per step: parameter bytes / the GPU's
memory bandwidth (HBM3e, 4.8 TB/s on an H200). A step faster than that floor is refused as a measurement error.

Rows: eager PyTorch (gather of the blocks + SDPA); then CUDA graphs with the Triton kernels (paged attention,
rotary + KV write, norms, SiLU); the same with steps run one ahead of the host (overlap_decode); and with the
projections as skinny.py's kernel in place of cuBLAS.

Equality: the paged kernel against gather + SDPA on scattered blocks (bf16; max abs difference, at most 0.05); and
a 4-layer model of the same width in float32 decodes 32 greedy tokens eagerly with gather + SDPA, eagerly with the
kernel, and with graphs and the kernel; the tokens must be the same (in bf16, random weights give near-equal logits
that any change of kernel can flip).
Writes benchmarks/results/decode.json (or $OUT/decode.json)."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import model_dir, table, write_result  # noqa: E402
from engines.base import EngineRequest, SamplingParams  # noqa: E402
from engines.torch.engine import TorchEngine, TorchEngineOptions  # noqa: E402

HBM_TB_S = {"H200": 4.8, "H100": 3.35}


def bandwidth_tb_s() -> float:
    name = torch.cuda.get_device_name()
    return next((v for k, v in HBM_TB_S.items() if k in name), 3.35)


async def decode_times(engine: TorchEngine, batch: int, context: int, steps: int, seed: int) -> tuple[list, list]:
    """Per-step times (from the streams' token arrivals) and each stream's tokens."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(10, engine.vocab_size, (context,), generator=g).tolist() for _ in range(batch)]
    outs = [engine.generate(EngineRequest(f"d{seed}-{i}", p, SamplingParams(max_tokens=steps + 1, ignore_eos=True)))
            for i, p in enumerate(prompts)]
    arrivals: list[list[float]] = [[] for _ in range(batch)]
    tokens: list[list[int]] = [[] for _ in range(batch)]

    async def read(i):
        async for o in outs[i]:
            arrivals[i].append(time.perf_counter())
            tokens[i].extend(o.token_ids)

    await asyncio.gather(*(read(i) for i in range(batch)))
    gaps = [b - a for arr in arrivals for a, b in zip(arr[1:], arr[2:])]  # after the first decode step
    return gaps, tokens


def kernel_error() -> float:
    """The paged kernel against the gather + SDPA path on the same scattered blocks (bf16, GQA 32/8, lengths that
    end inside a block, on a block boundary and past one): the largest absolute difference."""
    from engines.torch.model import Attention, DecodeBatch, LlamaConfig
    from engines.torch.paged_attention import paged_decode

    g = torch.Generator(device="cuda").manual_seed(3)
    layers, bs, kvh, hd, h = 2, 16, 8, 128, 32
    pool = torch.randn((1024, layers, 2, bs, kvh, hd), generator=g, device="cuda", dtype=torch.bfloat16)
    lengths = torch.tensor([1, 15, 16, 17, 700, 2000], device="cuda")
    width = -(-int(lengths.max()) // bs)
    table = torch.randperm(1024, generator=g, device="cuda")[: len(lengths) * width].view(len(lengths), width)
    q = torch.randn((len(lengths), h, hd), generator=g, device="cuda", dtype=torch.bfloat16)
    mask = (torch.arange(width * bs, device="cuda")[None, :] < lengths[:, None])[:, None, None, :]
    cfg = LlamaConfig(hidden_size=h * hd, intermediate_size=8, num_hidden_layers=1, num_attention_heads=h,
                      num_key_value_heads=kvh, head_dim=hd, vocab_size=16)
    attn = Attention(cfg)
    worst = 0.0
    for layer in range(layers):
        rows = torch.arange(len(lengths), device="cuda")
        ref = attn._attend_decode(q, pool, layer, DecodeBatch(rows, table, mask))
        got = paged_decode(q, pool, layer, table, lengths)
        worst = max(worst, (ref.float() - got.float()).abs().max().item())
    return worst


def fused_error() -> float:
    """rotary.py's kernel against a float32 rotation of the same bf16 q and k (Llama-3's rope scaling, positions
    up to 8k), its KV writes against the rotated k and the given v, and fused.py's kernels against float32
    PyTorch: the largest difference, relative to the value where it is above 1 (one bf16 rounding: 0.4%)."""
    from engines.torch.model import LlamaConfig, rope_inv_freq, rotate_half
    from engines.torch.rotary import rope_and_store

    g = torch.Generator(device="cuda").manual_seed(5)
    t, h, kvh, hd, bs = 37, 32, 8, 128, 16
    cfg = LlamaConfig(vocab_size=16, hidden_size=h * hd, intermediate_size=8, num_hidden_layers=2,
                      num_attention_heads=h, num_key_value_heads=kvh, head_dim=hd, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    inv_freq = rope_inv_freq(cfg).cuda()
    qkv = torch.randn((t, (h + 2 * kvh) * hd), generator=g, device="cuda", dtype=torch.bfloat16)
    q, k, v = (x.view(t, -1, hd) for x in qkv.split([h * hd, kvh * hd, kvh * hd], dim=-1))
    positions = torch.randint(0, 8192, (t,), generator=g, device="cuda")
    freqs = positions[:, None].float() * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
    want_q = q.float() * cos + rotate_half(q.float()) * sin
    want_k = k.float() * cos + rotate_half(k.float()) * sin
    want_v = v.clone()
    pool = torch.zeros((8, 2, 2, bs, kvh, hd), device="cuda", dtype=torch.bfloat16)
    slots = torch.randperm(8 * bs, generator=g, device="cuda")[:t]
    rope_and_store(q, k, v, positions, inv_freq, pool, 1, slots // bs, slots % bs)
    stored_k, stored_v = pool[slots // bs, 1, 0, slots % bs], pool[slots // bs, 1, 1, slots % bs]
    pairs = [(q, want_q), (k, want_k), (stored_k, k), (stored_v, want_v)]
    # residual + RMSNorm and SiLU x up (fused.py) against float32 PyTorch on the same bf16 inputs
    from engines.torch.fused import add_rms_norm, silu_mul

    x, res, w = (torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16) for shape in
                 ((t, 4096), (t, 4096), (4096,)))
    want_res = (x.float() + res.float()).bfloat16().float()
    want = want_res * torch.rsqrt(want_res.pow(2).mean(-1, keepdim=True) + 1e-5) * w.float()
    got = add_rms_norm(x, w, 1e-5, residual=res)
    pairs += [(got, want), (res, want_res)]
    gu = torch.randn((t, 2 * 14336), generator=g, device="cuda", dtype=torch.bfloat16)
    gate, up = gu.float().chunk(2, dim=-1)
    pairs.append((silu_mul(gu), torch.nn.functional.silu(gate) * up))
    # skinny.py's products of 1 and 16 rows against float32
    from engines.torch.skinny import skinny_linear

    weight = torch.randn((6144, 4096), generator=g, device="cuda", dtype=torch.bfloat16) / 64
    for rows in (1, 16):
        pairs.append((skinny_linear(x[:rows], weight), x[:rows].float() @ weight.float().T))
    return max(((a.float() - b.float()).abs() / b.float().abs().clamp(min=1)).max().item() for a, b in pairs)


def argmax_equal() -> bool:
    """fused.argmax_rows against torch.argmax, on random logits and on rows whose largest value occurs twice (the
    first one counts), in one chunk and across chunks."""
    from engines.torch.fused import ARGMAX_CHUNK, argmax_rows

    g = torch.Generator(device="cuda").manual_seed(9)
    logits = torch.randn((16, 128256), generator=g, device="cuda")
    for row, (a, b) in enumerate(((5, 9), (100, ARGMAX_CHUNK + 3), (70000, 128255))):
        logits[row, a] = logits[row, b] = 100.0
    return bool(torch.equal(argmax_rows(logits), logits.argmax(dim=-1)))


def replay_ms(engine: TorchEngine, batch: int, context: int, n: int = 50) -> tuple[float, float]:
    """A decode step's graph alone, outside the engine's loop: (the step as DecodeGraphs.run does it, inputs
    prepared on the host and copied; the graph's replay only), ms each, synchronised. What ITL adds to the first
    is the engine loop's host work (scheduling, sampling, handing tokens over)."""
    with torch.inference_mode():  # as the engine's thread runs it
        return _replay_ms(engine, batch, context, n)


def _replay_ms(engine: TorchEngine, batch: int, context: int, n: int) -> tuple[float, float]:
    g = engine.graphs
    width = -(-(context + 1) // engine.options.block_size)
    tables = [list(range(i * width, (i + 1) * width)) for i in range(batch)]
    args = ([1] * batch, [context] * batch, tables)
    g.run(*args)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        g.run(*args)
    torch.cuda.synchronize()
    full = (time.perf_counter() - t0) / n * 1000
    graph = next(v for (b, _), v in g.graphs.items() if b >= batch)
    t0 = time.perf_counter()
    for _ in range(n):
        graph.graph.replay()
    torch.cuda.synchronize()
    return full, (time.perf_counter() - t0) / n * 1000


async def run(args) -> tuple[list[dict], dict]:
    rows = []
    d = model_dir(32)
    params = 8.03e9
    floor_ms = params * 2 / (bandwidth_tb_s() * 1e12) * 1000
    error = kernel_error()
    print(f"paged kernel against gather + SDPA, bf16: max abs difference {error:.4f}", flush=True)
    argmax_ok = argmax_equal()
    print(f"argmax kernel equals torch.argmax: {argmax_ok}", flush=True)
    rope = fused_error()
    print(f"rotary, norm, SiLU and skinny-product kernels against float32 on the same bf16 inputs: max difference {rope:.4f}",
          flush=True)
    configs = [  # (label, options): eager PyTorch, then the step as it is built up
        ("eager", dict(cuda_graphs=False, paged_attention=False, fused_kernels=False)),
        ("graphs+kernels", dict(cuda_graphs=True, overlap_decode=False, skinny_kernel=False)),
        ("graphs+kernels+overlap", dict(cuda_graphs=True, skinny_kernel=False)),
        ("graphs+kernels+overlap+skinny", dict(cuda_graphs=True)),  # the defaults
    ]
    for label, options in configs:
        started = time.perf_counter()
        engine = TorchEngine(d, TorchEngineOptions(device="cuda", dtype="bfloat16", random_weights=True,
                                                   num_blocks=4096, max_num_tokens=8192, **options))
        built_s = round(time.perf_counter() - started, 1)  # with the skinny kernel: its tuning for every shape
        engine.start(asyncio.get_running_loop())
        try:
            for b in (int(x) for x in args.batches.split(",")):
                await decode_times(engine, b, args.context, 5, seed=1000 + b)  # warm-up (captures the graphs)
                gaps, _ = await decode_times(engine, b, args.context, args.steps, seed=b)
                p50 = statistics.median(gaps) * 1000
                row = {"config": label, "cuda_graphs": engine.graphs is not None, "paged_kernel": engine.paged,
                       "fused_kernels": engine.model.fused, "overlap": engine.overlap,
                       "skinny": engine.options.skinny_kernel, "batch": b, "context": args.context,
                       "itl_p50_ms": round(p50, 2), "itl_p90_ms": round(sorted(gaps)[int(0.9 * len(gaps))] * 1000, 2),
                       "output_tok_s": round(b / (p50 / 1000), 1), "floor_ms": round(floor_ms, 2),
                       "x_floor": round(p50 / floor_ms, 2), "reused": engine.stats().reused_prompt_tokens,
                       "engine_start_s": built_s}
                if engine.graphs is not None:
                    row["step_alone_ms"], row["replay_alone_ms"] = (round(x, 2) for x in replay_ms(engine, b,
                                                                                                   args.context))
                if p50 < floor_ms:
                    row["invalid"] = "faster than reading the weights once: a measurement error"
                rows.append(row)
                print(row, flush=True)
        finally:
            engine.shutdown()
            del engine
            torch.cuda.empty_cache()
    small = model_dir(4)
    answers = {}
    for graphs, paged in ((False, False), (False, True), (True, True)):
        engine = TorchEngine(small, TorchEngineOptions(device="cuda", dtype="float32", random_weights=True,
                                                       num_blocks=512, cuda_graphs=graphs, paged_attention=paged,
                                                       fused_kernels=paged))
        engine.start(asyncio.get_running_loop())
        try:
            _, tokens = await decode_times(engine, 4, 300, 32, seed=7)
            answers[graphs, paged] = tokens
        finally:
            engine.shutdown()
    same = all(a == answers[False, False] for a in answers.values())
    print(f"float32, 4 layers, 4 streams x 32 greedy tokens: the kernels (paged, rotary) and graphs "
          f"{'equal' if same else 'DIFFER from'} eager PyTorch", flush=True)
    return rows, {"greedy_equal_float32": same, "argmax_equal": argmax_ok, "kernel_max_abs_diff_bf16": round(error, 5),
                  "fused_kernels_max_diff_bf16": round(rope, 5),
                  "floor_ms": round(floor_ms, 2), "params": params}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=2000)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batches", default="1,16")
    args = p.parse_args()
    rows, meta = asyncio.run(run(args))
    path = write_result("decode", rows, meta)
    print(table(rows, ["config", "batch", "context", "itl_p50_ms", "itl_p90_ms",
                       "output_tok_s", "floor_ms", "x_floor", "step_alone_ms", "replay_alone_ms", "reused"]))
    print(f"Written to {path}")
    if (not meta["greedy_equal_float32"] or not meta["argmax_equal"] or meta["kernel_max_abs_diff_bf16"] > 0.05
            or meta["fused_kernels_max_diff_bf16"] > 0.05):
        sys.exit(1)


if __name__ == "__main__":
    main()
