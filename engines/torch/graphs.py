"""CUDA graphs of the decode step: the whole forward pass of a batch of sequences that each add one token,
captured once per (batch size, block-table width) bucket and replayed, so that a step costs one launch instead of
hundreds of Python-issued kernels (TensorRT-LLM's `cuda_graph_config`, vLLM's CUDA graphs).

The graph's inputs live in static buffers that each step fills. A batch is padded to its bucket with rows that
write their KV into a scratch block the allocator never hands out, and attend only to it; a block table is padded
with that block too. Mixed steps (a prefill chunk beside decodes), tensor parallelism and image embeddings run
eagerly."""

from __future__ import annotations

import torch

from engines.torch.fused import argmax_rows
from engines.torch.model import DecodeBatch, LlamaForCausalLM

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


def bucket(n: int, sizes) -> int | None:
    return next((s for s in sizes if s >= n), None)


class _Graph:
    """One captured bucket. Its inputs are views of one device buffer, filled each step from a pinned host buffer
    by one copy: ids, positions, KV slots, context lengths, the rows of the previous step's tokens to take as ids
    (read outside the graph), block table. Two host buffers take turns: when steps run ahead of the host, the copy
    of the step before may not have run yet when the next one is prepared."""

    ROWS = 6

    def __init__(self, batch: int, width: int, block_size: int, device: torch.device, scratch: int):
        self.batch, self.width, self.scratch = batch, width, scratch
        size = self.ROWS * batch + batch * width
        self.hosts = [torch.zeros(size, dtype=torch.long, pin_memory=True) for _ in range(2)]
        self.turn = 0
        self.dev = torch.zeros(size, dtype=torch.long, device=device)
        (self.ids, self.positions, self.slot_block, self.slot_off, self.lengths,
         self.source) = self.dev[: self.ROWS * batch].view(self.ROWS, batch)
        self.table = self.dev[self.ROWS * batch:].view(batch, width)
        self.slot_block.fill_(scratch)
        self.table.fill_(scratch)
        self.lengths.fill_(1)
        self.mask = torch.zeros((batch, 1, 1, width * block_size), dtype=torch.bool, device=device)
        self.rows = torch.arange(batch, device=device)
        self.graph = torch.cuda.CUDAGraph()
        self.logits: torch.Tensor | None = None
        self.tokens: torch.Tensor | None = None  # the logits' argmax, computed in the graph (greedy decoding)


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

    def run(self, ids: list[int] | None, positions: list[int], tables: list[list[int]],
            previous: tuple[torch.Tensor, list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [n, vocab] (float32), their argmax [n]) of one decode step: token `ids[i]` at `positions[i]` of
        sequence i, whose context (that position included) lives in blocks `tables[i]`. With `previous` = (tokens
        on the device, rows), sequence i's token is tokens[rows[i]]: the previous step's output, which the host has
        not read yet. Nothing here waits for the device."""
        n = len(positions)
        width = max(len(t) for t in tables)
        g = self._graph(bucket(n, self.batch_sizes), 1 << (width - 1).bit_length())
        bs, b = self.bs, g.batch
        # Filled with numpy in pinned memory, moved by one asynchronous copy: building these as torch tensors
        # with six pageable copies took 0.4 ms of host time a step at batch 1 and 0.9 ms at 16 (H100).
        host = g.hosts[g.turn]
        g.turn ^= 1
        h = host.numpy()
        h[: g.ROWS * b] = 0
        h[b: 2 * b][:n] = positions
        if previous is None:
            h[:n] = ids
        else:
            h[5 * b: 5 * b + n] = previous[1]
        h[2 * b: 3 * b] = self.scratch  # padding rows write their KV to the scratch block and attend to it only
        h[2 * b: 2 * b + n] = [t[p // bs] for t, p in zip(tables, positions)]
        h[3 * b: 3 * b + n] = [p % bs for p in positions]
        h[4 * b: 5 * b] = 1
        h[4 * b: 4 * b + n] = [p + 1 for p in positions]
        table = h[g.ROWS * b:].reshape(b, g.width)
        table.fill(self.scratch)
        for i, t in enumerate(tables):
            table[i, : len(t)] = t
        g.dev.copy_(host, non_blocking=True)
        if previous is not None:
            torch.index_select(previous[0], 0, g.source[:n], out=g.ids[:n])
        if not self.paged:  # the paged kernel reads the lengths; the gather + SDPA path needs the mask
            g.mask.copy_((torch.arange(g.width * bs, device=self.device)[None, :] < g.lengths[:, None])
                         [:, None, None, :])
        g.graph.replay()
        self.replays += 1
        return g.logits[:n], g.tokens[:n]

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
                g.tokens = argmax_rows(g.logits)
            self.graphs[key] = g
        return g
