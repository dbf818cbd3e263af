"""The mocker: no model, simulated timing, real KV bytes.

Prefill takes `prefill_overhead_ms + tokens / prefill_tokens_per_s` (one prefill at a time, as on one GPU); each
decode step takes `decode_step_ms + per-sequence + per-context` time for the whole running batch. With block reuse
(TensorRT-LLM's `enable_block_reuse`, on unless the engine YAML turns it off) prefill skips the leading full blocks
a recent prompt already computed, as a real engine's prefix cache does: the timing a KV-aware router is for. Tokens are a
deterministic function of the prompt and position, so aggregated and disaggregated runs agree. The KV pool is real
memory: prefill writes a pattern into its blocks and a decode worker that pulls them moves real bytes through NIXL,
so the transport is exercised at scale without GPUs. A full pool makes a new request wait for blocks, as a real
engine's scheduler does."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from engines.base import (BlockAllocator, EngineError, EngineRequest, EngineStats, KvCacheFull, KvLayout, Outputs,
                          PrefillOutput, RequestOutputs, TokenOutput, blocks_for, content_keys)
from engines.prefix_cache import block_hashes


async def sleep_until(deadline: float) -> None:
    """Until time.perf_counter() reaches `deadline`, and at least one turn of the event loop. uvloop's timers count
    whole milliseconds, so one sleep can end up to 1 ms early: the simulated GPU time must never be shorter than
    the model says."""
    await asyncio.sleep(max(0.0, deadline - time.perf_counter()))
    while (left := deadline - time.perf_counter()) > 0:
        await asyncio.sleep(left)


@dataclass
class MockerOptions:
    prefill_tokens_per_s: float = 250_000
    prefill_overhead_ms: float = 2.0
    decode_step_ms: float = 6.0
    decode_ms_per_sequence: float = 0.02
    decode_ms_per_1k_context: float = 0.01
    kv_bytes_per_token: int = 4096
    vocab_size: int = 32000
    block_size: int = 16
    num_blocks: int = 4096
    max_batch_size: int = 256
    max_seq_len: int = 131072
    eos_token_id: int | None = None
    block_reuse: bool = True
    encode_ms_per_image: float = 0.0  # a vision tower's cost per image (E/P/D timing)
    hidden_size: int = 4096  # of the embeddings it makes up for images, and takes from embedding files


@dataclass
class _Running:
    req: EngineRequest
    context: int
    generated: int
    queue: Outputs = field(default_factory=Outputs)
    seed: int = field(init=False)  # prompt_seed(req.prompt), made once
    prefill: asyncio.Task | None = None  # generate()'s prefill, until the first token

    def __post_init__(self):
        self.seed = prompt_seed(self.req.prompt)


class PrefixCache:
    """Which prompt blocks were computed recently (LRU, as many as the KV pool has blocks): the timing model of
    engines/prefix_cache.py, without sharing real blocks."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._blocks: OrderedDict[bytes, None] = OrderedDict()

    def hit_blocks(self, hashes: list[bytes]) -> int:
        n = 0
        for h in hashes:
            if h not in self._blocks:
                break
            self._blocks.move_to_end(h)
            n += 1
        return n

    def add(self, hashes: list[bytes]) -> None:
        for h in hashes:
            self._blocks[h] = None
            self._blocks.move_to_end(h)
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)


def prompt_seed(prompt: list[int]) -> int:
    """What a request's tokens depend on (its last 16 prompt tokens and its length), hashed once per request.
    Python's hash of a tuple of ints is the same in every process (hash randomisation covers str and bytes only),
    so prefill and decode workers agree; a blake2b of the tuple's repr cost several times as much."""
    return hash((*prompt[-16:], len(prompt))) & _MASK


_MASK = (1 << 64) - 1
# Python 3.12+ starts a request's prefill at once, not on the event loop's next turn: a zero-time prefill gives its
# first token before generate() returns.
_EAGER = {"eager_start": True} if sys.version_info >= (3, 12) else {}


def mock_token(seed: int, index: int, vocab: int) -> int:
    """The index-th generated token of the request whose prompt_seed is `seed`: the same on every worker (prefill
    and decode workers agree). SplitMix64's finaliser, integer arithmetic only: a hash per token was a tenth of a
    busy worker's time."""
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return (z ^ (z >> 31)) % vocab


