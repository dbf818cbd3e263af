"""Which set-up makes NIXL (UCX) move VRAM at link speed between two processes?

    python benchmarks/nixl_probe.py [--src 0 --dst 0] [--mib 256]

Variants: the order of CUDA context, allocation and agent creation, and NIXL's progress thread. Each reads the
same bytes 5 times; prints GB/s per variant."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

VARIANTS = {
    "ctx, alloc, agent": dict(alloc_first=True, prog=True),
    "ctx, agent, alloc": dict(alloc_first=False, prog=True),
    "ctx, alloc, agent, no progress thread": dict(alloc_first=True, prog=False),
    "ctx, agent, alloc, no progress thread": dict(alloc_first=False, prog=False),
}


def setup(name, device, nbytes, alloc_first, prog):
    import torch
    from nixl._api import nixl_agent, nixl_agent_config

    torch.cuda.set_device(device)
    torch.zeros(1, device=f"cuda:{device}")
    buf = torch.full((nbytes,), 7, dtype=torch.uint8, device=f"cuda:{device}") if alloc_first else None
    agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=prog, backends=["UCX"]))
    if buf is None:
        buf = torch.full((nbytes,), 7, dtype=torch.uint8, device=f"cuda:{device}")
    agent.register_memory(buf)
    return agent, buf


def owner(args, q_out, q_in):
    for label, v in list(VARIANTS.items())[: args.first]:
        agent, buf = setup(f"owner-{label}", args.src, args.mib << 20, **v)
        q_out.put((agent.get_agent_metadata(), buf.data_ptr()))
        q_in.get()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--src", type=int, default=0)
    p.add_argument("--dst", type=int, default=0)
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--first", type=int, default=len(VARIANTS), help="run only the first N variants")
    args = p.parse_args()
    for label in list(VARIANTS)[args.first:]:
        del VARIANTS[label]
    import numpy as np
    import torch

    ctx = mp.get_context("spawn")
    q_out, q_in = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=owner, args=(args, q_out, q_in))
    proc.start()
    nbytes = args.mib << 20
    for label, v in VARIANTS.items():
        meta, addr = q_out.get(timeout=120)
        agent, buf = setup(f"reader-{label}", args.dst, nbytes, **v)
        remote = agent.add_remote_agent(meta)
        local = agent.get_xfer_descs(np.array([(buf.data_ptr(), nbytes, args.dst)], dtype=np.uint64), "VRAM")
        far = agent.get_xfer_descs(np.array([(addr, nbytes, args.src)], dtype=np.uint64), "VRAM")
        times = []
        for i in range(6):
            buf.zero_()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            h = agent.initialize_xfer("READ", local, far, remote)
            state = agent.transfer(h)
            deadline = time.monotonic() + 15
            while state == "PROC" and time.monotonic() < deadline:
                state = agent.check_xfer_state(h)
            if state == "PROC":
                break  # needs the owner to make progress: not a one-sided path
            agent.release_xfer_handle(h)
            if i:
                times.append(time.perf_counter() - t0)
        ok = bool((buf == 7).all())
        speed = f"{nbytes / statistics.median(times) / 1e9:8.1f} GB/s" if times else "   did not finish in 15 s"
        print(f"{label:42s} {speed}  state={state} bytes_ok={ok}", flush=True)
        q_in.put("next")
    proc.join(timeout=30)


if __name__ == "__main__":
    main()
