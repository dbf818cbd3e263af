"""Where a decode step's time goes, on one GPU: each projection of the Llama-3-8B shape as cuBLAS and as
engines/torch/skinny.py's kernel, against the same run's copy bandwidth; then the kernels of a whole captured
decode step, grouped by name, beside the step's wall time.

    python benchmarks/decode_profile.py [--context 2000] [--batches 1,16]

Projection rows: each product runs over enough copies of its weight (512 MiB or more in all) that no call finds
its weight in the L2 cache; the calls are captured in one CUDA graph, so launch costs are not counted. GB/s is
weight bytes over time; a figure above the GPU's memory bandwidth (4.8 TB/s on an H200) is refused as a
measurement error. For reference the same run measures a 1 GiB device copy (read and write bytes counted) and a
1 GiB sum (bytes read once); a product only reads, so it can run faster than the copy. Step rows: the graph of a decode step at `--context` tokens replayed under
torch.profiler; "gaps" is the wall time the kernels leave idle. Writes benchmarks/results/decode_profile.json."""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import model_dir, table, write_result  # noqa: E402
from benchmarks.decode import bandwidth_tb_s, decode_times  # noqa: E402
from engines.torch.engine import TorchEngine, TorchEngineOptions  # noqa: E402
from engines.torch.skinny import skinny_linear, tuned  # noqa: E402

SHAPES = {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (28672, 4096),
          "down_proj": (4096, 14336), "lm_head": (128256, 4096)}


def graph_time_s(fn, repeats: int = 5) -> float:
    """Seconds per call of `fn` (which makes `calls` calls), captured once in a CUDA graph and replayed."""
    fn()  # warm-up: autotuning, allocator
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def copy_and_read_gb_s() -> tuple[float, float]:
    src = torch.ones(1 << 29, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    copy = graph_time_s(lambda: dst.copy_(src))
    read = graph_time_s(lambda: src.sum())
    size = src.numel() * src.element_size()
    return 2 * size / copy / 1e9, size / read / 1e9


def projection_rows(batches: list[int], ceiling: float) -> list[dict]:
    rows = []
    for name, (n, k) in SHAPES.items():
        size = n * k * 2
        copies = max(2, math.ceil((512 << 20) / size))
        weights = [torch.randn((n, k), device="cuda", dtype=torch.bfloat16) / 64 for _ in range(copies)]
        for m in batches:
            x = torch.randn((m, k), device="cuda", dtype=torch.bfloat16)
            diff = (skinny_linear(x, weights[0]).float() - F.linear(x, weights[0]).float()).abs().max().item()
            row = {"projection": name, "rows": m, "n": n, "k": k, "weight_mib": round(size / 2**20, 1),
                   "max_diff": round(diff, 4)}
            for label, op in (("cublas", F.linear), ("skinny", skinny_linear)):
                seconds = graph_time_s(lambda: [op(x, w) for w in weights]) / copies
                row[f"{label}_us"] = round(seconds * 1e6, 1)
                row[f"{label}_gb_s"] = round(size / seconds / 1e9)
                if size / seconds / 1e9 > ceiling:
                    row["invalid"] = f"{label} above the memory bandwidth: a measurement error"
            rows.append(row)
            print(row, flush=True)
        del weights
        torch.cuda.empty_cache()
    return rows


def device_kernels(prof) -> dict[str, list[float]]:
    """Kernel durations (us) by name, copies left out."""
    kernels: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type.name == "CUDA" and "memcpy" not in e.name.lower() and "memset" not in e.name.lower():
            kernels.setdefault(e.name[:70], []).append(e.time_range.elapsed_us())
    return kernels


def kernel_rows(engine: TorchEngine, batch: int, context: int, steps: int = 20) -> tuple[list[dict], dict]:
    from torch.profiler import ProfilerActivity, profile

    graphs = engine.graphs
    width = -(-(context + 1) // engine.options.block_size)
    tables = [list(range(i * width, (i + 1) * width)) for i in range(batch)]
    with torch.inference_mode():
        graphs.run([1] * batch, [context] * batch, tables)
        torch.cuda.synchronize()
        graph = next(v for (b, _), v in graphs.graphs.items() if b >= batch)
        t0 = time.perf_counter()
        for _ in range(steps):
            graph.graph.replay()
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) / steps * 1e6
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                graph.graph.replay()
            torch.cuda.synchronize()
    kernels = device_kernels(prof)
    if not kernels:  # this profiler saw no kernel inside the graph: the same step run eagerly, kernel times only
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                graphs._forward(graph)
            torch.cuda.synchronize()
        kernels = device_kernels(prof)
    rows = sorted(({"batch": batch, "kernel": name, "per_step": round(len(t) / steps, 1),
                    "us_per_step": round(sum(t) / steps, 1)} for name, t in kernels.items()),
                  key=lambda r: -r["us_per_step"])
    busy = sum(r["us_per_step"] for r in rows)
    summary = {"batch": batch, "wall_us": round(wall_us, 1), "kernel_us": round(busy, 1),
               "gaps_us": round(wall_us - busy, 1), "kernels_per_step": round(sum(r["per_step"] for r in rows))}
    return rows, summary


async def step_profiles(args) -> tuple[list[dict], list[dict]]:
    rows, summaries = [], []
    for skinny in (False, True):
        started = time.perf_counter()
        engine = TorchEngine(model_dir(32), TorchEngineOptions(device="cuda", dtype="bfloat16", random_weights=True,
                                                               num_blocks=4096, cuda_graphs=True,
                                                               skinny_kernel=skinny))
        print(f"engine built in {time.perf_counter() - started:.1f} s (skinny kernel {skinny})", flush=True)
        engine.start(asyncio.get_running_loop())
        try:
            for b in args.batches:
                await decode_times(engine, b, args.context, 5, seed=b)  # captures the graph
                kernels, summary = kernel_rows(engine, b, args.context)
                summary["skinny"] = skinny
                summaries.append(summary)
                print(summary, flush=True)
                if not skinny:
                    rows += kernels[:25]
        finally:
            engine.shutdown()
            del engine
            torch.cuda.empty_cache()
    return rows, summaries


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=2000)
    p.add_argument("--batches", default="1,16")
    args = p.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    copy, read = copy_and_read_gb_s()
    ceiling = bandwidth_tb_s() * 1000
    print(f"memory bandwidth {ceiling:.0f} GB/s; device copy {copy:.0f} GB/s (read + write); sum {read:.0f} GB/s",
          flush=True)
    projections = projection_rows(args.batches, ceiling)
    chosen = tuned()
    print(f"configurations the autotuner chose: {chosen}", flush=True)
    kernels, steps = asyncio.run(step_profiles(args))
    path = write_result("decode_profile", projections, {"bandwidth_gb_s": round(ceiling), "copy_gb_s": round(copy),
                                                        "read_gb_s": round(read), "tuned": chosen, "steps": steps,
                                                        "kernels": kernels})
    print(table(projections, ["projection", "rows", "weight_mib", "cublas_us", "cublas_gb_s", "skinny_us",
                              "skinny_gb_s", "max_diff"]))
    print(table(steps, ["skinny", "batch", "wall_us", "kernel_us", "gaps_us", "kernels_per_step"]))
    print(table(kernels, ["batch", "kernel", "per_step", "us_per_step"]))
    print(f"Written to {path}")


if __name__ == "__main__":
    main()
