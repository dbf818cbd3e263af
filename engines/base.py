"""The engine protocol shared by the torch reference engine, the mocker and TensorRT-LLM.

An engine serves four kinds of work: `generate` (aggregated), `prefill` (first token + KV blocks held for a peer),
`decode` (continue from KV blocks a peer filled), and `encode` (embeddings, multimodal). It exposes its KV pool as
one contiguous tensor of fixed-size blocks — all layers of a block side by side — so a run of adjacent blocks is one
contiguous byte range: the unit a transfer moves."""

from __future__ import annotations

import asyncio
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Protocol


class EngineError(Exception):
    """A request the engine cannot serve; the message says why."""


class KvCacheFull(EngineError):
    """Not enough free KV blocks now; `total` says whether there ever could be."""

    def __init__(self, needed: int, free: int, total: int):
        super().__init__(f"KV cache full: {needed} blocks needed, {free} free of {total}")
        self.needed, self.free, self.total = needed, free, total


class LayoutMismatch(EngineError):
    pass


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class KvLayout:
    """What a KV block holds, so two engines can tell whether one's blocks fit the other's."""

    dtype: str
    block_size: int  # tokens per block
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_bytes: int  # bytes of one block, all layers, K and V

    def mismatch(self, other: "KvLayout") -> str | None:
        """None when compatible, else which fields differ (ours vs theirs)."""
        diffs = [f"{name}: {getattr(self, name)} here, {getattr(other, name)} in the KV handle"
                 for name in ("dtype", "block_size", "num_layers", "num_kv_heads", "head_dim", "block_bytes")
                 if getattr(self, name) != getattr(other, name)]
        return "; ".join(diffs) or None


@dataclass
class ImageInput:
    """One image (or precomputed embedding) of a multimodal prompt: its embeddings [n, hidden] take the prompt's
    positions offset .. offset + n - 1, which hold the model's image token. `digest` names the content: the prefix
    cache keys those positions by it, so the same image reuses KV and a different one never does."""

    offset: int
    embeddings: Any  # a torch.Tensor [n, hidden]; None where the engine encodes the image itself (`data`)
    digest: bytes
    data: bytes | None = None  # the encoded image, for engines that take raw images (TensorRT-LLM)
    num_tokens: int = 0  # the prompt positions the frontend gave it (0: as many as embeddings)

    @property
    def length(self) -> int:
        return int(self.embeddings.shape[0]) if self.embeddings is not None else self.num_tokens


@dataclass
class EngineRequest:
    request_id: str
    prompt: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    images: list[ImageInput] = field(default_factory=list)


def content_keys(prompt: list[int], images: list[ImageInput]) -> list[int]:
    """The prompt as the prefix cache sees it: each image's positions carry a marker from its digest (negative, so
    it never equals a token id) instead of the image token."""
    if not images:
        return prompt
    keyed = list(prompt)
    for im in images:
        marker = -1 - int.from_bytes(im.digest[:8], "little")
        keyed[im.offset: im.offset + im.length] = [marker] * im.length
    return keyed


@dataclass
class TokenOutput:
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    cached_tokens: int = 0  # set on a request's first output: prompt tokens the prefix cache held
    timing: dict = field(default_factory=dict)  # on the first output: seconds in "queue" and prefill "compute"


@dataclass
class PrefillOutput:
    first_token: int
    finish_reason: str | None  # set when the first token already ends the request: no KV is held then
    block_ids: list[int]
    num_tokens: int  # tokens whose KV the blocks hold (the prompt)
    handoff: bytes | None = None  # engines that move their own KV: what their decode side needs (opaque)
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    timing: dict = field(default_factory=dict)  # seconds waiting for the engine ("queue") and computing ("compute")


@dataclass
class EngineStats:
    waiting: int = 0
    running: int = 0
    held: int = 0  # prefilled requests whose KV blocks wait for a decode worker to read them
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    reused_prompt_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (block reuse)


