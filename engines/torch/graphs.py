"""CUDA graphs of the decode step: the whole forward pass of a batch of sequences that each add one token,
captured once per (batch size, block-table width) bucket and replayed, so that a step costs one launch instead of
hundreds of Python-issued kernels (TensorRT-LLM's `cuda_graph_config`, vLLM's CUDA graphs).

The graph's inputs live in static buffers that each step fills. A batch is padded to its bucket with rows that
write their KV into a scratch block the allocator never hands out, and attend only to it; a block table is padded
with that block too. Mixed steps (a prefill chunk beside decodes), tensor parallelism and image embeddings run
eagerly."""

from __future__ import annotations

import torch

from engines.torch.model import DecodeBatch, LlamaForCausalLM

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


def bucket(n: int, sizes) -> int | None:
    return next((s for s in sizes if s >= n), None)


class _Graph:
    def __init__(self, batch: int, width: int, block_size: int, device: torch.device, scratch: int):
        self.batch, self.width = batch, width
        self.ids = torch.zeros(batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.slot_block = torch.full((batch,), scratch, dtype=torch.long, device=device)
        self.slot_off = torch.zeros(batch, dtype=torch.long, device=device)
        self.table = torch.full((batch, width), scratch, dtype=torch.long, device=device)
        self.mask = torch.zeros((batch, 1, 1, width * block_size), dtype=torch.bool, device=device)
        self.lengths = torch.ones(batch, dtype=torch.long, device=device)
        self.rows = torch.arange(batch, device=device)
        self.graph = torch.cuda.CUDAGraph()
        self.logits: torch.Tensor | None = None


class DecodeGraphs:
    def __init__(self, model: LlamaForCausalLM, pool: torch.Tensor, block_size: int, scratch_block: int,
                 batch_sizes=DEFAULT_BATCH_SIZES, max_width: int = 1 << 16, paged: bool = False):
        self.model, self.pool, self.bs, self.scratch = model, pool, block_size, scratch_block
        self.paged = paged
        self.batch_sizes = tuple(sorted(batch_sizes))
        self.max_width = max_width
        self.device = pool.device
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.memory_pool = torch.cuda.graph_pool_handle()
        self.replays = 0

    def fits(self, n: int, width: int) -> bool:
        return bucket(n, self.batch_sizes) is not None and width <= self.max_width

    def run(self, ids: list[int], positions: list[int], tables: list[list[int]]) -> torch.Tensor:
        """Logits [n, vocab] (float32) of one decode step: token `ids[i]` at `positions[i]` of sequence i, whose
        context (that position included) lives in blocks `tables[i]`."""
        n = len(ids)
        width = max(len(t) for t in tables)
        g = self._graph(bucket(n, self.batch_sizes), 1 << (width - 1).bit_length())
        bs = self.bs
        dev = self.device
        table = torch.full((g.batch, g.width), self.scratch, dtype=torch.long)
        for i, t in enumerate(tables):
            table[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        lengths = torch.ones(g.batch, dtype=torch.long)  # padding rows attend to their one scratch slot
        lengths[:n] = torch.tensor(positions, dtype=torch.long) + 1
        pos = torch.zeros(g.batch, dtype=torch.long)
        pos[:n] = torch.tensor(positions, dtype=torch.long)
        slot_block = torch.full((g.batch,), self.scratch, dtype=torch.long)
        slot_block[:n] = torch.tensor([t[p // bs] for t, p in zip(tables, positions)], dtype=torch.long)
        token = torch.zeros(g.batch, dtype=torch.long)
        token[:n] = torch.tensor(ids, dtype=torch.long)
        # One host-to-device copy per buffer; the mask is built on the device from the lengths.
        g.ids.copy_(token, non_blocking=True)
        g.positions.copy_(pos, non_blocking=True)
        g.slot_block.copy_(slot_block, non_blocking=True)
        g.slot_off.copy_(torch.where(torch.arange(g.batch) < n, pos % bs, 0), non_blocking=True)
        g.table.copy_(table, non_blocking=True)
        g.lengths.copy_(lengths, non_blocking=True)
        if not self.paged:  # the paged kernel reads the lengths; the gather + SDPA path needs the mask
            g.mask.copy_((torch.arange(g.width * bs, device=dev)[None, :] < g.lengths[:, None])[:, None, None, :])
        g.graph.replay()
        self.replays += 1
        return g.logits[:n]

    def _forward(self, g: _Graph) -> torch.Tensor:
        return self.model(g.ids, g.positions, [], self.pool, g.slot_block, g.slot_off, g.rows,
                          DecodeBatch(g.rows, g.table, g.mask, g.lengths, self.paged))

    def _graph(self, batch: int, width: int) -> _Graph:
        key = (batch, width)
        g = self.graphs.get(key)
        if g is None:
            g = _Graph(batch, width, self.bs, self.device, self.scratch)
            g.mask[:, :, :, 0] = True
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream), torch.inference_mode():
                for _ in range(2):  # warm up outside the graph (allocator, kernel selection)
                    self._forward(g)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            # thread_local: CUDA calls of other threads (NIXL/UCX reading KV into the pool) may run during a
            # capture. In the default global mode they fail or invalidate it, the suspected cause of a failed
            # disaggregated run (docs/benchmarks.md).
            with torch.inference_mode(), torch.cuda.graph(g.graph, pool=self.memory_pool,
                                                          capture_error_mode="thread_local"):
                g.logits = self._forward(g)
            self.graphs[key] = g
        return g
