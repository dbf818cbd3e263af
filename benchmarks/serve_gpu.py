"""The whole serving path on one GPU: `hpc serve` of a Llama-3-8B-shaped model (random bf16 weights), aggregated
and disaggregated, measured with `hpc bench`'s load generator.

    python benchmarks/serve_gpu.py [--isl 2000] [--osl 100] [--concurrency 1,4,16] [--requests 16]
    python benchmarks/serve_gpu.py --gpus 0,1 --isl 4000 --osl 200 --rates 1,2,4 --slo-ttft-ms 1000 \
        --slo-itl-ms 50 --name serve_gpu-2gpu   # 1 prefill + 1 decode worker against 2 aggregated, a GPU each

Disaggregated: a prefill and a decode worker on the same GPU, the KV cache moved by NIXL (VRAM to VRAM through
UCX's CUDA IPC). Aggregated: one worker. Etcd, NATS and the frontend run as `hpc serve` runs them. Each mode ends
with requests that share all but their last 16 prompt tokens, at concurrency 1: what prefix caching saves. Prints
a table and writes benchmarks/results/serve_gpu.json (or $OUT/serve_gpu.json).

With `--rates`, the levels are request rates instead of concurrencies: requests arrive as a Poisson process
whatever the server's pace, so long prompts land while other requests decode, and a row shows what a mode does at
that load (TTFT, ITL, goodput) rather than the load it settles at."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import LLAMA3_8B, table, write_result  # noqa: E402
from hpc import bench, diagnose  # noqa: E402
from hpc.config import load_deployment  # noqa: E402
from hpc.serve import LocalDeployment  # noqa: E402

ENGINE = ("device: cuda\ndtype: bfloat16\nmax_num_tokens: 8192\nmax_batch_size: 64\nenable_chunked_prefill: true\n"
          "kv_cache_config: {tokens_per_block: 16}\n")


def model_dir(d: Path) -> Path:
    """config.json of the real shape, and a word-level tokenizer over its whole vocabulary (so that every token
    id decodes to text), for the frontend."""
    from tokenizers import Tokenizer, models

    m = d / "llama-3-8b-shape"
    m.mkdir(parents=True)
    (m / "config.json").write_text(json.dumps({**LLAMA3_8B, "max_position_embeddings": 8192}))
    vocab = {f" w{i}": i for i in range(LLAMA3_8B["vocab_size"])}
    Tokenizer(models.WordLevel(vocab, unk_token=" w0")).save(str(m / "tokenizer.json"))
    (m / "tokenizer_config.json").write_text("{}")
    return m


def deployment(d: Path, model: Path, mode: str, aggregated_replicas: int = 1) -> Path:
    workers = (f"  aggregated: {{engine: torch, engine_config: gpu.yaml, replicas: {aggregated_replicas}}}\n"
               if mode == "aggregated" else
               "  prefill: {engine: torch, engine_config: gpu.yaml}\n  decode: {engine: torch, engine_config: gpu.yaml}\n")
    p = d / f"gpu-{mode}.yaml"
    p.write_text(f"name: gpu-{mode}\nmodel: {{path: {model}, served_name: llama-3-8b-shape, random_weights: true}}\n"
                 f"cluster: {{gpus_per_node: 8}}\nworkers:\n{workers}")
    return p


def measure(local: LocalDeployment, mode: str, c: int, prompts: list[list[int]], osl: int, gpus: int = 1,
            slo: bench.Slo = bench.Slo(), rate: float | None = None) -> dict:
    results, wall = bench.run_loop(bench.level(local.url, "llama-3-8b-shape", prompts, osl, c, 300, rate=rate))
    r = bench.summarize(c, results, wall, gpus, slo, rate)
    row = {"mode": mode, **{k: r[k] for k in ("concurrency", "rate_req_s", "requests", "errors", "ttft_p50_ms",
                                              "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "tpot_p50_ms", "e2e_p50_ms",
                                              "output_tok_s", "req_s", "gpus", "output_tok_s_per_gpu",
                                              "goodput_req_s")}, "reused_tokens": r["cached_tokens"]}
    # Distinct prompts: a row that is not the prefix-cache row by design must have reused nothing, or its TTFT
    # measures the cache, not the prefill.
    if r["cached_tokens"] and "shared prefix" not in mode:
        row["invalid"] = f"{r['cached_tokens']} prompt tokens came from the prefix cache"
    if "first_error" in r:
        row["first_error"] = r["first_error"]
    if rate:
        row["late_p99_ms"] = r["late_p99_ms"]
    # Where TTFT went, from the frontend's records of this level's requests (what `hpc diagnose` reads)
    summary, _ = diagnose.diagnose(diagnose.fetch(local.url, wall)[0])
    row["ttft_parts_p50_ms"], row["ttft_parts_p99_ms"] = summary.get("stages_p50_ms"), summary.get("stages_p99_ms")
    print(row, flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--isl", type=int, default=2000)
    p.add_argument("--osl", type=int, default=100)
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--rates", default="", help="request rates (requests/s, Poisson arrivals) instead of "
                                            "concurrencies; at most 64 in flight")
    p.add_argument("--requests", type=int, default=16,
                   help="per level; at least 4 x concurrency (or 10 s of a rate)")
    p.add_argument("--modes", default="disaggregated,aggregated")
    p.add_argument("--gpus", default="", help="GPUs, one per worker in turn (e.g. 0,1: prefill on 0 and decode on "
                                              "1, or one aggregated worker on each); default: all on the first")
    p.add_argument("--slo-ttft-ms", type=float)
    p.add_argument("--slo-itl-ms", type=float)
    p.add_argument("--name", default="serve_gpu", help="result file name (without .json)")
    p.add_argument("--cuda-graphs", action="store_true", help="decode steps as CUDA graphs (cuda_graph_config)")
    p.add_argument("--kv-blocks", type=int, default=4096, help="KV blocks per worker, 2 MiB each (4096: 8 GiB, "
                                                               "64k tokens; two workers share one GPU)")
    a = p.parse_args()
    gpus = tuple(g for g in a.gpus.split(",") if g)
    slo = bench.Slo(a.slo_ttft_ms, a.slo_itl_ms)
    d = Path(tempfile.mkdtemp(prefix="hpc-serve-gpu-"))
    model = model_dir(d)
    (d / "gpu.yaml").write_text(ENGINE + f"num_kv_blocks: {a.kv_blocks}\n"
                                + ("cuda_graph_config: {}\n" if a.cuda_graphs else ""))
    rows = []
    for mode in a.modes.split(","):
        local = LocalDeployment(load_deployment(deployment(d, model, mode, max(1, len(gpus)))), d / mode, gpus=gpus)
        n_gpus = max(1, len(gpus))
        local.start(on_ready=lambda c: print(f"  ready: {c.name} after {c.ready_after:.1f} s", flush=True),
                    timeout=600)
        try:
            levels = ([(64, float(r)) for r in a.rates.split(",")] if a.rates else
                      [(int(x), None) for x in a.concurrency.split(",")])
            for c, rate in levels:
                n = max(a.requests, int(10 * rate) if rate else 4 * c)
                seed = int(rate * 1000) if rate else c
                prompts = bench.make_prompts(n, a.isl, 10, LLAMA3_8B["vocab_size"], seed=seed)
                warm = bench.make_prompts(8 if rate else c, a.isl, 10, LLAMA3_8B["vocab_size"],
                                          seed=100_000 + seed if rate else 1000 + c)  # not cached later
                bench.run_loop(bench.level(local.url, "llama-3-8b-shape", warm, a.osl, c, 300))
                rows.append(measure(local, mode, c, prompts, a.osl, n_gpus, slo, rate))
            # 16 of the same prompts with a shared prefix of all but their last 16 tokens: the prefix cache's gain.
            shared = prompts[0][:-16]
            rows.append(measure(local, f"{mode}, shared prefix", 1, [shared + p[-16:] for p in prompts[:16]],
                                a.osl, n_gpus, slo))
        finally:
            stuck = local.stop()
            if stuck:
                print(f"could not stop: {stuck}", flush=True)
    path = write_result(a.name, rows, {"isl": a.isl, "osl": a.osl, "model": "Llama-3-8B shape, random bf16",
                                       "cpu_cores": os.cpu_count(), "gpus": list(gpus), "slo_ttft_ms": a.slo_ttft_ms,
                                       "slo_itl_ms": a.slo_itl_ms, "kv_blocks_per_worker": a.kv_blocks})
    print(table(rows, ["mode", "concurrency", "rate_req_s", "errors", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
                       "itl_p99_ms", "tpot_p50_ms", "e2e_p50_ms", "output_tok_s", "output_tok_s_per_gpu",
                       "goodput_req_s", "req_s", "reused_tokens"]))
    print("reused_tokens: prompt tokens served from the prefix cache (usage.prompt_tokens_details.cached_tokens); "
          "0 in every row but the shared-prefix ones")
    print(f"Written to {path}")


if __name__ == "__main__":
    main()