class Engine(Protocol):
    layout: KvLayout | None
    # True for engines that move their own KV between prefill and decode (TensorRT-LLM's cache transceiver): the
    # prefill returns an opaque `handoff` and the decode side continues with `decode_handoff`; the worker's
    # transfer layer stays out. False (torch, mocker): the engine exposes its pool and the worker moves blocks.
    moves_own_kv: bool

    def kv_pool(self): ...  # the pool tensor, shape [num_blocks, block_bytes] viewed as bytes

    def start(self, loop: asyncio.AbstractEventLoop) -> None: ...

    def shutdown(self) -> None: ...

    def generate(self, req: EngineRequest) -> AsyncIterator[TokenOutput]: ...

    async def prefill(self, req: EngineRequest) -> PrefillOutput: ...

    def allocate(self, request_id: str, num_tokens: int, max_new_tokens: int) -> list[int]: ...

    def decode(self, req: EngineRequest, first_token: int, block_ids: list[int],
               num_tokens: int) -> AsyncIterator[TokenOutput]: ...

    def decode_handoff(self, req: EngineRequest, handoff: bytes) -> AsyncIterator[TokenOutput]: ...

    def release(self, request_id: str) -> bool: ...

    def cancel(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...


class FreeBlocks:
    """The free block ids: a set (count, membership) and a byte per block, so that the first run of n adjacent free
    blocks is one bytes.find in C. Sorting the ids to find it took 33 us an allocation at 4k blocks, and a GPU pool
    has tens of thousands."""

    def __init__(self, num_blocks: int):
        self._ids = set(range(num_blocks))
        self._map = bytearray(b"\x01") * num_blocks

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self):
        return iter(self._ids)

    def add(self, block: int) -> None:
        self._ids.add(block)
        self._map[block] = 1

    def update(self, blocks) -> None:
        for b in blocks:
            self.add(b)

    def difference_update(self, blocks) -> None:
        for b in blocks:
            self._ids.discard(b)
            self._map[b] = 0

    def first_run(self, n: int) -> list[int] | None:
        """The lowest run of n adjacent free blocks, if there is one."""
        start = self._map.find(b"\x01" * n)
        return list(range(start, start + n)) if start >= 0 else None


class BlockAllocator:
    """Fixed-size KV blocks. Hands out the lowest free ids first, so a request's blocks tend to be adjacent and
    a transfer can move them as a few long ranges instead of many short ones."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = FreeBlocks(num_blocks)
        self._owned: dict[str, list[int]] = {}

    @property
    def free(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, owner: str, n: int) -> list[int]:
        if n > len(self._free):
            raise KvCacheFull(n, len(self._free), self.num_blocks)
        ids = self._contiguous(n) or sorted(self._free)[:n]
        self._free.difference_update(ids)
        self._owned.setdefault(owner, []).extend(ids)
        return ids

    def _contiguous(self, n: int) -> list[int] | None:
        """The first run of n adjacent free blocks, if there is one."""
        return self._free.first_run(n)

    def owned(self, owner: str) -> list[int]:
        return self._owned.get(owner, [])

    def free_owner(self, owner: str) -> int:
        ids = self._owned.pop(owner, [])
        self._free.update(ids)
        return len(ids)


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class StepOutputs:
    """The outputs of one engine step, handed to the event loop in one wake-up: a thread-safe call writes to the
    loop's wake-up pipe each time, and a step of 16 sequences made 16 of them."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: list | None = None  # collecting while a step runs

    @contextmanager
    def collecting(self):
        self.items = []
        try:
            yield
        finally:
            items, self.items = self.items, None
            if items:
                self.loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list) -> None:
    for outputs, item in items:
        outputs.put_nowait(item)


