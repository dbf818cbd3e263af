"""`hpc tune prefill`'s measurement of the reference engine on one GPU, Llama-3-8B shape (random bf16 weights):
the knee it finds, beside benchmarks/prefill.py's figure for the same shape.

    python benchmarks/tune_prefill.py [--tokens 256,...,16384]

It runs what `hpc tune prefill` runs (`python -m workers.tune`: distinct prompts, one forward each, reused tokens
read back and required to be 0) and the same knee rule (the smallest size within 5% of the best tokens/s). A
throughput whose weight-matmul TFLOP/s would exceed the same run's bf16 matmul ceiling is refused. Writes
benchmarks/results/tune_prefill.json (or $OUT); `python -c 'from hpc.tune import plot ...'` draws it (see
docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import LLAMA3_8B, model_dir, table, write_result  # noqa: E402
from benchmarks.prefill import matmul_ceiling  # noqa: E402
from hpc.tune import knee, measure  # noqa: E402


def weight_flops_per_token(c: dict) -> float:
    h, hd = c["hidden_size"], c["head_dim"]
    attn = h * (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * hd + c["num_attention_heads"] * hd * h
    return 2 * c["num_hidden_layers"] * (attn + 3 * h * c["intermediate_size"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="256,512,1024,2048,4096,8192,16384")
    a = p.parse_args()
    sizes = [int(t) for t in a.tokens.split(",")]
    engine = Path(tempfile.mkdtemp()) / "prefill.yaml"
    engine.write_text("device: cuda\ndtype: bfloat16\nkv_cache_config: {free_gpu_memory_fraction: 0.3}\n")
    ceiling = matmul_ceiling()
    rows = measure("torch", str(model_dir()), engine, sizes, 3, True)
    per_token = weight_flops_per_token(LLAMA3_8B)
    for r in rows:
        r["weight_TFLOP/s"] = round(per_token * r["tokens_per_s"] / 1e12, 1)
        if r["weight_TFLOP/s"] > ceiling:
            r["invalid"] = f"above the same run's matmul ceiling ({ceiling:.0f} TFLOP/s): a measurement error"
    chosen = knee([r for r in rows if "invalid" not in r])
    path = write_result("tune_prefill", rows, {"knee_tokens": chosen["tokens"], "matmul_ceiling_tflops":
                                               round(ceiling, 1), "shape": "Llama-3-8B, random bf16"})
    print(table(rows, ["tokens", "ttft_ms", "tokens_per_s", "weight_TFLOP/s", "reused"]))
    print(f"knee: {chosen['tokens']} tokens per forward; matmul ceiling {ceiling:.0f} TFLOP/s. Written to {path}")


if __name__ == "__main__":
    main()
