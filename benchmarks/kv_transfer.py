"""KV transfer between a prefill process and a decode process on GPUs: NIXL against CUDA IPC, with the engine's
real paged layout, beside an in-process torch copy of the same bytes.

    python benchmarks/kv_transfer.py [--src 0 --dst 1] [--tokens 1024,4096,16384] [--layers 32]

The prefill process runs the reference engine (Llama-3-8B shape, random bf16 weights) and prefills each prompt for
real; its KV blocks are read by the decode process into (a) adjacent blocks, as a fresh pool hands out, and
(b) every other block, the worst case of a fragmented pool (one descriptor or copy per 16-token block).
With one GPU, --src 0 --dst 0 measures the same paths within the device. Prints a table and writes
benchmarks/results/kv_transfer.json (or $OUT/kv_transfer.json)."""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def owner(args, to_reader, from_reader) -> None:
    import torch

    from benchmarks.common import model_dir
    from engines.base import EngineRequest, SamplingParams
    from engines.torch.engine import TorchEngine, TorchEngineOptions
    import dataclasses

    from hpc.runtime.protocol import KvLayout, encode
    from hpc.runtime.transfer import KvTransfer, ensure_cuda_context

    async def run():
        ensure_cuda_context(args.src)  # before the NIXL agent (see transfer.py)
        sizes = [int(t) for t in args.tokens.split(",")]
        engine = TorchEngine(model_dir(args.layers), TorchEngineOptions(
            device=f"cuda:{args.src}", dtype="bfloat16", random_weights=True, max_num_tokens=8192,
            num_blocks=max(sizes) // 16 + 64))
        engine.start(asyncio.get_running_loop())
        transfer = KvTransfer("prefill", engine.kv_pool(), KvLayout(**dataclasses.asdict(engine.layout)), "node")
        for n in sizes:
            prompt = torch.randint(0, engine.vocab_size, (n,)).tolist()
            out = await engine.prefill(EngineRequest(f"p{n}", prompt, SamplingParams(max_tokens=2, ignore_eos=True)))
            checksum = float(engine.kv_pool()[out.block_ids].view(torch.int32).double().sum())
            to_reader.put((encode(transfer.handle(out.block_ids, out.num_tokens)), checksum))
            from_reader.get()
            engine.release(f"p{n}")
        to_reader.put(None)
        engine.shutdown()

    torch.cuda.set_device(args.src)
    asyncio.run(run())


async def read_all(args, from_owner, to_owner) -> list[dict]:
    import torch

    from hpc.runtime.protocol import KvHandle
    from hpc.runtime.transfer import KvTransfer, ensure_cuda_context
    import msgspec

    ensure_cuda_context(args.dst)
    rows, pool, transfer = [], None, None
    while (item := from_owner.get()) is not None:
        data, checksum = item
        handle = msgspec.msgpack.decode(data, type=KvHandle)
        nblocks, bb = len(handle.block_ids), handle.layout.block_bytes
        if pool is None or pool.shape[0] < 2 * nblocks:
            if transfer is not None:
                transfer.close()
            pool = torch.empty((2 * nblocks + 2, bb), dtype=torch.uint8, device=f"cuda:{args.dst}")
            transfer = KvTransfer("decode", pool, handle.layout, "node")
        nbytes = nblocks * bb
        src = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{args.src}")
        dst = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{args.dst}")
        copy = []
        for i in range(args.repeats + 2):
            torch.cuda.synchronize(args.src), torch.cuda.synchronize(args.dst)
            t0 = time.perf_counter()
            dst.copy_(src)
            torch.cuda.synchronize(args.dst)
            if i >= 2:
                copy.append(time.perf_counter() - t0)
        del src, dst
        copy_s = statistics.median(copy)
        layouts = {"adjacent": list(range(nblocks)), "every other": list(range(0, 2 * nblocks, 2))}
        for path in ("nixl", "cuda-ipc"):
            for name, local in layouts.items():
                times = []
                for i in range(args.repeats + 2):
                    pool[local].fill_(0)
                    torch.cuda.synchronize(args.dst)
                    res = await transfer.read(handle, local, f"r{i}", 60, path=path)
                    if i >= 2:
                        times.append(res.seconds)
                got = float(pool[local].view(torch.int32).double().sum())
                assert got == checksum, f"{path} {name}: bytes differ after the transfer"
                t = statistics.median(times)
                rows.append({"tokens": handle.num_tokens, "MiB": round(nbytes / 2**20), "path": path,
                             "dst blocks": name, "segments": res.segments, "ms": round(t * 1000, 3),
                             "GB/s": round(nbytes / t / 1e9, 1), "torch copy GB/s": round(nbytes / copy_s / 1e9, 1),
                             "% of copy": round(100 * copy_s / t, 1)})
                print(rows[-1], flush=True)
        to_owner.put("next")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=int, default=0)
    p.add_argument("--dst", type=int, default=1)
    p.add_argument("--tokens", default="1024,4096,16384")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    import torch

    from benchmarks.common import table, write_result

    if args.dst >= torch.cuda.device_count():
        print(f"only {torch.cuda.device_count()} GPU(s): reading within GPU {args.src}")
        args.dst = args.src
    ctx = mp.get_context("spawn")
    to_reader, to_owner = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=owner, args=(args, to_reader, to_owner))
    proc.start()
    try:
        rows = asyncio.run(read_all(args, to_reader, to_owner))
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    kv_per_token = rows[0]["MiB"] * 2**20 // rows[0]["tokens"] if rows else 0
    path = write_result("kv_transfer", rows, {"src_gpu": args.src, "dst_gpu": args.dst, "layers": args.layers,
                                              "kv_bytes_per_token": kv_per_token})
    print(table(rows, ["tokens", "MiB", "path", "dst blocks", "segments", "ms", "GB/s", "torch copy GB/s",
                       "% of copy"]))
    print(f"GPU {args.src} -> GPU {args.dst}. Written to {path}")


if __name__ == "__main__":
    main()
