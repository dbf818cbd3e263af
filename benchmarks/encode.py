"""The reference vision tower on one GPU: images/s against batch size, and the embedding transfer encode -> prefill.

    python benchmarks/encode.py [--batches 1,4,16,64] [--repeats 5]

LLaVA-1.6-Mistral-7B's shape (CLIP ViT-L/14 at 336 pixels: 24 layers, hidden 1024, 577 positions; a projector to
4096), random weights, bf16, one base tile per image (no anyres tiling). Every measured batch encodes images it has
not seen (distinct random pixels; the engine keeps no cache of its own). TFLOP/s counts the tower's and projector's
matmuls; a figure above the same run's bf16 matmul ceiling is refused as a measurement error.

The transfer: an encode worker's staging buffer and a prefill worker's inbox (workers/media.py), NIXL agents in two
processes (CUDA IPC cannot open a process's own memory), move one image's embeddings (576 x 4096 bf16, 4.7 MB) and
16 at once, READ with a notification as in serving, GPU --src to GPU --dst; beside it, a device copy of the same
bytes. A figure above the copy is refused too. Writes
benchmarks/results/encode.json (or $OUT/encode.json)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import table, write_result  # noqa: E402
from benchmarks.prefill import matmul_ceiling  # noqa: E402

LLAVA_16 = {"model_type": "llava", "image_token_index": 32000, "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
            "text_config": {"model_type": "mistral", "hidden_size": 4096},
            "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                              "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                              "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}}


def vision_flops(c) -> float:
    """Matmul FLOPs per image through the layers that run (vision_feature_layer) and the projector."""
    v, n = c.vision, c.vision.num_patches + 1
    layers = v.num_hidden_layers + 1 + c.vision_feature_layer if c.vision_feature_layer < 0 else c.vision_feature_layer
    per_layer = 2 * n * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size) \
        + 2 * 2 * n * n * v.hidden_size  # QK^T and AV
    patch = 2 * v.num_patches * v.hidden_size * 3 * v.patch_size ** 2
    proj = 2 * c.tokens_per_image * (v.hidden_size * c.text_hidden_size + c.text_hidden_size ** 2)
    return layers * per_layer + patch + proj


def tower_rows(batches: list[int], repeats: int, ceiling: float) -> list[dict]:
    from engines.torch.loader import load_vision

    d = Path(tempfile.mkdtemp(prefix="llava-shape-"))
    (d / "config.json").write_text(json.dumps(LLAVA_16))
    dev = torch.device("cuda")
    vision = load_vision(d, dev, "bfloat16", random_weights=True)
    flops = vision_flops(vision.config)
    rows = []
    for b in batches:
        vision(torch.randn(b, 3, 336, 336, device=dev, dtype=torch.bfloat16))  # warm-up
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(repeats):  # new pixels every time
            pixels = torch.randn(b, 3, 336, 336, device=dev, dtype=torch.bfloat16)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            vision(pixels)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        tflops = flops * b / best / 1e12
        row = {"batch": b, "ms": round(1000 * best, 2), "images_s": round(b / best, 1), "TFLOP/s": round(tflops, 1),
               "reused": 0}
        if tflops > ceiling:
            row["invalid"] = f"above the same run's matmul ceiling ({ceiling:.0f} TFLOP/s): a measurement error"
        rows.append(row)
        print(row, flush=True)
    return rows


def encoder_side(src: int, repeats: int, to_reader, from_reader) -> None:
    """The encode worker's process: embeddings in its NIXL staging buffer, handles to the reader, one by one."""
    import msgspec

    from hpc.runtime.transfer import ensure_cuda_context
    from workers.media import EmbeddingStage

    ensure_cuda_context(src)
    dev = torch.device("cuda", src)
    out = EmbeddingStage("bench.encode", "localhost", 256, dev)
    for images in (1, 16):
        emb = torch.randn(images * 576, 4096, device=dev, dtype=torch.bfloat16)
        checksum = float(emb.float().sum())
        for i in range(repeats + 1):
            handle = out.put(f"{images}.{i}", emb)
            to_reader.put((msgspec.msgpack.encode(handle), checksum))
            from_reader.get()
            out.free(f"{images}.{i}")
    to_reader.put(None)
    out.close()


