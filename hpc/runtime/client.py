"""Sends a request through a deployment: to an aggregated worker, or to a prefill worker and then a decode worker
with the KV handle. Used by the frontend, `hpc bench` and the tests.

Every wait has a deadline, and a request waiting on a worker that dies fails within a second (PeerGone) instead of
waiting out its timeout or the worker's etcd lease: every LIVENESS_INTERVAL the client asks NATS whether anything
still serves each worker it waits on. A request whose worker dies before the first token is sent again, once, to
another worker of the role. A consumer that stops early cancels the request on the workers. Every async generator
here is closed with `aclosing`, so its cleanup runs at once, not later from the garbage collector."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from contextlib import aclosing
from typing import AsyncIterator, Callable

from hpc.runtime import discovery
from hpc.runtime.discovery import WorkerDirectory
from hpc.runtime.ids import unique_id
from hpc.runtime.messaging import Bus, PeerGone
from hpc.runtime.protocol import (ErrorReply, GenerateRequest, Keys, PrefillResult, Sampling, StatsRequest, Subjects,
                                  TokenDelta, WorkerInfo, WorkerStats, decode_reply, encode)


class ServingError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class NoWorkers(ServingError):
    def __init__(self, message: str):
        super().__init__("unavailable", message)


log = logging.getLogger("hpc.client")
Chooser = Callable[[str, list[WorkerInfo], GenerateRequest], WorkerInfo]
LIVENESS_INTERVAL = 0.25  # seconds between probes of the workers a request waits on
_PROBE = encode(StatsRequest())


class RoundRobin:
    def __init__(self):
        self._counters: dict[str, itertools.count] = {}

    def __call__(self, role: str, workers: list[WorkerInfo], req: GenerateRequest) -> WorkerInfo:
        n = next(self._counters.setdefault(role, itertools.count()))
        return workers[n % len(workers)]


def _delta(worker: WorkerInfo, req: GenerateRequest, batch: list) -> TokenDelta:
    """The token deltas that arrived together, as one: one text delta, one HTTP write for the frontend."""
    for reply in batch:
        if type(reply) is not TokenDelta:
            raise ServingError("internal", f"worker {worker.worker_id} sent {type(reply).__name__}")
    if len(batch) == 1:
        return batch[0]
    token_ids, cached = [], 0
    for reply in batch:
        token_ids += reply.token_ids
        cached += reply.cached_tokens
    return TokenDelta(req.request_id, token_ids, batch[-1].finish_reason, cached, batch[0].timing)


class ServingClient:
    def __init__(self, deployment: str, etcd_url: str, nats_url: str, choose: Chooser | None = None,
                 first_token_timeout: float = 600.0, idle_timeout: float = 60.0, credentials=None,
                 direct: bool = True):
        self.deployment = deployment
        self.direct = direct  # requests on direct connections to workers where they offer one (hpc/runtime/direct.py)
        self.credentials = credentials
        self.etcd_url, self.nats_url = etcd_url, nats_url
        self.subjects = Subjects(deployment)
        self.choose = choose or RoundRobin()
        self.first_token_timeout = first_token_timeout
        self.idle_timeout = idle_timeout
        self.in_flight: dict[str, int] = {}  # worker id -> requests this client has on it now

    async def start(self) -> "ServingClient":
        self.bus = await Bus.connect(self.nats_url, f"client-{uuid.uuid4().hex[:6]}", credentials=self.credentials)
        self.etcd = await discovery.connect(self.etcd_url, credentials=self.credentials, deployment=self.deployment)
        self.directory = WorkerDirectory(self.etcd, Keys(self.deployment).workers)
        await self.directory.start()
        self._liveness = asyncio.create_task(self._watch_liveness())
        return self

    async def _watch_liveness(self) -> None:
        """Probe the workers requests wait on (a dead one fails them now) and those found dead (one that answers
        again, after a NATS reconnect, is routed to again)."""
        while True:
            await asyncio.sleep(LIVENESS_INTERVAL)
            busy = [w for w in self.directory.workers.values() if self.in_flight.get(w.worker_id)]
            lost = self.directory.lost_workers()
            answers = await asyncio.gather(*(self.bus.probe(w.subject, _PROBE, LIVENESS_INTERVAL) for w in busy + lost))
            for w, alive in zip(busy + lost, answers):
                if alive is False:
                    self.directory.lost(w.worker_id)
                elif alive and w in lost:
                    self.directory.found(w.worker_id)

    async def close(self) -> None:
        self._liveness.cancel()
        await self.directory.stop()
        await self.bus.close()
        try:
            await asyncio.wait_for(self.etcd.close(), 5)
        except asyncio.TimeoutError:
            pass

    async def __aenter__(self):
        return await self.start()

    async def __aexit__(self, *exc):
        await self.close()

    def models(self) -> set[str]:
        return self.directory.models()

    def _pick(self, role: str, req: GenerateRequest, avoid: str | None = None) -> WorkerInfo | None:
        workers = [w for w in self.directory.by_role(role, req.model) if w.worker_id != avoid]
        return self.choose(role, workers, req) if workers else None

    def generate(self, model: str, token_ids: list[int], sampling: Sampling = Sampling(),
                 request_id: str | None = None, multimodal: list = (),
                 trace: dict | None = None) -> AsyncIterator[TokenDelta]:
        """The request's token deltas, an async generator: closed before the delta that ends the request, it cancels
        the work on the workers. `trace`, when given, is filled with where the request went and where its time
        went: the workers (id, host), the round trips seen from here, and each worker's own timing."""
        req = GenerateRequest(request_id or unique_id(), model, list(token_ids), sampling,
                              multimodal=list(multimodal))
        trace = trace if trace is not None else {}
        if self.directory.by_role("aggregated", req.model):
            return self._aggregated(req, trace)
        return self._disaggregated(req, trace)

    async def _cancel(self, req: GenerateRequest) -> None:
        """The consumer left early, or an error: stop the work on the workers."""
        await self.bus.publish(self.subjects.cancel(req.request_id), b"")

    async def _aggregated(self, req: GenerateRequest, trace: dict) -> AsyncIterator[TokenDelta]:
        # `finished` is set before each yield: a consumer that stops at the last delta closes us at that yield, and
        # the request is complete then, with nothing on the workers to cancel.
        finished = sent = retried = False
        try:
            worker = self._pick("aggregated", req)
            if worker is None:
                raise NoWorkers(f"no worker serves model {req.model!r}")
            while True:
                t0 = time.perf_counter()
                try:
                    async with aclosing(self._replies(worker, req)) as replies:
                        async for batch in replies:
                            delta = _delta(worker, req, batch)
                            if not sent:
                                trace.update(prefill_worker=worker.worker_id, prefill_host=worker.host,
                                             prefill_gpus=list(worker.gpus), prefill_rtt=time.perf_counter() - t0,
                                             prefill=dict(delta.timing))
                            sent, finished = True, bool(delta.finish_reason)
                            yield delta
                            if finished:
                                return
                    return
                except PeerGone:  # before the first token: once more, elsewhere
                    retry = None if sent or retried else self._pick("aggregated", req, avoid=worker.worker_id)
                    if retry is None:
                        raise
                    log.warning("request %s: %s left before the first token; sent to %s", req.request_id,
                                worker.worker_id, retry.worker_id)
                    worker, retried = retry, True
        finally:
            if not finished:
                await self._cancel(req)

    async def _prefill(self, req: GenerateRequest, trace: dict) -> tuple[WorkerInfo, PrefillResult]:
        """The first token and the KV handle; a prefill worker that dies first is replaced by another, once."""
        prefill = self._pick("prefill", req)
        if prefill is None:
            raise NoWorkers(f"no prefill worker serves model {req.model!r}" if self.directory.by_role("decode", req.model)
                            else f"no worker serves model {req.model!r}")
        for attempt in (0, 1):
            t0 = time.perf_counter()
            try:
                async with aclosing(self._replies(prefill, req)) as replies:
                    async for batch in replies:
                        trace.update(prefill_worker=prefill.worker_id, prefill_host=prefill.host,
                                     prefill_gpus=list(prefill.gpus), prefill_rtt=time.perf_counter() - t0,
                                     prefill=dict(getattr(batch[0], "timing", {}) or {}))
                        return prefill, batch[0]
                raise ServingError("internal", f"prefill worker {prefill.worker_id} sent nothing")
            except PeerGone:
                other = self._pick("prefill", req, avoid=prefill.worker_id) if attempt == 0 else None
                if other is None:
                    raise
                log.warning("request %s: %s left before the first token; sent to %s", req.request_id,
                            prefill.worker_id, other.worker_id)
                prefill = other
        raise AssertionError("unreachable")

    async def _disaggregated(self, req: GenerateRequest, trace: dict) -> AsyncIterator[TokenDelta]:
        finished = False  # set before each yield, as in _aggregated
        try:
            prefill, result = await self._prefill(req, trace)
            if not isinstance(result, PrefillResult):
                raise ServingError("internal", f"prefill worker {prefill.worker_id} sent {type(result).__name__}")
            finished = bool(result.finish_reason)
            yield TokenDelta(req.request_id, [result.first_token], result.finish_reason, result.cached_tokens)
            if finished:
                return
            decode = self._pick("decode", req)
            if decode is None:
                raise NoWorkers(f"no decode worker serves model {req.model!r}")
            follow = GenerateRequest(req.request_id, req.model, req.token_ids, req.sampling,
                                     first_token=result.first_token, kv=result.kv, prefill_worker=prefill.worker_id,
                                     disagg_params=result.disagg_params)
            t0, first = time.perf_counter(), True
            async with aclosing(self._replies(decode, follow)) as replies:
                async for batch in replies:
                    delta = _delta(decode, follow, batch)
                    if first:
                        trace.update(decode_worker=decode.worker_id, decode_host=decode.host,
                                     decode_rtt=time.perf_counter() - t0, decode=dict(delta.timing))
                        first = False
                    finished = bool(delta.finish_reason)
                    yield delta
                    if finished:
                        return
        finally:
            if not finished:
                await self._cancel(req)

    async def _replies(self, worker: WorkerInfo, req: GenerateRequest):
        """The worker's decoded replies, in batches of those that arrived together; an ErrorReply raises."""
        gone = self.directory.gone(worker.worker_id)
        wid = worker.worker_id
        self.in_flight[wid] = self.in_flight.get(wid, 0) + 1
        try:
            async with aclosing(self.bus.stream(worker.subject, encode(req), self.first_token_timeout,
                                                self.idle_timeout, gone=gone,
                                                address=worker.direct if self.direct else None)) as stream:
                async for batch in stream:
                    replies = list(map(decode_reply, batch))
                    for i, reply in enumerate(replies):
                        if type(reply) is ErrorReply:
                            if i:  # the replies before the error first
                                yield replies[:i]
                            raise ServingError(reply.code, f"{worker.role} worker {wid}: {reply.message}")
                    yield replies
        except PeerGone:
            self.directory.lost(wid)  # also when NATS said so first: route nothing more there
            raise
        finally:
            self.in_flight[wid] -= 1
            if not self.in_flight[wid]:  # no entry left behind for workers that come and go
                del self.in_flight[wid]

    async def stats(self, worker: WorkerInfo, timeout: float = 5.0) -> WorkerStats:
        reply = decode_reply(await self.bus.request(worker.subject, encode(StatsRequest()), timeout))
        assert isinstance(reply, WorkerStats)
        return reply
