"""What KV-aware routing buys: TTFT per router on a workload whose requests share long prefixes.

    python benchmarks/router.py [--workers 4] [--documents 32] [--requests 384] [--concurrency 8]

Each request is one of `documents` long prefixes (a system prompt and a document, 1536 tokens) followed by a
question of its own (64 tokens), in a random order, 8 output tokens. The workers are aggregated mockers with block
reuse (TensorRT-LLM's `enable_block_reuse`): a prefill skips the leading blocks its worker computed recently. Each
worker's KV pool holds 16k tokens, about 10 documents, so the documents fit in the workers' caches together but
not in any one of them. The same requests run through a fresh deployment per router (`hpc serve`'s local backend:
etcd, NATS, frontend, workers). Prints a table and writes benchmarks/results/router.json."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import table, write_result  # noqa: E402
from engines.torch.tiny import make_tiny_model  # noqa: E402
from hpc import bench  # noqa: E402
from hpc.config import load_deployment  # noqa: E402
from hpc.serve import LocalDeployment  # noqa: E402

PREFIX, QUESTION, OSL, VOCAB = 1536, 64, 8, (10, 500)
# A Llama-3-8B-like prefill on a slower GPU, so that a prefill costs what it does in practice relative to the rest.
ENGINE = ("mocker: {prefill_tokens_per_s: 50000, prefill_overhead_ms: 1, decode_step_ms: 4, vocab_size: 500}\n"
          "num_kv_blocks: 1024\nkv_cache_config: {tokens_per_block: 16, enable_block_reuse: true}\n")


def workload(documents: int, requests: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    docs = [[rng.randrange(*VOCAB) for _ in range(PREFIX)] for _ in range(documents)]
    return [rng.choice(docs) + [rng.randrange(*VOCAB) for _ in range(QUESTION)] for _ in range(requests)]


async def reuse_ratio(local: LocalDeployment) -> float:

    async with local.client() as client:
        stats = [await client.stats(w) for w in client.directory.workers.values()]
    prompt = sum(s.prompt_tokens for s in stats)
    return sum(s.reused_prompt_tokens for s in stats) / prompt if prompt else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--documents", type=int, default=32)
    p.add_argument("--requests", type=int, default=384)
    p.add_argument("--concurrency", type=int, default=8)
    a = p.parse_args()
    d = Path(tempfile.mkdtemp(prefix="hpc-router-bench-"))
    make_tiny_model(d / "model")
    (d / "reuse.yaml").write_text(ENGINE)
    prompts = workload(a.documents, a.requests)
    rows = []
    for router in ("round-robin", "least-loaded", "kv-aware"):
        name = f"router-{router}"
        (d / f"{name}.yaml").write_text(
            f"name: {name}\nmodel: {{path: {d / 'model'}, served_name: mock}}\ncluster: {{gpus_per_node: 0}}\n"
            f"frontend: {{router: {router}}}\n"
            f"workers:\n  aggregated: {{engine: mocker, engine_config: reuse.yaml, replicas: {a.workers}}}\n")
        local = LocalDeployment(load_deployment(d / f"{name}.yaml"), d / router)
        local.start()
        try:
            results, wall = bench.run_loop(bench.level(local.url, "mock", prompts, OSL, a.concurrency, 120))
            row = bench.summarize(a.concurrency, results, wall)
            rows.append({"router": router, **{k: row[k] for k in ("requests", "errors", "ttft_p50_ms", "ttft_p90_ms",
                                                                   "ttft_p99_ms", "e2e_p50_ms", "req_s")},
                         "prefix_reused": round(asyncio.run(reuse_ratio(local)), 3)})
            print(rows[-1], flush=True)
        finally:
            local.stop()
    path = write_result("router", rows, {"workers": a.workers, "documents": a.documents, "prefix_tokens": PREFIX,
                                         "question_tokens": QUESTION, "osl": OSL, "concurrency": a.concurrency,
                                         "cpu_cores": os.cpu_count()})
    print(table(rows, ["router", "requests", "errors", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "e2e_p50_ms",
                       "req_s", "prefix_reused"]))
    print("prefix_reused: the share of prompt tokens whose KV a worker's prefix cache already held")
    print(f"Written to {path}")


if __name__ == "__main__":
    main()