async def transfer_rows(src: int, dst: int, repeats: int) -> list[dict]:
    """The prefill worker's side, in this process: READ each handle into its inbox (first read of a size not
    timed: it connects), beside a device copy of the same bytes GPU src -> dst."""
    import multiprocessing as mp

    import msgspec

    from hpc.runtime.protocol import EmbeddingHandle
    from workers.media import EmbeddingStage

    ctx = mp.get_context("spawn")
    to_reader, to_owner = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=encoder_side, args=(src, repeats, to_reader, to_owner))
    proc.start()
    inbox = EmbeddingStage("bench.prefill", "localhost", 256, torch.device("cuda", dst))
    times: dict[int, list[float]] = {}
    rows = []
    try:
        while (item := to_reader.get(timeout=120)) is not None:
            data, checksum = item
            handle = msgspec.msgpack.decode(data, type=EmbeddingHandle)
            ids = inbox.blocks("r", handle.nbytes)
            torch.cuda.synchronize(dst)
            t0 = time.perf_counter()
            await inbox.transfer.read(handle.blocks, ids, "r", 30)
            took = time.perf_counter() - t0
            got = inbox.take(ids, handle.shape, handle.dtype, handle.nbytes)
            assert float(got.float().sum()) == checksum, "the embeddings arrived changed"
            inbox.free("r")
            images = handle.shape[0] // 576
            times.setdefault(images, []).append(took)
            to_owner.put("next")
        for images, ts in times.items():
            nbytes = images * 576 * 4096 * 2
            a = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{src}")
            b = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{dst}")
            copies = []
            for _ in range(repeats + 1):
                torch.cuda.synchronize(src), torch.cuda.synchronize(dst)
                t0 = time.perf_counter()
                b.copy_(a)
                torch.cuda.synchronize(dst)
                copies.append(time.perf_counter() - t0)
            best, copy_best = min(ts[1:]), min(copies[1:])
            row = {"images": images, "MB": round(nbytes / 1e6, 1), "src_gpu": src, "dst_gpu": dst,
                   "nixl_ms": round(1000 * best, 3), "nixl_GB_s": round(nbytes / best / 1e9, 1),
                   "copy_GB_s": round(nbytes / copy_best / 1e9, 1), "nixl_vs_copy": round(copy_best / best, 3)}
            if best < copy_best * 0.95:
                row["invalid"] = "faster than a device copy of the same bytes: a measurement error"
            rows.append(row)
            print(row, flush=True)
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
        inbox.close()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,4,16,64")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--src", type=int, default=0, help="the encode worker's GPU")
    p.add_argument("--dst", type=int, default=0, help="the prefill worker's GPU")
    p.add_argument("--transfer-only", action="store_true")
    p.add_argument("--name", default="encode")
    a = p.parse_args()
    from hpc.runtime.transfer import ensure_cuda_context

    ensure_cuda_context(a.dst)  # before any NIXL agent (see hpc/runtime/transfer.py)
    ceiling = matmul_ceiling()
    tower = [] if a.transfer_only else tower_rows([int(b) for b in a.batches.split(",")], a.repeats, ceiling)
    moves = asyncio.run(transfer_rows(a.src, a.dst, a.repeats))
    path = write_result(a.name, tower, {"shape": "llava-v1.6-mistral-7b vision tower + projector, bf16, random",
                                          "matmul_ceiling_tflops": round(ceiling, 1), "transfer": moves})
    if tower:
        print(table(tower, ["batch", "ms", "images_s", "TFLOP/s", "reused"]))
    print(table(moves, ["images", "MB", "src_gpu", "dst_gpu", "nixl_ms", "nixl_GB_s", "copy_GB_s", "nixl_vs_copy"]))
    print(f"bf16 matmul ceiling in the same run: {ceiling:.0f} TFLOP/s. Written to {path}")


if __name__ == "__main__":
    main()
