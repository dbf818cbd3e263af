"""A worker: one engine, registered in etcd, serving a NATS subject, moving KV with NIXL.

Roles: aggregated (prompt to last token), prefill (first token + a KV handle; blocks held until the decode worker
says it has read them, or a timeout), decode (pulls the KV named in the request, then streams tokens)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
import time
from contextlib import aclosing
from dataclasses import dataclass, field

import msgspec

from engines.base import EngineError, EngineRequest, KvCacheFull, KvLayout as EngineLayout, SamplingParams
from hpc.config import EngineConfig
from hpc.runtime import discovery, gc_pauses
from hpc.runtime.cpu_wait import CpuWait
from hpc.runtime.messaging import Bus
from hpc.runtime.metrics import WorkerMetrics
from hpc.runtime.protocol import (PROTOCOL_VERSION, EncodeRequest, EncodeResult, ErrorReply, GenerateRequest, Keys,
                                  KvLayout, MultimodalPart, PrefillResult, StatsRequest, Subjects, TokenDelta,
                                  WorkerInfo, WorkerStats, decode_request, decode_worker_info, encode,
                                  encode_json)
from hpc.runtime.transfer import KvTransfer, TransferError, ensure_cuda_context
from workers.engines import build_engine
from workers.media import (EmbeddingStage, EncodeCache, MediaFailure, RemoteEncoders, embeddings_of, image_inputs,
                           raw_image_inputs)

log = logging.getLogger("workers")
CANCEL_MEMORY_S = 30.0


@dataclass
class WorkerOptions:
    role: str
    engine: str
    deployment: str
    model_path: str
    served_name: str
    etcd: str
    nats: str
    engine_config: EngineConfig = field(default_factory=EngineConfig)
    worker_id: str = ""
    host: str = ""
    lease_ttl: int = 5
    metrics_port: int = 0  # 0: a free port; -1: none
    transfer_timeout: float = 30.0
    release_after: float = 60.0
    drain_timeout: float = 30.0
    intra_node: str = "auto"
    random_weights: bool = False
    mpi_size: int = 1
    remote_encode: bool = False  # E/P/D: images go to the deployment's encode workers
    embedding_buffer_mb: int = 64  # the NIXL-registered buffer for embeddings in flight (encode out, prefill in)
    encode_cache_mb: int = 512  # an encode worker's embeddings by content digest
    credentials: object = None  # hpc.runtime.credentials.Credentials of the deployment's etcd and NATS

    def __post_init__(self):
        self.host = self.host or os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        self.worker_id = self.worker_id or f"{self.role}-{self.host}-{os.getpid()}"


def wire_layout(layout: EngineLayout) -> KvLayout:
    return KvLayout(**dataclasses.asdict(layout))


def engine_layout(layout: KvLayout) -> EngineLayout:
    return EngineLayout(**msgspec.structs.asdict(layout))


class Worker:
    def __init__(self, o: WorkerOptions, tp=None):
        self.o = o
        self.tp = tp  # rank 0 of a tensor-parallel reference engine
        self.subjects = Subjects(o.deployment)
        self.keys = Keys(o.deployment)
        self.metrics = WorkerMetrics(o.role, o.worker_id)
        self.stopping = asyncio.Event()
        self.held: dict[str, float] = {}  # prefill: request id -> when its blocks are freed regardless
        self.tasks: dict[str, asyncio.Task] = {}
        # Cancels for requests not (yet) here, by arrival time: a request on a direct connection can arrive after
        # its cancel, which comes through NATS; it is then dropped on arrival. Forgotten after CANCEL_MEMORY_S.
        self.cancelled_early: dict[str, float] = {}
        self.transfer: KvTransfer | None = None
        self.held_changed = asyncio.Event()
        self.encoders: RemoteEncoders | None = None  # E/P/D prefill: the deployment's encode workers
        self.stage: EmbeddingStage | None = None  # an encode worker's embeddings for prefill workers to read
        self.cache: EncodeCache | None = None
        self.kv_queue = asyncio.Lock()  # decode: requests waiting for room in a full KV cache, first come first
        self.kv_waiting = 0
        self.cpu = CpuWait()  # the event loop's thread: this one

    def engine_device(self):
        import torch

        return getattr(self.engine, "device", None) or torch.device("cpu")

    async def run(self) -> None:
        o = self.o
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        if o.engine == "torch" and o.engine_config.device != "cpu":
            import torch

            if torch.cuda.is_available():
                ensure_cuda_context(torch.cuda.current_device())  # before the NIXL agent: see transfer.py
        self.engine = build_engine(o.engine, o.model_path, o.engine_config, o.random_weights, tp=self.tp,
                                   role=o.role)
        self.engine.start(loop)
        if o.role in ("prefill", "decode") and not self.engine.moves_own_kv:
            self.transfer = KvTransfer(f"{o.deployment}.{o.worker_id}", self.engine.kv_pool(),
                                       wire_layout(self.engine.layout), o.host, o.intra_node)
        if o.role == "encode":  # what it encodes waits here until a prefill worker has read it
            self.stage = EmbeddingStage(f"{o.deployment}.{o.worker_id}", o.host, o.embedding_buffer_mb,
                                        self.engine_device())
            self.transfer = self.stage.transfer
            self.cache = EncodeCache(o.encode_cache_mb << 20)
        self.bus = await Bus.connect(o.nats, o.worker_id, credentials=o.credentials)
        self.etcd = await discovery.connect(o.etcd, credentials=o.credentials, deployment=o.deployment)
        if o.remote_encode:
            self.encoders = RemoteEncoders(self)
            await self.encoders.start()
        subject = self.subjects.worker(o.role, o.worker_id)
        await self.bus.serve(subject, self.handle, listen=True)
        self.cancel_sub = await self.bus.subscribe(self.subjects.cancel_all(), self.on_cancel)
        metrics_url = None
        if o.metrics_port >= 0:
            port = self.metrics.serve(port=o.metrics_port)
            metrics_url = f"http://{o.host}:{port}/metrics"
        info = WorkerInfo(worker_id=o.worker_id, role=o.role, model=o.served_name, deployment=o.deployment,
                          subject=subject, host=o.host, engine=o.engine,
                          model_path=os.path.abspath(o.model_path), mpi_size=o.mpi_size,
                          gpus=[g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g],
                          nixl_agent=self.transfer.name if self.transfer else None,
                          layout=wire_layout(self.engine.layout) if self.engine.layout else None,
                          max_batch_size=o.engine_config.max_batch_size,
                          metrics_url=metrics_url, direct=self.bus.listener.address if self.bus.listener else None)
        self.registration = discovery.Registration(self.etcd, {
            self.keys.worker(o.role, o.worker_id): encode_json(info),
            self.keys.model(o.served_name, o.worker_id): encode_json(info)}, o.lease_ttl)
        await self.registration.start()
        housekeeping = asyncio.create_task(self.housekeeping())
        gc_pauses.settle()  # the engine is built: what start-up made is never walked by the collector again
        log.info("ready: %s %s serving %s on %s", o.role, o.worker_id, o.served_name, subject)
        print(f"HPC_WORKER_READY {o.worker_id}", flush=True)
        await self.stopping.wait()
        await self.drain()
        housekeeping.cancel()

    async def drain(self) -> None:
        """Say so in etcd (routers send nothing more here), finish in-flight work within the deadline, then leave.
        The subject stays served while draining: clients that probe it must not take it for dead."""
        log.info("draining %s", self.o.worker_id)
        try:
            for key, value in list(self.registration.items.items()):
                info = decode_worker_info(value)
                await self.registration.update(key, encode_json(msgspec.structs.replace(info, draining=True)))
        except Exception as e:  # etcd unreachable: leaving is all that is left
            log.warning("could not mark %s draining: %s", self.o.worker_id, e)
        left = await self.bus.drain_handlers(self.o.drain_timeout)
        await self.registration.revoke()
        await self.bus.stop_serving()
        if left:
            log.warning("%d requests still running after %g s; cancelled", left, self.o.drain_timeout)
        self.engine.shutdown()
        if self.transfer:
            self.transfer.close()
        if self.encoders:
            await self.encoders.close()
        await self.bus.close()
        try:
            await asyncio.wait_for(self.etcd.close(), 5)
        except asyncio.TimeoutError:
            pass

    async def housekeeping(self) -> None:
        """Frees prefilled blocks once read (NIXL notification) or once too old; publishes load for routers."""
        next_load = 0.0
        while True:
            # While blocks are held, poll fast: polling also progresses NIXL for readers whose transport needs
            # the owner's help (DRAM over TCP or shared memory); idle, poll slowly. A new handle wakes us at once.
            try:
                await asyncio.wait_for(self.held_changed.wait(), 0.0005 if self.held else 0.05)
            except asyncio.TimeoutError:
                pass
            self.held_changed.clear()
            if self.transfer:
                for rid in self.transfer.released():
                    self.free_held(rid)
            now = time.monotonic()
            while self.cancelled_early and now - next(iter(self.cancelled_early.values())) > CANCEL_MEMORY_S:
                del self.cancelled_early[next(iter(self.cancelled_early))]  # oldest first: insertion order
            for rid, deadline in list(self.held.items()):
                if now > deadline:
                    log.warning("request %s: KV blocks never read; freeing them after %g s", rid,
                                self.o.release_after)
                    self.free_held(rid)
            if now >= next_load:
                next_load = now + 0.25
                self.cpu.sample()
                stats = self.stats()
                self.metrics.queue_depth.set(stats.waiting)
                self.metrics.running.set(stats.running)
                self.metrics.kv_blocks_free.set(stats.kv_blocks_free)
                self.metrics.count_tokens(stats.prompt_tokens, stats.reused_prompt_tokens, stats.generated_tokens)
                await self.bus.publish(self.subjects.load(self.o.worker_id), encode(stats))

    async def on_cancel(self, msg) -> None:
        rid = msg.subject.rsplit(".", 1)[-1]
        task = self.tasks.get(rid)
        if task:
            task.cancel()
        else:
            self.cancelled_early[rid] = time.monotonic()
        self.free_held(rid)
        self.engine.cancel(rid)

    def free_held(self, rid: str) -> None:
        """A prefilled request's blocks (an encode worker's embeddings): read by the peer, never read in time, or
        cancelled."""
        if self.held.pop(rid, None) is not None:
            if self.stage is not None:
                self.stage.free(rid)
            else:
                self.engine.release(rid)

    async def handle(self, data: bytes, reply) -> None:
        try:
            req = decode_request(data)
        except Exception as e:
            log.warning("undecodable request: %s", e)
            return
        if isinstance(req, StatsRequest):
            await reply(encode(self.stats()))
            return
        rid = req.request_id
        if self.cancelled_early.pop(rid, None) is not None:
            self.metrics.child(self.metrics.requests, "cancelled").inc()
            return
        self.tasks[rid] = asyncio.current_task()
        status = "ok"
        try:
            if req.version > PROTOCOL_VERSION:
                raise _Reply("bad_request", f"protocol version {req.version}; this worker speaks {PROTOCOL_VERSION}")
            if req.model != self.o.served_name:
                raise _Reply("bad_request", f"model {req.model!r} is not served here ({self.o.served_name!r})")
            if isinstance(req, EncodeRequest) != (self.o.role == "encode"):
                raise _Reply("bad_request", f"a {type(req).__name__} sent to a {self.o.role} worker")
            handler = {"aggregated": self.serve_aggregated, "prefill": self.serve_prefill,
                       "decode": self.serve_decode, "encode": self.serve_encode}[self.o.role]
            await handler(req, reply)
        except MediaFailure as e:
            status = e.code
            await reply(encode(ErrorReply(rid, e.code, e.message)))
        except _Reply as e:
            status = e.code
            await reply(encode(ErrorReply(rid, e.code, e.message)))
        except EngineError as e:
            status = "bad_request"
            await reply(encode(ErrorReply(rid, "bad_request", str(e))))
        except asyncio.CancelledError:
            status = "cancelled"
        except Exception as e:
            status = "internal"
            log.exception("request %s failed", rid)
            await reply(encode(ErrorReply(rid, "internal", f"{type(e).__name__}: {e}")))
        finally:
            self.tasks.pop(rid, None)
            self.metrics.child(self.metrics.requests, status).inc()

    @staticmethod
    def engine_request(req: GenerateRequest) -> EngineRequest:
        s = req.sampling
        return EngineRequest(req.request_id, list(req.token_ids), SamplingParams(
            s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed, tuple(s.stop_token_ids), s.ignore_eos))

    async def _stream(self, rid: str, outputs, reply, timing: dict | None = None) -> None:
        """The engine's outputs as token deltas; the first carries `timing` (and the engine's own). Where the engine
        can hand them over inside its step (`follow`), they are sent from there: no task wakes per token."""
        first = True
        t0 = time.perf_counter()

        def delta(out) -> bytes:
            nonlocal first
            if out.error:
                raise _Reply("internal", out.error)
            stages = {}
            if first:
                stages = {**(timing or {}), **out.timing}
                if self.o.role == "decode":
                    stages["decode_first"] = time.perf_counter() - t0
                self.metrics.observe_stages(stages)
                first = False
            return encode(TokenDelta(rid, out.token_ids, out.finish_reason, out.cached_tokens, stages))

        async with aclosing(outputs):  # an error or a cancel ends the request in the engine now, not at GC
            follow = getattr(outputs, "follow", None)  # TensorRT-LLM's outputs are iterated
            if follow is not None:
                await follow(lambda out: reply.nowait(delta(out)))
            else:
                async for out in outputs:
                    await reply(delta(out))

    async def with_images(self, req: GenerateRequest, timing: dict | None = None):
        """The engine request, with the images: encoded here, by an encode worker (E/P/D), or left to an engine
        that takes raw images (TensorRT-LLM). The time it took goes to `timing["encode"]`."""
        ereq = self.engine_request(req)
        if not req.multimodal:
            return ereq
        t0 = time.perf_counter()
        if self.encoders:
            ereq.images = image_inputs(req.multimodal, await self.encoders.resolve(req))
        elif getattr(self.engine, "takes_raw_images", False):
            ereq.images = await raw_image_inputs(self.engine, req.multimodal)
        else:
            ereq.images = image_inputs(req.multimodal, await embeddings_of(self.engine, req.multimodal))
        if timing is not None:
            timing["encode"] = time.perf_counter() - t0
        self.metrics.encode_seconds.observe(time.perf_counter() - t0)
        for part in req.multimodal:
            self.metrics.images.labels(part.kind).inc()
        return ereq

    async def serve_aggregated(self, req: GenerateRequest, reply) -> None:
        timing: dict = {}
        await self._stream(req.request_id, self.engine.generate(await self.with_images(req, timing)), reply, timing)

    async def serve_encode(self, req: EncodeRequest, reply) -> None:
        """Embeddings for a prefill worker: from the cache, or encoded (images) or loaded (files) now; each put in
        the stage for the prefill worker to read, freed when it says so or after release_after."""
        self.metrics.encode_queue.inc()
        t0 = time.perf_counter()
        try:
            todo = [p for p in req.parts if self.cache.get(p.digest) is None]
            for part, tensor in zip(todo, await embeddings_of(self.engine, todo)):
                self.cache.put(part.digest, tensor)
            out = []
            for i, part in enumerate(req.parts):
                tensor = self.cache.get(part.digest)
                if tensor is None:  # bigger than the cache: encode it again (rare; the cache holds hundreds)
                    tensor = (await embeddings_of(self.engine, [part]))[0]
                owner = f"{req.request_id}.{i}"
                handle = self.stage.put(owner, tensor)
                self.held[owner] = time.monotonic() + self.o.release_after
                self.metrics.images.labels(part.kind).inc()
                out.append(MultimodalPart("embedding", part.offset, part.num_tokens, part.digest, embedding=handle))
            self.held_changed.set()
        finally:
            self.metrics.encode_queue.dec()
            self.metrics.encode_seconds.observe(time.perf_counter() - t0)
        await reply(encode(EncodeResult(req.request_id, out)))

    async def serve_prefill(self, req: GenerateRequest, reply) -> None:
        t0 = time.perf_counter()
        timing: dict = {}
        out = await self.engine.prefill(await self.with_images(req, timing))
        self.metrics.prefill_seconds.observe(time.perf_counter() - t0)
        timing.update(out.timing)
        self.metrics.observe_stages(timing)
        kv = None
        if out.finish_reason is None and not self.engine.moves_own_kv:
            kv = self.transfer.handle(out.block_ids, out.num_tokens)
            self.held[req.request_id] = time.monotonic() + self.o.release_after
            self.held_changed.set()
        await reply(encode(PrefillResult(req.request_id, out.first_token, out.num_tokens, out.finish_reason, kv,
                                         disagg_params=out.handoff, cached_tokens=out.cached_tokens,
                                         timing=timing)))

    async def serve_decode(self, req: GenerateRequest, reply) -> None:
        if self.engine.moves_own_kv:  # the engine pulls the KV itself (TensorRT-LLM's cache transceiver)
            if req.disagg_params is None or req.first_token is None:
                raise _Reply("bad_request", "a decode request needs the prefill result (disagg_params and "
                                            "first_token)")
            await self._stream(req.request_id, self.engine.decode_handoff(self.engine_request(req),
                                                                          req.disagg_params), reply)
            return
        kv, rid = req.kv, req.request_id
        if kv is None or req.first_token is None:
            raise _Reply("bad_request", "a decode request needs the prefill result (kv and first_token)")
        mismatch = self.engine.layout.mismatch(engine_layout(kv.layout))
        if mismatch:
            raise _Reply("layout_mismatch", f"the prefill worker's KV layout does not fit this decode worker: "
                                            f"{mismatch}")
        blocks, waited = await self.reserve_kv(rid, kv.num_tokens, req.sampling.max_tokens)
        try:
            result = await self.transfer.read(kv, blocks[: len(kv.block_ids)], rid, self.o.transfer_timeout)
        except (TransferError, asyncio.CancelledError) as e:
            self.engine.release(rid)
            if isinstance(e, asyncio.CancelledError):
                raise
            raise _Reply("internal", f"KV transfer failed: {e}") from None
        except BaseException:
            self.engine.release(rid)
            raise
        self.metrics.kv_bytes.inc(result.bytes)
        self.metrics.kv_seconds.labels(result.path).observe(result.seconds)
        self.metrics.kv_gbps.labels(result.path).set(result.gbps)
        await self._stream(rid, self.engine.decode(self.engine_request(req), req.first_token, blocks,
                                                   kv.num_tokens), reply,
                           {"kv_wait": waited, "kv_transfer": result.seconds, "kv_bytes": float(result.bytes)})

    async def reserve_kv(self, rid: str, num_tokens: int, max_tokens: int) -> tuple[list[int], float]:
        """Blocks for a request's KV and the seconds it waited for them. A full cache makes the request wait, in
        arrival order, for running ones to finish, as an engine's scheduler holds a request it cannot admit yet;
        the prefill worker keeps the KV meanwhile. It fails only if the request could never fit, or after
        transfer_timeout."""
        t0 = time.monotonic()
        self.kv_waiting += 1
        try:
            async with self.kv_queue:
                while True:
                    try:
                        return self.engine.allocate(rid, num_tokens, max_tokens), time.monotonic() - t0
                    except KvCacheFull as e:
                        if e.needed > e.total:
                            raise _Reply("bad_request", f"{num_tokens} prompt + {max_tokens} new tokens need "
                                                        f"{e.needed} KV blocks; this decode worker has {e.total}")
                        if time.monotonic() - t0 > self.o.transfer_timeout:
                            raise _Reply("unavailable", f"the decode worker's KV cache stayed full for "
                                                        f"{self.o.transfer_timeout:g} s ({e})")
                    await asyncio.sleep(0.002)  # running requests free blocks as they finish
        finally:
            self.kv_waiting -= 1

    def stats(self) -> WorkerStats:
        s = self.engine.stats()
        t = self.transfer
        cpu = self.cpu.share() or {}  # CPU wait, for hpc status and hpc diagnose
        return WorkerStats(self.o.worker_id, self.o.role, s.waiting + self.kv_waiting, s.running, s.held,
                           s.kv_blocks_total, s.kv_blocks_free, len(self.tasks), t.transfers if t else 0,
                           t.bytes_moved if t else 0, t.seconds if t else 0.0, s.prompt_tokens,
                           s.reused_prompt_tokens, s.generated_tokens, cpu.get("waiting"))


class _Reply(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message
