"""A request's images as embeddings for the engine.

- Aggregated workers, and prefill workers of EP/D deployments, encode images themselves (the engine's vision tower
  and projector) and load embedding files.
- In E/P/D deployments the prefill worker asks an encode worker (the least busy, from etcd) and reads the
  embeddings it holds through NIXL: a READ into a registered inbox, with a notification that lets the encode worker
  free them, and a deadline. An encode worker that dies fails the request, cleanly.
- The encode worker keeps recent embeddings by content digest (LRU, bounded in bytes), so the same image is
  encoded once.

Embeddings in flight live in an EmbeddingStage: a byte pool of fixed-size blocks registered with NIXL once, the
same transport and the same handle as KV blocks."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import OrderedDict
from contextlib import aclosing
from pathlib import Path

import torch

from engines.base import BlockAllocator, ImageInput, blocks_for
from hpc.runtime.discovery import WorkerDirectory
from hpc.runtime.embeddings import EmbeddingFileError, read_embedding
from hpc.runtime.messaging import PeerGone, RequestTimeout
from hpc.runtime.protocol import (EmbeddingHandle, EncodeRequest, EncodeResult, ErrorReply, GenerateRequest,
                                  KvLayout, MultimodalPart, decode_reply, encode)
from hpc.runtime.transfer import KvTransfer, TransferError

log = logging.getLogger("workers.media")
STAGE_BLOCK_BYTES = 64 << 10
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class MediaFailure(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class EmbeddingStage:
    """Embeddings in flight between workers: a [num_blocks, block_bytes] byte pool registered with NIXL."""

    def __init__(self, name: str, host: str, megabytes: int, device: torch.device):
        num_blocks = max(16, (megabytes << 20) // STAGE_BLOCK_BYTES)
        self.pool = torch.zeros((num_blocks, STAGE_BLOCK_BYTES), dtype=torch.uint8, device=device)
        self.alloc = BlockAllocator(num_blocks)
        layout = KvLayout("uint8", 1, 1, 1, STAGE_BLOCK_BYTES, STAGE_BLOCK_BYTES)  # blocks of plain bytes
        self.transfer = KvTransfer(name, self.pool, layout, host, intra_node="nixl")

    def blocks(self, owner: str, nbytes: int) -> list[int]:
        need = blocks_for(nbytes, STAGE_BLOCK_BYTES)
        if not self.alloc.can_allocate(need):
            raise MediaFailure("unavailable", f"the embedding buffer is full ({need} blocks of "
                                              f"{STAGE_BLOCK_BYTES >> 10} KiB needed)")
        return self.alloc.allocate(owner, need)

    def put(self, owner: str, tensor: torch.Tensor) -> EmbeddingHandle:
        raw = tensor.contiguous().view(-1).view(torch.uint8)
        ids = self.blocks(owner, raw.numel())
        padded = torch.zeros(len(ids) * STAGE_BLOCK_BYTES, dtype=torch.uint8, device=self.pool.device)
        padded[: raw.numel()] = raw.to(self.pool.device)
        self.pool[torch.tensor(ids, device=self.pool.device)] = padded.view(len(ids), STAGE_BLOCK_BYTES)
        handle = self.transfer.handle(ids, len(ids))
        return EmbeddingHandle(handle, list(tensor.shape), str(tensor.dtype).removeprefix("torch."), raw.numel())

    def take(self, ids: list[int], shape: list[int], dtype: str, nbytes: int) -> torch.Tensor:
        flat = self.pool[torch.tensor(ids, device=self.pool.device)].view(-1)[:nbytes]
        return flat.clone().view(DTYPES[dtype]).view(*shape)

    def free(self, owner: str) -> None:
        self.alloc.free_owner(owner)

    def close(self) -> None:
        self.transfer.close()


class EncodeCache:
    """Embeddings by content digest, least recently used out first, at most `max_bytes` in all."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self._items: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, digest: bytes) -> torch.Tensor | None:
        t = self._items.get(digest)
        if t is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(digest)
        return t

    def put(self, digest: bytes, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if size > self.max_bytes or digest in self._items:
            return
        self._items[digest] = tensor
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()


async def embeddings_of(engine, parts: list[MultimodalPart]) -> list[torch.Tensor]:
    """Images encoded by the engine (in a thread: the vision tower is compute) and embedding files loaded; each
    checked against the positions the frontend gave it."""
    images = [p.data for p in parts if p.kind == "image"]
    tokens = [p.num_tokens for p in parts if p.kind == "image"]
    if not images:
        encoded = iter([])
    elif hasattr(engine, "encode_images_async"):  # the mocker (simulated time), TensorRT-LLM's encoder
        encoded = iter(await engine.encode_images_async(images, tokens))
    elif hasattr(engine, "encode_images"):  # a vision tower: compute, in a thread
        encoded = iter(await asyncio.to_thread(engine.encode_images, images, tokens))
    else:
        raise MediaFailure("bad_request", f"the {type(engine).__name__} does not take images yet")
    own_count = getattr(engine, "counts_own_image_tokens", False)
    out = []
    for i, p in enumerate(parts):
        if p.kind == "image":
            t = next(encoded)
        elif p.kind == "embedding_file":
            try:
                t, _ = await asyncio.to_thread(read_embedding, Path(p.path), engine.hidden_size)
            except EmbeddingFileError as e:
                raise MediaFailure("bad_request", f"image {i}: {p.path}: {e}") from None
        else:
            raise MediaFailure("bad_request", f"image {i}: a {p.kind} part cannot be encoded here")
        if t.shape[0] != p.num_tokens and not (own_count and p.kind == "image"):
            raise MediaFailure("bad_request", f"image {i}: {t.shape[0]} embeddings for {p.num_tokens} image "
                                              f"positions")
        out.append(t)
    return out


class RemoteEncoders:
    """A prefill (or aggregated) worker's view of the deployment's encode workers, and its NIXL inbox."""

    def __init__(self, worker):
        self.w = worker
        self.directory = WorkerDirectory(worker.etcd, worker.keys.workers)
        self.in_flight: dict[str, int] = {}
        self._turn = itertools.count()
        self.inbox: EmbeddingStage | None = None

    async def start(self) -> None:
        await self.directory.start()
        o = self.w.o
        self.inbox = EmbeddingStage(f"{o.deployment}.{o.worker_id}.inbox", o.host, o.embedding_buffer_mb,
                                    self.w.engine_device())

    def choose(self, model: str):
        workers = self.directory.by_role("encode", model)
        if not workers:
            raise MediaFailure("unavailable", f"no encode worker serves model {model!r}")
        least = min(self.in_flight.get(w.worker_id, 0) for w in workers)
        best = [w for w in workers if self.in_flight.get(w.worker_id, 0) == least]
        return best[next(self._turn) % len(best)]

    async def resolve(self, req: GenerateRequest) -> list[torch.Tensor]:
        worker = self.choose(req.model)
        wid = worker.worker_id
        self.in_flight[wid] = self.in_flight.get(wid, 0) + 1
        timeout = self.w.o.transfer_timeout
        try:
            reply = None
            stream = self.w.bus.stream(worker.subject, encode(EncodeRequest(req.request_id, req.model,
                                                                             list(req.multimodal))),
                                       timeout, timeout, gone=self.directory.gone(wid))
            async with aclosing(stream) as replies:
                async for batch in replies:
                    reply = decode_reply(batch[0])
                    break
        except PeerGone:
            raise MediaFailure("unavailable", f"encode worker {wid} left before it answered") from None
        except RequestTimeout:
            raise MediaFailure("timeout", f"encode worker {wid} did not answer within {timeout:g} s") from None
        finally:
            self.in_flight[wid] -= 1
        if isinstance(reply, ErrorReply):
            raise MediaFailure(reply.code, f"encode worker {wid}: {reply.message}")
        if not isinstance(reply, EncodeResult) or len(reply.parts) != len(req.multimodal):
            raise MediaFailure("internal", f"encode worker {wid} sent {type(reply).__name__}")
        return [await self.read(part, f"{req.request_id}.{i}", timeout) for i, part in enumerate(reply.parts)]

    async def read(self, part: MultimodalPart, owner: str, timeout: float) -> torch.Tensor:
        e = part.embedding
        ids = self.inbox.blocks(owner, e.nbytes)
        try:
            t0 = time.perf_counter()
            result = await self.inbox.transfer.read(e.blocks, ids, owner, timeout)
            self.w.metrics.embedding_bytes.inc(e.nbytes)
            self.w.metrics.embedding_seconds.observe(time.perf_counter() - t0)
            self.w.metrics.embedding_gbps.set(result.gbps)
            return self.inbox.take(ids, e.shape, e.dtype, e.nbytes)
        except TransferError as err:
            raise MediaFailure("internal", f"embedding transfer failed: {err}") from None
        finally:
            self.inbox.free(owner)

    async def close(self) -> None:
        await self.directory.stop()
        if self.inbox:
            self.inbox.close()


def image_inputs(parts: list[MultimodalPart], tensors: list[torch.Tensor]) -> list[ImageInput]:
    return [ImageInput(p.offset, t, p.digest, num_tokens=p.num_tokens) for p, t in zip(parts, tensors)]



async def raw_image_inputs(engine, parts: list[MultimodalPart]) -> list[ImageInput]:
    """For an engine with its own image processing (TensorRT-LLM): images as they came, embedding files loaded."""
    files = [p for p in parts if p.kind != "image"]
    loaded = iter(await embeddings_of(engine, files) if files else [])
    return [ImageInput(p.offset, None, p.digest, data=p.data, num_tokens=p.num_tokens) if p.kind == "image"
            else ImageInput(p.offset, next(loaded), p.digest, num_tokens=p.num_tokens) for p in parts]
