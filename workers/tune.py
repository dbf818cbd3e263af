"""Prefill throughput against tokens per forward pass, for `hpc tune prefill`: run where the engine runs (this host,
or a GPU node through an srun step), one JSON document on stdout.

    python -m workers.tune --engine torch --model DIR --engine-config YAML --tokens 256,1024,4096 [--repeats 3]

One engine, its token budget the largest size asked for; for each size, `repeats` prompts of exactly that many
tokens, each distinct (random token ids), prefilled one at a time: one forward pass each. TTFT is the prefill's
latency (the best of the repeats), throughput the tokens over it. The prefix cache's reused-token count is read back and reported: it must
be 0, or the figures are not compute."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

from engines.base import EngineError, EngineRequest, SamplingParams
from hpc.config import load_engine_config
from hpc.errors import HpcError
from workers.engines import build_engine


async def measure(engine, sizes: list[int], repeats: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for n in [sizes[0]] + sizes:  # the first size twice: the first pass warms the engine up
        latencies = []
        reused_before = engine.stats().reused_prompt_tokens
        for i in range(repeats):
            prompt = [rng.randrange(10, vocab) for _ in range(n)]
            t0 = time.perf_counter()
            out = await engine.prefill(EngineRequest(f"tune-{n}-{i}-{len(rows)}", prompt,
                                                     SamplingParams(max_tokens=2, ignore_eos=True)))
            latencies.append(time.perf_counter() - t0)
            if out.finish_reason is None:
                engine.release(f"tune-{n}-{i}-{len(rows)}")
        t = min(latencies)  # the best of the repeats: interference only ever adds time
        rows.append({"tokens": n, "ttft_ms": round(1000 * t, 3), "tokens_per_s": round(n / t, 1),
                     "reused": engine.stats().reused_prompt_tokens - reused_before})
    return rows[1:]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m workers.tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", required=True, choices=["torch", "mocker", "trtllm"])
    p.add_argument("--model", required=True)
    p.add_argument("--engine-config")
    p.add_argument("--tokens", required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--random-weights", action="store_true")
    a = p.parse_args(argv)
    try:
        sizes = sorted({int(t) for t in a.tokens.split(",")})
        cfg = load_engine_config(a.engine_config) if a.engine_config else None
        from hpc.config import EngineConfig

        cfg = (cfg or EngineConfig()).model_copy(update={"max_num_tokens": max(sizes), "enable_chunked_prefill": True})
        if cfg.num_kv_blocks is None and a.engine == "torch":
            cfg = cfg.model_copy(update={"num_kv_blocks": max(64, 2 * max(sizes) // cfg.kv_cache_config.tokens_per_block)})

        async def run():
            engine = build_engine(a.engine, a.model, cfg, a.random_weights)
            engine.start(asyncio.get_running_loop())
            try:
                vocab = getattr(engine, "vocab_size", None) or (cfg.mocker.vocab_size if cfg.mocker else 32000)
                return await measure(engine, sizes, a.repeats, vocab)
            finally:
                engine.shutdown()

        rows = asyncio.run(run())
    except (HpcError, EngineError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps({"engine": a.engine, "rows": rows}))


if __name__ == "__main__":
    main()