class MockerEngine:
    moves_own_kv = False  # the worker moves KV blocks out of this engine's pool

    def __init__(self, options: MockerOptions | None = None):
        self.o = o = options or MockerOptions()
        block_bytes = max(1, o.kv_bytes_per_token * o.block_size)
        self.pool = torch.zeros((o.num_blocks, block_bytes), dtype=torch.uint8)
        self.layout = KvLayout("uint8", o.block_size, 1, 1, o.kv_bytes_per_token, block_bytes)
        self._alloc = BlockAllocator(o.num_blocks)
        self._prefill_lock: asyncio.Lock | None = None
        self._running: dict[str, _Running] = {}
        self._prefilling: dict[str, _Running] = {}  # generate()'s requests before their first token
        self._waiting = 0
        self._held: set[str] = set()
        self._wakeup: asyncio.Event | None = None
        self._freed: asyncio.Event | None = None  # set when blocks go back to the pool: for requests waiting for room
        self._task: asyncio.Task | None = None
        self._prompt_tokens = self._generated_tokens = self._reused_tokens = 0
        self._prefix = PrefixCache(o.num_blocks) if o.block_reuse else None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._prefill_lock = asyncio.Lock()
        self._wakeup = asyncio.Event()
        self._freed = asyncio.Event()
        self._task = loop.create_task(self._decode_loop())

    def shutdown(self) -> None:
        if self._task:
            self._task.cancel()

    def kv_pool(self) -> torch.Tensor:
        return self.pool

    def _check(self, req: EngineRequest) -> None:
        if not req.prompt:
            raise EngineError("the prompt is empty")
        if len(req.prompt) + req.sampling.max_tokens > self.o.max_seq_len:
            raise EngineError(f"prompt of {len(req.prompt)} tokens + max_tokens {req.sampling.max_tokens} exceeds "
                              f"the model's context of {self.o.max_seq_len} tokens")

    def _reason(self, req: EngineRequest, token: int, generated: int) -> str | None:
        p = req.sampling
        if token in p.stop_token_ids or (token == self.o.eos_token_id and not p.ignore_eos):
            return "stop"
        return "length" if generated >= p.max_tokens else None

    async def _compute_prefill(self, req: EngineRequest, blocks: list[int], seed: int,
                               fill: bool) -> tuple[int, dict]:
        """Simulated prefill; returns the prompt tokens the prefix cache held, and the seconds in queue and compute.
        With `fill`, a pattern goes into the blocks: the bytes a decode worker pulls (generate() keeps its KV here,
        and nothing reads it)."""
        self._waiting += 1
        t0 = time.perf_counter()
        try:
            async with self._prefill_lock:
                t1 = time.perf_counter()
                n = len(req.prompt)
                hashes = block_hashes(content_keys(req.prompt, req.images), self.o.block_size) if self._prefix else []
                # The last prompt token is always computed: its logits give the first token.
                reused = min(self._prefix.hit_blocks(hashes) * self.o.block_size, n - 1) if self._prefix else 0
                delay = self.o.prefill_overhead_ms / 1000 + (n - reused) / self.o.prefill_tokens_per_s
                if fill:  # real bytes for the transfer to move
                    pattern = mock_token(seed, -1, 256)
                    for b in blocks:
                        self.pool[b].fill_(pattern)
                if delay >= 1e-6:  # a prefill of no time holds the "GPU" for no event-loop turn either
                    # The modelled time counts from the lock: the host's own work (hashing, the pattern) is part
                    # of it, not added to it, so the timing follows the model wherever the host keeps up.
                    await sleep_until(t1 + delay)
                if self._prefix:
                    self._prefix.add(hashes)
                self._prompt_tokens += n
                self._reused_tokens += reused
                return reused, {"queue": t1 - t0, "compute": time.perf_counter() - t1}
        finally:
            self._waiting -= 1

    def _free(self, owner: str) -> int:
        freed = self._alloc.free_owner(owner)
        if freed and self._freed is not None:
            self._freed.set()
        return freed

    async def _allocate(self, owner: str, tokens: int) -> list[int]:
        """Blocks for a new request; with the pool full it waits for running requests to free theirs, as a real
        engine's scheduler holds a request it cannot admit yet (one that could never fit fails at once)."""
        n = blocks_for(tokens, self.o.block_size)
        self._waiting += 1
        try:
            while True:
                try:
                    return self._alloc.allocate(owner, n)
                except KvCacheFull as e:
                    if e.needed > e.total:
                        raise
                self._freed.clear()
                await self._freed.wait()
        finally:
            self._waiting -= 1

    async def _first_token(self, req: EngineRequest, reserve_tokens: int, fill: bool) -> tuple[
            int, str | None, list[int], int, dict]:
        """Prefill, then the first token; the blocks are freed again if that token already ends the request."""
        self._check(req)
        blocks = await self._allocate(req.request_id, reserve_tokens)
        seed = prompt_seed(req.prompt)
        try:
            cached, timing = await self._compute_prefill(req, blocks, seed, fill)
        except BaseException:
            self._free(req.request_id)
            raise
        first = mock_token(seed, 0, self.o.vocab_size)
        self._generated_tokens += 1
        reason = self._reason(req, first, 1)
        if reason:
            self._free(req.request_id)
        return first, reason, blocks, cached, timing

    async def prefill(self, req: EngineRequest) -> PrefillOutput:
        first, reason, blocks, cached, timing = await self._first_token(req, len(req.prompt), fill=True)
        if reason:
            return PrefillOutput(first, reason, [], len(req.prompt), cached_tokens=cached, timing=timing)
        self._held.add(req.request_id)
        return PrefillOutput(first, None, blocks, len(req.prompt), cached_tokens=cached, timing=timing)

    def allocate(self, request_id: str, num_tokens: int, max_new_tokens: int) -> list[int]:
        return self._alloc.allocate(request_id, blocks_for(num_tokens + max_new_tokens, self.o.block_size))

    def release(self, request_id: str) -> bool:
        self._held.discard(request_id)
        return self._free(request_id) > 0

    def cancel(self, request_id: str) -> None:
        r = self._running.pop(request_id, None) or self._prefilling.pop(request_id, None)
        if r:
            if r.prefill is not None:
                r.prefill.cancel()  # its blocks are freed as the cancellation unwinds the prefill
            self._free(request_id)
            r.queue.put_nowait(TokenOutput([], "cancelled"))

    def generate(self, req: EngineRequest) -> RequestOutputs:
        r = _Running(req, len(req.prompt) + 1, 1)
        self._prefilling[req.request_id] = r  # before the task starts: it may run to its end at once
        task = asyncio.Task(self._prefill_then_decode(r), loop=asyncio.get_running_loop(), **_EAGER)
        if not task.done():
            r.prefill = task
        return RequestOutputs(r.queue, lambda: self.cancel(req.request_id))

    async def _prefill_then_decode(self, r: _Running) -> None:
        """generate()'s first token; then the request joins the running batch. A failure goes to the consumer."""
        req = r.req
        try:
            first, reason, _, cached, timing = await self._first_token(req, len(req.prompt) + req.sampling.max_tokens,
                                                                        fill=False)
        except asyncio.CancelledError:
            return  # cancel() told the consumer
        except Exception as e:
            self._prefilling.pop(req.request_id, None)
            r.queue.put_nowait(e)
            return
        if self._prefilling.pop(req.request_id, None) is None:
            return  # cancelled while the prefill finished
        r.prefill = None
        if not reason:
            self._running[req.request_id] = r
            self._wakeup.set()
        r.queue.put_nowait(TokenOutput([first], reason, cached_tokens=cached, timing=timing))

    def decode(self, req: EngineRequest, first_token: int, block_ids: list[int],
               num_tokens: int) -> RequestOutputs:
        self._check(req)
        r = _Running(req, num_tokens + 1, 1)
        self._running[req.request_id] = r
        self._wakeup.set()
        return RequestOutputs(r.queue, lambda: self.cancel(req.request_id))

    async def _decode_loop(self) -> None:
        while True:
            if not self._running:
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = list(self._running.values())[: self.o.max_batch_size]
            context = sum(r.context for r in batch)
            await sleep_until(time.perf_counter() + (self.o.decode_step_ms + self.o.decode_ms_per_sequence * len(batch)
                                                     + self.o.decode_ms_per_1k_context * context / 1000) / 1000)
            for r in batch:
                if r.req.request_id not in self._running:
                    continue
                token = mock_token(r.seed, r.generated, self.o.vocab_size)
                r.generated += 1
                r.context += 1
                self._generated_tokens += 1
                reason = self._reason(r.req, token, r.generated)
                if reason:
                    self._running.pop(r.req.request_id, None)
                    self._free(r.req.request_id)
                r.queue.put_nowait(TokenOutput([token], reason))

    @property
    def hidden_size(self) -> int:
        return self.o.hidden_size

    async def encode_images_async(self, images: list[bytes], tokens: list[int]) -> list[torch.Tensor]:
        """Made-up embeddings (zeros) of the positions each image takes, after the configured encode time. The
        vision tower shares the simulated GPU with prefill, as it does on a prefill worker that encodes (EP/D)."""
        async with self._prefill_lock:
            await sleep_until(time.perf_counter() + self.o.encode_ms_per_image * len(images) / 1000)
        return [torch.zeros(n, self.o.hidden_size) for n in tokens]

    def stats(self) -> EngineStats:
        return EngineStats(self._waiting, len(self._running), len(self._held), self.o.num_blocks, self._alloc.free,
                           self._prompt_tokens, self._generated_tokens, self._reused_tokens)
