"""Tensor parallelism over NCCL: the reference engine on two GPUs, one MPI rank each, against one GPU.

    python3 benchmarks/tensor_parallel.py                                    # one GPU: the reference
    mpirun -np 2 --allow-run-as-root python3 benchmarks/tensor_parallel.py   # TP2 over NCCL

Llama-3-8B shape, random bf16 weights: every rank builds the same model from one seed and keeps its shard. Rank 0
measures, the other ranks follow its steps. Measured: the greedy answer to one prompt, in float32 on a 4-layer
model of the same width (TP2 must give the one-GPU answer, read from the reference run's file in the same folder;
in bf16 the two differ in their reduction order, and greedy choices between near-equal random logits diverge after
a few tokens), the bf16 greedy answer for comparison, prefill TFLOP/s at 2k and 8k tokens per forward
(distinct prompts: the reused-token count is printed and must be 0; a figure above the same run's bf16 matmul
ceiling times the GPUs is refused), and decode time per token at batch 1. Writes
$OUT/tensor_parallel-tp{N}.json (or benchmarks/results/)."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import model_dir, write_result  # noqa: E402
from benchmarks.prefill import matmul_ceiling  # noqa: E402
from engines.base import EngineRequest, SamplingParams  # noqa: E402
from engines.torch.engine import TorchEngine, TorchEngineOptions  # noqa: E402

PREFILL_TOKENS = (2048, 8192)
REPEATS = 3


def options(dtype: str = "bfloat16") -> TorchEngineOptions:
    return TorchEngineOptions(device="cuda", dtype=dtype, random_weights=True, max_num_tokens=max(PREFILL_TOKENS),
                              block_size=16, num_blocks=max(PREFILL_TOKENS) // 16 + 64, enable_block_reuse=False)


PHASES = (("float32", 4), ("bfloat16", 32))  # (dtype, layers): the exact-answer check, then the figures


def prompt(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


async def greedy(engine: TorchEngine) -> list[int]:
    sp = SamplingParams(max_tokens=32, ignore_eos=True)
    p = prompt(512, 0, engine.model.config.vocab_size)
    return [t async for o in engine.generate(EngineRequest("greedy", p, sp)) for t in o.token_ids]


async def measure(engine: TorchEngine) -> dict:
    cfg = engine.model.config
    out = {"greedy_bf16": await greedy(engine)}
    seed = 100
    for n in PREFILL_TOKENS:
        times = []
        for i in range(1 + REPEATS):  # the first is a warm-up; every prompt is new, so nothing is reused
            seed += 1
            rid = f"prefill-{n}-{i}"
            t0 = time.perf_counter()
            await engine.prefill(EngineRequest(rid, prompt(n, seed, cfg.vocab_size), SamplingParams(max_tokens=2)))
            times.append(time.perf_counter() - t0)
            engine.release(rid)
        t = statistics.median(times[1:])
        attention = cfg.num_hidden_layers * 2 * cfg.num_attention_heads * cfg.head_dim * n * (n + 1)
        flops = engine.model.flops_per_token() * n + attention + 2 * cfg.hidden_size * cfg.vocab_size
        out[f"prefill_{n}_ms"] = round(1000 * t, 2)
        out[f"prefill_{n}_tflops"] = round(flops / t / 1e12, 1)
    stamps = []
    async for _ in engine.generate(EngineRequest("decode", prompt(512, 7, cfg.vocab_size),
                                                 SamplingParams(max_tokens=64, ignore_eos=True))):
        stamps.append(time.perf_counter())
    out["decode_ms_per_token_p50"] = round(1000 * statistics.median(b - a for a, b in zip(stamps, stamps[1:])), 2)
    out["reused_prompt_tokens"] = engine.stats().reused_prompt_tokens
    return out


def main() -> None:
    rank, size = int(os.environ.get("OMPI_COMM_WORLD_RANK", 0)), int(os.environ.get("OMPI_COMM_WORLD_SIZE", 1))
    torch.cuda.set_device(rank)
    tp = None
    if size > 1:
        import torch.distributed as dist

        from engines.torch.parallel import init_from_mpi

        tp = init_from_mpi(torch.device("cuda", rank))
        if rank > 0:
            for dtype, layers in PHASES:  # each phase ends when rank 0 shuts its engine down
                TorchEngine(model_dir(layers), options(dtype), tp=tp).follow()
            dist.barrier()
            dist.destroy_process_group()
            return
    ceiling = matmul_ceiling()

    async def run(dtype: str, layers: int, work):
        engine = TorchEngine(model_dir(layers), options(dtype), tp=tp)
        engine.start(asyncio.get_running_loop())
        try:
            return await work(engine)
        finally:
            engine.shutdown()

    result = {"greedy": asyncio.run(run(*PHASES[0], greedy)), **asyncio.run(run(*PHASES[1], measure))}
    if tp is not None:
        dist.barrier()
        dist.destroy_process_group()
    problems = []
    if result["reused_prompt_tokens"]:
        problems.append(f"{result['reused_prompt_tokens']} prompt tokens came from the prefix cache")
    for n in PREFILL_TOKENS:
        if result[f"prefill_{n}_tflops"] > ceiling * size:
            problems.append(f"prefill at {n} tokens: {result[f'prefill_{n}_tflops']} TFLOP/s is above {size} x the "
                            f"matmul ceiling ({ceiling:.0f}): a measurement error")
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    reference = out_dir / "tensor_parallel-tp1.json"
    if size > 1 and reference.exists():
        one = json.loads(reference.read_text())["rows"][0]
        result["same_answer_as_one_gpu"] = one["greedy"] == result["greedy"]  # float32
        result["bf16_tokens_equal_before_divergence"] = next(
            (i for i, (a, b) in enumerate(zip(one["greedy_bf16"], result["greedy_bf16"])) if a != b), 32)
    row = {"tensor_parallel_size": size, **result, "invalid": "; ".join(problems) or None}
    path = write_result(f"tensor_parallel-tp{size}", [row], {"matmul_ceiling_tflops": round(ceiling, 1),
                                                           "model": "Llama-3-8B shape, random bf16"})
    print({k: v for k, v in row.items() if not k.startswith("greedy")})
    print(f"bf16 matmul ceiling on one GPU: {ceiling:.0f} TFLOP/s. Written to {path}")


if __name__ == "__main__":
    main()
