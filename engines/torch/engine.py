"""The reference engine: continuous batching over a paged KV cache, chunked prefill under a token budget.

One thread runs the model. Each step takes one token from every running sequence (decode), then fills the rest of
`max_num_tokens` with prompt chunks of waiting sequences (prefill), runs one packed forward pass, samples, and
hands results to each request's asyncio consumer. New requests join between steps."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import torch

from engines.base import (BlockAllocator, EngineError, EngineRequest, EngineStats, KvLayout, OutputStream,
                          PrefillOutput, RequestOutputs, StepOutputs, TokenOutput, blocks_for, content_keys)
from engines.sampling import sample
from engines.torch import paged_attention
from engines.torch.fused import argmax_rows
from engines.torch.loader import load_model, load_vision, random_model, read_config, resolve_dtype
from engines.prefix_cache import CachingBlockAllocator, block_hashes, next_hash
from engines.torch.model import DecodeBatch, LlamaForCausalLM, SeqBatch, fuse_projections
from engines.torch.vision import ImageProcessing

log = logging.getLogger(__name__)


@dataclass
class TorchEngineOptions:
    device: str = "auto"
    dtype: str = "auto"
    block_size: int = 16
    num_blocks: int | None = None  # default: 1024 on CPU, free_gpu_memory_fraction of free memory on a GPU
    free_gpu_memory_fraction: float = 0.5
    max_num_tokens: int = 8192
    max_batch_size: int = 256
    enable_chunked_prefill: bool = True
    random_weights: bool = False  # ignore safetensors; random weights from config.json (benchmarks)
    seed: int = 0
    enable_block_reuse: bool = True  # prefix caching (engines/prefix_cache.py)
    cuda_graphs: bool = False  # decode steps as CUDA graphs (engines/torch/graphs.py); on GPUs only
    paged_attention: bool = True  # decode attention from the paged pool (a Triton kernel), where Triton and a GPU are
    fused_kernels: bool = True  # rotary + KV write, residual + RMSNorm, SiLU x up as Triton kernels (GPU + Triton)
    skinny_kernel: bool = True  # projections of <= 16 rows (decode) as engines/torch/skinny.py's kernel, not cuBLAS
    graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    # Greedy decode steps run one ahead of the host: the next step starts from the tokens still on the device while
    # the host reads, checks and hands out the last ones (the overlap scheduler of SGLang and TensorRT-LLM).
    overlap_decode: bool = True


@dataclass
class _Seq:
    req: EngineRequest
    mode: str  # "generate" | "prefill" | "decode"
    tokens: list[int]
    num_prompt: int
    reserve_tokens: int
    out: OutputStream
    num_computed: int = 0
    generated: int = 0
    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # of its full blocks of tokens, as far as known
    registered: int = 0  # its first blocks that the prefix cache knows
    cached: int = 0  # prompt tokens whose KV the prefix cache held at admission
    keys: list[int] = field(default_factory=list)  # the prompt as the prefix cache sees it (images by digest)
    image_pos: torch.Tensor | None = None  # prompt positions that take image embeddings [P] (CPU)
    image_vec: torch.Tensor | None = None  # those embeddings [P, hidden] (CPU)
    submitted: float = field(default_factory=time.perf_counter)
    scheduled: float | None = None  # when a step first took it: the end of its queue wait
    finished: bool = False

    @property
    def id(self) -> str:
        return self.req.request_id


@dataclass
class _Launched:
    """A greedy decode step started on the device whose tokens the host has not read yet."""

    seqs: list[_Seq]
    tokens: torch.Tensor  # [n] on the device: the next step's input ids
    host: torch.Tensor  # [n]: the same, copied back without waiting (pinned memory on a GPU)
    ready: "torch.cuda.Event | None"
    free_after: list[_Seq] = field(default_factory=list)  # finished while this step ran: their blocks wait for it


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def encode_with(vision, processing, device: torch.device, images: list[bytes]) -> list[torch.Tensor]:
    """Encoded images -> their embeddings [tokens_per_image, hidden] each (float32, on the CPU), in one batch."""
    try:
        pixels = torch.stack([processing.pixels(data) for data in images])
    except Exception as e:
        raise EngineError(f"an image could not be decoded: {e}") from None
    dtype = next(vision.parameters()).dtype
    with torch.inference_mode():
        out = vision(pixels.to(device, dtype))
    return [e.float().cpu() for e in out]


class TorchEngine:
    moves_own_kv = False  # the worker moves KV blocks out of this engine's pool

    def __init__(self, model_dir: str | Path, options: TorchEngineOptions | None = None,
                 model: LlamaForCausalLM | None = None, tp=None):
        self.options = o = options or TorchEngineOptions()
        self.device = pick_device(o.device)
        if model is None:
            dtype = resolve_dtype(o.dtype, self.device)
            model = (random_model(read_config(Path(model_dir)), self.device, dtype, o.seed) if o.random_weights
                     else load_model(model_dir, self.device, o.dtype))
        self.tp = tp  # engines.torch.parallel.TensorParallel: this rank's shard of a tensor-parallel model
        if tp is not None and tp.size > 1:
            from engines.torch.parallel import shard_

            shard_(model, tp)
        fuse_projections(model)
        self.model = model
        cfg = model.config
        self.dtype = next(model.parameters()).dtype
        block_shape = model.kv_block_shape(o.block_size)
        block_bytes = torch.Size(block_shape).numel() * self.dtype.itemsize
        self.num_blocks = o.num_blocks or self._default_num_blocks(block_bytes)
        self.pool = torch.zeros((self.num_blocks,) + block_shape, dtype=self.dtype, device=self.device)
        self.layout = KvLayout(str(self.dtype).removeprefix("torch."), o.block_size, cfg.num_hidden_layers,
                               cfg.num_key_value_heads, cfg.head_dim, block_bytes)
        self.eos = set(cfg.eos_token_ids)
        self.max_seq_len = cfg.max_position_embeddings
        self.vocab_size = cfg.vocab_size
        self.hidden_size = cfg.hidden_size
        # A LLaVA directory: the vision tower and projector too (tensor-parallel ranks > 0 need no vision).
        self.vision = None if tp is not None and tp.rank > 0 else load_vision(
            model_dir, self.device, o.dtype, random_weights=o.random_weights, seed=o.seed) if model_dir else None
        self.image_processing = (ImageProcessing.from_dir(Path(model_dir), self.vision.config) if self.vision
                                 else None)
        self.paged = o.paged_attention and paged_attention.available(self.device)
        if o.fused_kernels and paged_attention.available(self.device):
            model.use_fused_kernels(skinny=o.skinny_kernel)
        self.graphs = None
        usable = self.num_blocks
        if o.cuda_graphs and self.device.type == "cuda" and (tp is None or tp.size == 1):
            from engines.torch.graphs import DecodeGraphs

            usable = self.num_blocks - 1  # the last block is the graphs' scratch: padding rows write there
            self.graphs = DecodeGraphs(model, self.pool, o.block_size, usable, o.graph_batch_sizes, paged=self.paged)
        self._alloc = (CachingBlockAllocator if o.enable_block_reuse else BlockAllocator)(usable)
        self._lock = threading.Lock()  # guards the allocator and `held`: decode workers allocate from the loop
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._held: dict[str, _Seq] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outputs: StepOutputs | None = None  # a step's outputs, handed to the loop together
        self._launched: _Launched | None = None  # the greedy decode step running ahead of the host, if any
        self.overlap = o.overlap_decode and (tp is None or tp.size == 1)
        pinned = self.device.type == "cuda"
        self._token_hosts = [torch.empty(o.max_batch_size, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self._launches = 0
        self._prompt_tokens = self._reused_tokens = 0
        self._generated_tokens = 0

    def _default_num_blocks(self, block_bytes: int) -> int:
        if self.device.type != "cuda":
            return 1024
        free, _ = torch.cuda.mem_get_info(self.device)
        return max(16, int(free * self.options.free_gpu_memory_fraction) // block_bytes)

    # ---- lifecycle ---------------------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._outputs = StepOutputs(loop)
        self._thread = threading.Thread(target=self._run, name="torch-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
        if self.tp is not None and self.tp.size > 1 and self.tp.rank == 0:
            self.tp.broadcast(None)  # the other ranks leave follow(), so every rank can end cleanly

    def kv_pool(self) -> torch.Tensor:
        """The pool as bytes, one row per block."""
        return self.pool.view(self.num_blocks, -1).view(torch.uint8)

    # ---- requests (called from the asyncio thread) -------------------------------------------------------------
    def _check(self, req: EngineRequest, extra: int = 0) -> None:
        n = len(req.prompt)
        if n == 0:
            raise EngineError("the prompt is empty")
        if n + req.sampling.max_tokens > self.max_seq_len:
            raise EngineError(f"prompt of {n} tokens + max_tokens {req.sampling.max_tokens} exceeds the model's "
                              f"context of {self.max_seq_len} tokens")
        bad = [t for t in req.prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise EngineError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        need = blocks_for(n + extra, self.options.block_size)
        if need > self.num_blocks:
            raise EngineError(f"the request needs {need} KV blocks; the pool holds {self.num_blocks}")

    def _submit(self, req: EngineRequest, mode: str, reserve: int, tokens: list[int] | None = None) -> _Seq:
        seq = _Seq(req, mode, list(tokens or req.prompt), len(req.prompt), reserve, OutputStream(self._loop, self._outputs),
                   keys=content_keys(req.prompt, req.images))
        if req.images:
            seq.image_pos = torch.cat([torch.arange(im.offset, im.offset + im.length) for im in req.images])
            seq.image_vec = torch.cat([im.embeddings.reshape(im.length, -1).cpu() for im in req.images])
        self._inbox.put(("add", seq))
        return seq

    def _check_images(self, req: EngineRequest) -> None:
        for i, im in enumerate(req.images):
            shape = tuple(im.embeddings.shape)
            if len(shape) != 2 or shape[1] != self.hidden_size:
                raise EngineError(f"image {i}: embeddings of shape {list(shape)}; this model takes [n, "
                                  f"{self.hidden_size}]")
            if im.offset < 0 or im.offset + im.length > len(req.prompt):
                raise EngineError(f"image {i}: positions {im.offset}..{im.offset + im.length - 1} are outside "
                                  f"the prompt of {len(req.prompt)} tokens")

    # ---- images ------------------------------------------------------------------------------------------------
    @property
    def tokens_per_image(self) -> int | None:
        return self.vision.config.tokens_per_image if self.vision else None

    def encode_images(self, images: list[bytes], tokens: list[int] | None = None) -> list[torch.Tensor]:
        """Encoded images -> their embeddings [tokens_per_image, hidden] each, on the CPU. Blocking: call it from
        a thread. The images were checked by the frontend (format, size, pixels); `tokens` (the positions the
        frontend gave each image) is for engines without a vision tower of their own (the mocker)."""
        if self.vision is None:
            raise EngineError("this model takes no images (its config.json has no vision_config)")
        return encode_with(self.vision, self.image_processing, self.device, images)

    def _stream(self, seq: _Seq) -> RequestOutputs:
        return RequestOutputs(seq.out, lambda: self.cancel(seq.id))

    def generate(self, req: EngineRequest) -> AsyncIterator[TokenOutput]:
        self._check(req, req.sampling.max_tokens)
        self._check_images(req)
        return self._stream(self._submit(req, "generate", len(req.prompt) + req.sampling.max_tokens))

    async def prefill(self, req: EngineRequest) -> PrefillOutput:
        self._check(req)
        self._check_images(req)
        seq = self._submit(req, "prefill", len(req.prompt))
        out = await seq.out.get()
        if isinstance(out, TokenOutput):  # an error or a cancellation
            raise EngineError(out.error or f"prefill {out.finish_reason}")
        return out

    def allocate(self, request_id: str, num_tokens: int, max_new_tokens: int) -> list[int]:
        with self._lock:
            return self._alloc.allocate(request_id, blocks_for(num_tokens + max_new_tokens, self.options.block_size))

    def decode(self, req: EngineRequest, first_token: int, block_ids: list[int],
               num_tokens: int) -> AsyncIterator[TokenOutput]:
        """Continue a request whose prompt KV (num_tokens) is already in `block_ids`."""
        self._check(req)
        seq = _Seq(req, "decode", list(req.prompt) + [first_token], len(req.prompt), 0,
                   OutputStream(self._loop, self._outputs),
                   num_computed=num_tokens, generated=1, blocks=list(block_ids))
        self._inbox.put(("add", seq))
        return self._stream(seq)

    def release(self, request_id: str) -> bool:
        with self._lock:
            self._held.pop(request_id, None)
            return self._alloc.free_owner(request_id) > 0

    def cancel(self, request_id: str) -> None:
        self._inbox.put(("cancel", request_id))

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(len(self._waiting), len(self._running), len(self._held), self.num_blocks,
                               self._alloc.free, self._prompt_tokens, self._generated_tokens, self._reused_tokens)

    # ---- the engine thread -------------------------------------------------------------------------------------
    def _run(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        with torch.inference_mode():
            while not self._stop.is_set():
                self._drain(block=not (self._waiting or self._running or self._launched))
                if self._waiting or self._running or self._launched:
                    self._step_safely()

    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, arg = item
            if kind == "add":
                (self._running if arg.mode == "decode" else self._waiting).append(arg)
            elif kind == "cancel":
                self._cancel(arg)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _cancel(self, request_id: str) -> None:
        for seqs in (self._waiting, self._running):
            for seq in list(seqs):
                if seq.id == request_id:
                    seqs.remove(seq)
                    self._finish(seq, TokenOutput([], "cancelled"))

    def _finish(self, seq: _Seq, out) -> None:
        seq.finished = True
        if self._launched is not None and any(seq is s for s in self._launched.seqs):
            self._launched.free_after.append(seq)  # the running step still writes its KV
        else:
            with self._lock:
                self._alloc.free_owner(seq.id)
        seq.out.put(out)

    def _step_safely(self) -> None:
        batch = self._schedule()
        try:
            with self._outputs.collecting():
                if self._launched is not None and not self._continues(batch):
                    self._complete(self._take_launched())
                    batch = self._schedule()
                if batch:
                    self._step(batch)
        except Exception as e:  # a failing forward pass ends its requests with the error, not the engine
            log.exception("engine step failed")
            launched = self._take_launched()
            failed = [seq for seq, _ in batch] + (launched.seqs + launched.free_after if launched else [])
            for seq in failed:
                for seqs in (self._waiting, self._running):
                    if seq in seqs:
                        seqs.remove(seq)
                if not seq.finished:
                    self._finish(seq, TokenOutput([], "error", error=f"engine step failed: {e}"))
                else:
                    with self._lock:
                        self._alloc.free_owner(seq.id)

    def _schedule(self) -> list[tuple[_Seq, int]]:
        o = self.options
        budget = o.max_num_tokens
        batch = [(seq, 1) for seq in self._running[: o.max_batch_size]]
        budget -= len(batch)
        for seq in list(self._waiting):
            if len(batch) >= o.max_batch_size or budget <= 0:
                break
            if not seq.blocks and not self._admit(seq):
                break  # admitted in order: wait until running requests free their blocks
            remaining = len(seq.tokens) - seq.num_computed
            n = min(remaining, budget) if o.enable_chunked_prefill else (
                remaining if remaining <= budget or not batch else 0)
            if n == 0:
                break
            if seq.scheduled is None:
                seq.scheduled = time.perf_counter()
            batch.append((seq, n))
            budget -= n
        return batch

    def _admit(self, seq: _Seq) -> bool:
        """Blocks for a new request. With prefix caching, its leading full prompt blocks that are cached are shared
        and not computed again; never the block of the last prompt token, whose logits give the first token."""
        bs = self.options.block_size
        need = blocks_for(seq.reserve_tokens, bs)
        with self._lock:
            if not self.options.enable_block_reuse:
                if not self._alloc.can_allocate(need):
                    return False
                seq.blocks = self._alloc.allocate(seq.id, need)
                return True
            seq.hashes = block_hashes(seq.keys[: (seq.num_prompt - 1) // bs * bs], bs)
            admitted = self._alloc.admit(seq.id, seq.hashes, need)
        if admitted is None:
            return False
        seq.blocks, cached = admitted
        seq.num_computed, seq.registered, seq.cached = cached * bs, cached, cached * bs
        self._prompt_tokens += cached * bs
        self._reused_tokens += cached * bs
        return True

    def _register_full_blocks(self, seq: _Seq) -> None:
        """Make the blocks this step filled known to the prefix cache."""
        bs = self.options.block_size
        full = min(seq.num_computed, len(seq.tokens)) // bs
        if full <= seq.registered:  # most decode steps fill no block: nothing to hash, no lock to take
            return
        while len(seq.hashes) < full:
            i = len(seq.hashes)
            keys = seq.keys[i * bs:(i + 1) * bs] if (i + 1) * bs <= len(seq.keys) else (
                seq.keys[i * bs:] + seq.tokens[len(seq.keys):(i + 1) * bs])
            seq.hashes.append(next_hash(seq.hashes[-1] if seq.hashes else b"", keys))
        with self._lock:
            for i in range(seq.registered, full):
                self._alloc.register(seq.blocks[i], seq.hashes[i])
        seq.registered = full

    # ---- greedy decode steps one ahead of the host -----------------------------------------------------------------
    def _overlaps(self, batch: list[tuple[_Seq, int]]) -> bool:
        """A step that can run ahead: every sequence is past its prompt, decodes one token, greedily."""
        return self.overlap and bool(batch) and all(
            n == 1 and seq.generated > 0 and seq.req.sampling.temperature <= 0 for seq, n in batch)

    def _continues(self, batch: list[tuple[_Seq, int]]) -> bool:
        """The launched step's sequences (or some of them, in order) decode again: their input tokens are the ones
        it leaves on the device, and it need not be waited for."""
        if not self._overlaps(batch):
            return False
        launched = iter(self._launched.seqs)
        return all(any(seq is s for s in launched) for seq, _ in batch)

    def _take_launched(self) -> _Launched | None:
        launched, self._launched = self._launched, None
        return launched

    def _launch(self, batch: list[tuple[_Seq, int]], previous: _Launched | None) -> _Launched:
        """Start a greedy decode step without waiting for it. Its input tokens come from the host or, for a
        continuation, from `previous`'s tokens on the device."""
        seqs = [seq for seq, _ in batch]
        bs = self.options.block_size
        positions = [seq.num_computed for seq in seqs]
        tables = [seq.blocks[:blocks_for(p + 1, bs)] for seq, p in zip(seqs, positions)]
        if previous is not None:
            rows = {id(s): i for i, s in enumerate(previous.seqs)}
            source = [rows[id(seq)] for seq in seqs]
            ids = None
        else:
            source, ids = None, [seq.tokens[seq.num_computed] for seq in seqs]
        tokens = None
        if self.graphs is not None and self.graphs.fits(len(seqs), max(len(t) for t in tables)):
            try:
                _, tokens = self._graph_step(ids, positions, tables,
                                             None if previous is None else (previous.tokens, source))
            except Exception:
                pass  # logged; eager from now on
        if tokens is None:
            dev = self.device
            ids_dev = (torch.tensor(ids, dtype=torch.long, device=dev) if previous is None else
                       previous.tokens[torch.tensor(source, dtype=torch.long, device=dev)])
            step = ([0] * len(seqs), positions, [(i, 1, p, seq.blocks) for i, (seq, p) in
                                                 enumerate(zip(seqs, positions))], list(range(len(seqs))), None)
            tokens = argmax_rows(self._forward(step, ids_dev))
        for seq in seqs:
            seq.num_computed += 1
        host = self._token_hosts[self._launches % 2][: len(seqs)]  # the other one may still be read
        self._launches += 1
        ready = None
        if tokens.is_cuda:
            host.copy_(tokens, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            host.copy_(tokens)
        return _Launched(seqs, tokens, host, ready)

    def _complete(self, launched: _Launched | None) -> None:
        """Read a launched step's tokens (waiting for it) and hand them out; sequences that finished meanwhile
        (stop token, cancelled) drop theirs. Then the blocks of those that finished while it ran are freed."""
        if launched is None:
            return
        try:
            if launched.ready is not None:
                launched.ready.synchronize()
            for seq, token in zip(launched.seqs, launched.host.tolist()):
                if seq.finished:
                    continue
                if seq.mode != "decode" and self.options.enable_block_reuse:
                    self._register_full_blocks(seq)
                self._emit(seq, token)
        finally:  # their requests are over whatever happened here: the blocks must not leak
            with self._lock:
                for seq in launched.free_after:
                    self._alloc.free_owner(seq.id)

    def _graph_step(self, ids, positions, tables, previous=None):
        try:
            return self.graphs.run(ids, positions, tables, previous)
        except Exception:  # a capture that failed (e.g. beside GPU work of another thread): eager from now on
            log.exception("CUDA graph capture or replay failed; decode steps run eagerly from now on")
            self.graphs = None
            raise

    def _step(self, batch: list[tuple[_Seq, int]]) -> None:
        if self._overlaps(batch):
            # Continued here (_step_safely completed any other). It stays `_launched` until the new step is
            # started, so a failure to start one still ends its requests and frees their blocks.
            previous = self._launched
            if previous is not None:  # not those whose last token the running step makes
                batch = [(seq, n) for seq, n in batch if seq.generated + 1 < seq.req.sampling.max_tokens]
            self._launched = self._launch(batch, previous) if batch else None
            self._complete(previous)  # while the new step runs
            return
        ids, positions, seqs, logit_rows, to_sample = [], [], [], [], []
        image_rows, image_vecs = [], []
        start = 0
        for seq, n in batch:
            if seq.image_pos is not None and seq.num_computed < seq.num_prompt:
                inside = (seq.image_pos >= seq.num_computed) & (seq.image_pos < seq.num_computed + n)
                if bool(inside.any()):
                    image_rows.append(seq.image_pos[inside] - seq.num_computed + start)
                    image_vecs.append(seq.image_vec[inside])
            ids.extend(seq.tokens[seq.num_computed: seq.num_computed + n])
            positions.extend(range(seq.num_computed, seq.num_computed + n))
            seqs.append((start, n, seq.num_computed, seq.blocks))
            if seq.num_computed + n == len(seq.tokens):
                logit_rows.append(start + n - 1)
                to_sample.append(seq)
            start += n
        images = (torch.cat(image_rows), torch.cat(image_vecs)) if image_rows else None
        step = (ids, positions, seqs, logit_rows, images)
        bs = self.options.block_size
        if (self.graphs is not None and images is None and all(n == 1 and ctx > 0 for _, n, ctx, _ in seqs)
                and self.graphs.fits(len(seqs), max(blocks_for(ctx + 1, bs) for _, _, ctx, _ in seqs))):
            # every sequence decodes one token: replay a captured graph
            try:
                logits, _ = self._graph_step(ids, positions,
                                             [blocks[:blocks_for(ctx + 1, bs)] for _, _, ctx, blocks in seqs])
            except Exception:
                logits = self._forward(step)
        else:
            if self.tp is not None:
                self.tp.broadcast(step)  # the other ranks run the same pass on their shards
            logits = self._forward(step)
        for seq, n in batch:
            seq.num_computed += n
            if seq.mode != "decode" and seq.num_computed <= seq.num_prompt:
                self._prompt_tokens += n
            if seq.mode != "decode" and self.options.enable_block_reuse:
                self._register_full_blocks(seq)
        if to_sample and all(seq.req.sampling.temperature <= 0 for seq in to_sample):
            # Greedy only: the argmax on the device, one small copy back (not the batch's full logits)
            for token, seq in zip(argmax_rows(logits).tolist(), to_sample):
                self._emit(seq, token)
            return
        logits = logits.cpu()
        for row, seq in zip(logits, to_sample):
            self._emit(seq, sample(row, seq.req.sampling, seq.generated))

    def _forward(self, step, ids_dev: torch.Tensor | None = None) -> torch.Tensor:
        """One packed pass: step = (token ids, positions, [(start, length, context_start, block ids)], logit rows,
        (packed rows, image embeddings) or None). `ids_dev`: the ids already on the device, in place of step's."""
        ids, positions, seqs, logit_rows, images = step
        dev, bs = self.device, self.options.block_size
        batches = [SeqBatch(start, n, ctx, torch.tensor(blocks, dtype=torch.long, device=dev))
                   for start, n, ctx, blocks in seqs if not (n == 1 and ctx > 0)]
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        # The block each new token's KV goes to, worked out here: one transfer instead of device ops per sequence.
        slots = [blocks[p // bs] for _, n, ctx, blocks in seqs for p in range(ctx, ctx + n)]
        block_index = torch.tensor(slots, dtype=torch.long, device=dev)
        if ids_dev is None:
            ids_dev = torch.tensor(ids, dtype=torch.long, device=dev)
        return self.model(ids_dev, pos, batches, self.pool, block_index,
                          pos % bs, torch.tensor(logit_rows, dtype=torch.long, device=dev),
                          self._decode_batch([(start, ctx, blocks) for start, n, ctx, blocks in seqs
                                              if n == 1 and ctx > 0]),
                          None if images is None else (images[0].to(dev), images[1].to(dev)))

    def _decode_batch(self, decoding: list[tuple[int, int, list[int]]]) -> DecodeBatch | None:
        """(packed row, context before the new token, block ids) of each decoding sequence, as one padded table:
        built on the host and moved in one transfer each."""
        if not decoding:
            return None
        dev, bs = self.device, self.options.block_size
        tables = [blocks[:blocks_for(ctx + 1, bs)] for _, ctx, blocks in decoding]
        width = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=dev)
        lengths = torch.tensor([ctx + 1 for _, ctx, _ in decoding], dtype=torch.long, device=dev)
        mask = (torch.arange(width * bs, device=dev)[None, :] < lengths[:, None])[:, None, None, :]
        rows = torch.tensor([row for row, _, _ in decoding], dtype=torch.long, device=dev)
        return DecodeBatch(rows, table, mask, lengths, self.paged)

    def follow(self) -> None:
        """Ranks > 0: run every pass rank 0 broadcasts, until it broadcasts None or the process is stopped."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        with torch.inference_mode():
            while (step := self.tp.broadcast(None)) is not None:
                self._forward(step)

    def _finish_reason(self, seq: _Seq, token: int) -> str | None:
        p = seq.req.sampling
        if token in p.stop_token_ids or (token in self.eos and not p.ignore_eos):
            return "stop"
        if seq.generated >= p.max_tokens or len(seq.tokens) >= self.max_seq_len:
            return "length"
        return None

    def _emit(self, seq: _Seq, token: int) -> None:
        seq.tokens.append(token)
        seq.generated += 1
        self._generated_tokens += 1
        reason = self._finish_reason(seq, token)
        timing = {}
        if seq.generated == 1 and seq.scheduled is not None:  # the prompt is done: how long it waited and took
            timing = {"queue": seq.scheduled - seq.submitted, "compute": time.perf_counter() - seq.scheduled}
        if seq.mode == "prefill":
            self._waiting.remove(seq)
            if reason:
                self._finish(seq, PrefillOutput(token, reason, [], seq.num_prompt, cached_tokens=seq.cached,
                                                timing=timing))
            else:
                with self._lock:
                    self._held[seq.id] = seq
                seq.out.put(PrefillOutput(token, None, list(seq.blocks), seq.num_prompt, cached_tokens=seq.cached,
                                          timing=timing))
            return
        if seq in self._waiting:  # its prompt is done: from now on it decodes
            self._waiting.remove(seq)
            if not reason:
                self._running.append(seq)
        elif reason:
            self._running.remove(seq)
        cached = seq.cached if seq.mode == "generate" and seq.generated == 1 else 0  # on the first output only
        if reason:
            self._finish(seq, TokenOutput([token], reason, cached_tokens=cached, timing=timing))
        else:
            seq.out.put(TokenOutput([token], cached_tokens=cached, timing=timing))
