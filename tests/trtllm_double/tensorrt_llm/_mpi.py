"""The MPI side of the double: rank 0's leader proxies the LLM's calls to every rank; each rank holds a vocabulary
shard. Messages: ("load", model_dir) -> ("ok",) | ("error", text); ("forward", contexts) -> ("tokens", ids);
("stop",)."""

from __future__ import annotations

import os
import sys
from multiprocessing.connection import Client, Listener

from tensorrt_llm import _model


def proxy_address() -> tuple[tuple[str, int], bytes]:
    addr = os.environ["TLLM_SPAWN_PROXY_PROCESS_IPC_ADDR"].removeprefix("tcp://")
    host, port = addr.rsplit(":", 1)
    return (host, int(port)), bytes.fromhex(os.environ["TLLM_SPAWN_PROXY_PROCESS_IPC_HMAC_KEY"])


def connect(timeout: float = 30):
    """The LLM's connection to the leader (which may still be starting)."""
    import time

    address, key = proxy_address()
    deadline = time.monotonic() + timeout
    while True:
        try:
            return Client(address, authkey=key)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the MPI leader at {address} did not answer in {timeout:.0f} s") from None
            time.sleep(0.05)


def _rank_step(comm, msg, state: dict):
    """What every rank does with one message; returns its contribution."""
    rank, world = comm.Get_rank(), comm.Get_size()
    kind = msg[0]
    if kind == "load":
        try:
            if os.environ.get("TRTLLM_DOUBLE_FAIL_RANK") == str(rank):
                raise RuntimeError(f"CUDA out of memory while loading weights (injected on rank {rank})")
            state.update(_model.load(msg[1]))
            return None
        except Exception as e:
            return f"rank {rank}: {type(e).__name__}: {e}"
    if kind == "forward":
        return _model.shard_best(msg[1], *_model.shard(state["vocab_size"], rank, world))
    return None


def leader() -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if "--action" in sys.argv and sys.argv[sys.argv.index("--action") + 1] == "stop":
        address, key = proxy_address()
        try:
            with Client(address, authkey=key) as c:
                c.send(("stop",))
        except (ConnectionRefusedError, EOFError, OSError):
            pass
        return
    address, key = proxy_address()
    state: dict = {}
    with Listener(address, authkey=key) as listener:
        while True:
            with listener.accept() as conn:
                while True:
                    try:
                        msg = conn.recv()
                    except EOFError:
                        break
                    if msg[0] == "stop":
                        comm.bcast(msg, root=0)
                        return
                    comm.bcast(msg, root=0)
                    parts = comm.gather(_rank_step(comm, msg, state), root=0)
                    if msg[0] == "load":
                        errors = [p for p in parts if p]
                        conn.send(("error", "; ".join(errors)) if errors else ("ok", comm.Get_size()))
                    else:
                        conn.send(("tokens", _model.combine(parts)))


def worker() -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    state: dict = {}
    while True:
        msg = comm.bcast(None, root=0)
        if msg[0] == "stop":
            return
        comm.gather(_rank_step(comm, msg, state), root=0)
