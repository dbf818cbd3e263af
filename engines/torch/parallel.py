"""Tensor parallelism for the reference engine: Megatron-style shards of each layer, one rank per GPU (or CPU
process), torch.distributed (NCCL on GPUs, gloo on CPU) initialised from the MPI rank and size.

Rank 0 runs the scheduler. Before each forward pass it broadcasts the step's inputs (token ids, positions, block
tables) and every rank runs the same pass on its shard: attention heads and KV heads split across ranks, MLP
columns split, one all-reduce after attention and one after the MLP. Each rank keeps the KV of its own heads in a
pool of the same block geometry, so the block ids rank 0 hands out are valid everywhere."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engines.base import EngineError


@dataclass
class TensorParallel:
    rank: int
    size: int

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    def broadcast(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_from_mpi(device: torch.device, timeout_s: float = 120) -> TensorParallel:
    """One process group over the MPI world; rank 0 picks the rendezvous address and MPI hands it to the others."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    address = None
    if rank == 0:
        import socket

        host = os.environ.get("HPC_ADVERTISE_HOST") or socket.gethostname()
        with socket.socket() as s:
            s.bind(("", 0))
            address = f"tcp://{host}:{s.getsockname()[1]}"
    address = comm.bcast(address, root=0)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=address, rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return TensorParallel(rank, size)


def shard_(model, tp: TensorParallel) -> None:
    """Keep this rank's shard of every layer, in place."""
    cfg, r, n = model.config, tp.rank, tp.size
    if cfg.num_attention_heads % n or cfg.num_key_value_heads % n or cfg.intermediate_size % n:
        raise EngineError(f"tensor_parallel_size {n} must divide the attention heads ({cfg.num_attention_heads}), "
                          f"KV heads ({cfg.num_key_value_heads}) and MLP width ({cfg.intermediate_size})")

    def cut(linear, dim: int) -> None:
        linear.weight = torch.nn.Parameter(linear.weight.chunk(n, dim)[r].contiguous(), requires_grad=False)
        if linear.bias is not None:
            bias = linear.bias.chunk(n, 0)[r] if dim == 0 else (linear.bias if r == 0 else linear.bias * 0)
            linear.bias = torch.nn.Parameter(bias.contiguous(), requires_grad=False)

    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
            cut(lin, 0)  # output features: whole heads, whole MLP columns
        for lin in (a.o_proj, m.down_proj):
            cut(lin, 1)  # input features: partial sums, all-reduced after the layer
        a.h, a.kvh = a.h // n, a.kvh // n
    model.tp = tp