class Outputs:
    """One request's outputs on their way from the engine to the consumer: queued for a task that awaits them or,
    once the consumer attaches a callback, handed to it at once. An item is a TokenOutput (or PrefillOutput), or
    the exception that ended the request."""

    def __init__(self):
        self._queue: asyncio.Queue | None = None  # made when an output must wait: most go to a callback
        self._callback: Callable[[Any], None] | None = None

    def _waiting(self) -> asyncio.Queue:
        if self._queue is None:
            self._queue = asyncio.Queue()
        return self._queue

    def put_nowait(self, item) -> None:  # on the event loop's thread
        if self._callback is not None:
            self._callback(item)
        else:
            self._waiting().put_nowait(item)

    async def get(self):
        return await self._waiting().get()

    def empty(self) -> bool:
        return self._queue is None or self._queue.empty()

    def get_nowait(self):
        return self._waiting().get_nowait()

    def attach(self, callback: Callable[[Any], None]) -> None:
        """Hand `callback` what is queued, then each further output as it is put."""
        while not self.empty():
            callback(self._queue.get_nowait())
        self._callback = callback

    def detach(self) -> None:
        self._callback = None


class OutputStream(Outputs):
    """Outputs that an engine's own thread puts: each reaches the event loop with its step's (StepOutputs), or
    alone."""

    def __init__(self, loop: asyncio.AbstractEventLoop, step: StepOutputs | None = None):
        super().__init__()
        self._loop = loop
        self._step = step

    def put(self, item) -> None:  # called from any thread
        collecting = self._step.items if self._step is not None else None
        if collecting is not None:
            collecting.append((self, item))
        else:
            self._loop.call_soon_threadsafe(self.put_nowait, item)


def _output(item) -> TokenOutput:
    if isinstance(item, BaseException):
        raise item
    return item


class RequestOutputs:
    """A request's outputs until one finishes it: an async iterator, as `generate` and `decode` return. A
    consumer that leaves early cancels the request, so the engine stops working on it and frees its blocks.

    Outputs already waiting when one is taken go out as one: when the engine runs ahead of the path to the client
    (a loaded frontend, a busy network), each request then costs one message per batch of tokens, not per token.

    `follow(callback)` consumes them the other way: each output goes to the callback inside the engine step that
    made it. Iterating wakes the consumer's task once per output; at 64 streams that was most of a worker's CPU
    time per token."""

    def __init__(self, source: Outputs, cancel: Callable[[], None]):
        self._source, self._cancel = source, cancel
        self._ended = False  # finished, failed or closed: nothing more to take, nothing to cancel
        self._loop = asyncio.get_running_loop()

    def __del__(self):  # dropped unfinished and unclosed: cancel on the loop, as an async generator's finalizer does
        loop = getattr(self, "_loop", None)  # None: built outside a running loop, never started
        if loop is not None and not self._ended and not loop.is_closed():
            loop.call_soon_threadsafe(self._cancel)

    def __aiter__(self) -> "RequestOutputs":
        return self

    async def __anext__(self) -> TokenOutput:
        if self._ended:
            raise StopAsyncIteration
        try:
            out = _output(await self._source.get())
            while not out.finish_reason and not self._source.empty():
                more = _output(self._source.get_nowait())
                out = TokenOutput(out.token_ids + more.token_ids, more.finish_reason, more.error,
                                  out.cached_tokens, out.timing)
        except asyncio.CancelledError:
            raise
        except BaseException:
            self._ended = True
            raise
        self._ended = bool(out.finish_reason)
        return out

    async def follow(self, callback: Callable[[TokenOutput], None]) -> None:
        """Call `callback(output)` for each further output, on the event loop's thread, as the engine makes it;
        return once one finishes the request. An error, the engine's or the callback's, ends the wait with it."""
        done = asyncio.get_running_loop().create_future()

        def on_output(item) -> None:
            if done.done():
                return
            if isinstance(item, BaseException):  # the engine ended the request with it
                self._ended = True
                done.set_exception(item)
                return
            try:
                callback(item)
            except Exception as e:
                done.set_exception(e)
                return
            if item.finish_reason:
                self._ended = True
                done.set_result(None)

        self._source.attach(on_output)
        try:
            await done
        finally:
            self._source.detach()

    async def aclose(self) -> None:
        self._source.detach()
        if not self._ended:
            self._ended = True
            self._cancel()
