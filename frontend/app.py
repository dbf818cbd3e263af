"""The frontend: its state (workers, models, metrics) and its HTTP surface: /v1/chat/completions, /v1/completions
(frontend/generation.py), /v1/models, /health, /metrics."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from collections import deque
from typing import AsyncIterator, Callable

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from frontend.api import ApiError, Common
from frontend.generation import GenerationApp
from frontend.media import MediaPolicy
from frontend.tracing import SpanExporter
from frontend.preprocess import ModelFiles, StopStrings
from frontend.processes import merge_metrics
from frontend.router import LoadBoard, make_router
from hpc.runtime import gc_pauses
from hpc.runtime.cpu_wait import CpuWait
from hpc.runtime.client import ServingClient
from hpc.runtime.metrics import Children, LoopHistogram
from hpc.runtime.protocol import Sampling, decode_reply

log = logging.getLogger("frontend")
BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60)


class FrontendMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        # The histograms observed per request or per delta are lock-free (LoopHistogram): this event loop's own.
        self.ttft = LoopHistogram("hpc_frontend_ttft_seconds", "Time to first token", registry=r, buckets=BUCKETS)
        self.itl = LoopHistogram("hpc_frontend_itl_seconds", "Time between streamed deltas (tokens that arrived "
                                 "together are one delta)", registry=r, buckets=BUCKETS)
        self.requests = Counter("hpc_frontend_requests", "Requests by HTTP status", ["status"], registry=r)
        self.in_flight = Gauge("hpc_frontend_in_flight", "Requests being served", registry=r)
        self.queue_depth = Gauge("hpc_worker_queue_depth", "Queue depth each worker reports", ["worker"],
                                 registry=r)
        self.stages = LoopHistogram("hpc_frontend_stage_seconds", "Where TTFT goes, per request: preprocess "
                                    "(here), prefill_rtt (here), and the worker's own queue, compute, encode; "
                                    "kv_transfer and decode_first on the decode worker", ("stage", "worker"),
                                    registry=r, buckets=BUCKETS)
        self.child = Children()  # a request counts its status and observes its stages each time


class RecentWindow:
    """Request outcomes and latencies of the last `seconds`, for `hpc status` (Prometheus histograms cover all
    time; operators watching a deployment want the last minute)."""

    def __init__(self, seconds: float = 60.0):
        self.seconds = seconds
        self.ttft: deque[tuple[float, float]] = deque()
        self.itl: deque[tuple[float, float]] = deque()
        self.done: deque[tuple[float, bool]] = deque()

    def _trim(self, now: float) -> None:
        for q in (self.ttft, self.itl, self.done):
            while q and q[0][0] < now - self.seconds:
                q.popleft()

    def raw(self) -> dict:
        """The window's samples, to pool with other processes' (frontend/processes.py)."""
        self._trim(time.monotonic())
        return {"ttft": [v for _, v in self.ttft], "itl": [v for _, v in self.itl],
                "done": [good for _, good in self.done]}

    def summary(self, others: list[dict] = ()) -> dict:
        """The last minute, pooled with other processes' samples (`raw()`), if any."""
        pooled = [self.raw(), *others]
        ttft, itl, done = ([x for r in pooled for x in r[k]] for k in ("ttft", "itl", "done"))

        def pct(values, p):
            values = sorted(values)
            return round(1000 * values[min(len(values) - 1, int(p * len(values)))], 2) if values else None

        return {"window_s": self.seconds, "requests": len(done), "errors": done.count(False),
                "req_s": round(len(done) / self.seconds, 3), "ttft_p50_ms": pct(ttft, 0.5),
                "ttft_p99_ms": pct(ttft, 0.99), "itl_p50_ms": pct(itl, 0.5), "itl_p99_ms": pct(itl, 0.99),
                "processes": [len(r["done"]) for r in pooled]}  # requests per frontend process that answered


class Traces:
    """Each finished request's stages (durations measured on one host each), for `hpc diagnose`: the last ones in
    memory, and every one in a JSONL file when asked for (written in the background, never on the request path)."""

    def __init__(self, path: str | None = None, keep: int = 20000):
        self.recent: deque[dict] = deque(maxlen=keep)
        self.path = path
        self._pending: list[str] = []

    def add(self, record: dict) -> None:
        self.recent.append(record)
        if self.path:
            self._pending.append(json.dumps(record))

    def since(self, seconds: float) -> list[dict]:
        cutoff = time.time() - seconds
        return [r for r in self.recent if r["time"] >= cutoff]

    async def flush_forever(self) -> None:
        while self.path:
            await asyncio.sleep(0.5)
            if self._pending:
                lines, self._pending = self._pending, []
                await asyncio.to_thread(self._append, lines)

    def _append(self, lines: list[str]) -> None:
        # One write() to an O_APPEND file: the lines of several frontend processes never interleave.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, ("\n".join(lines) + "\n").encode())
        finally:
            os.close(fd)


class Frontend:
    def __init__(self, deployment: str, etcd: str, nats: str, router: str = "round-robin",
                 models: list[str] = (), request_timeout: float = 600.0, media_policy: MediaPolicy | None = None,
                 trace_file: str | None = None, credentials=None, direct: bool = True):
        self.client = ServingClient(deployment, etcd, nats, first_token_timeout=request_timeout,
                                    credentials=credentials, direct=direct)
        self.board = LoadBoard(self.client.in_flight)
        self.client.choose = make_router(router, self.board)
        self.declared = set(models)
        self.files: dict[str, ModelFiles] = {}
        self.metrics = FrontendMetrics()
        self.recent = RecentWindow()
        self.media_policy = media_policy or MediaPolicy()
        self._preparing: set[str] = set()
        self.traces = Traces(trace_file)
        self.spans = SpanExporter.from_env(deployment)  # OTLP, when an endpoint is configured
        self.api_keys: tuple[bytes, ...] = ()
        self.metrics_need_key = False
        self.peers = None  # frontend/processes.py: the other processes on this port, when there are several
        self.cpu = CpuWait()  # the event loop's thread (made on it): how long it waited for a CPU

    def set_api_keys(self, keys: list[str], metrics_need_key: bool = False) -> None:
        self.api_keys = tuple(k.encode() for k in keys if k)
        self.metrics_need_key = metrics_need_key

    def authorized(self, scope) -> bool:
        """/health is open (and /metrics and /stats unless metrics_need_key); anything else needs a key."""
        path = scope.get("path", "")
        if path == "/health" or ((path == "/metrics" or path.startswith("/stats")) and not self.metrics_need_key):
            return True
        header = next((v for k, v in scope.get("headers", []) if k == b"authorization"), b"")
        token = header[7:].strip() if header[:7].lower() == b"bearer " else b""
        return any(hmac.compare_digest(token, key) for key in self.api_keys)

    def count(self, status: str) -> None:
        """A request's outcome (HTTP status): in the metrics, and in the last minute's (server errors are errors)."""
        self.metrics.child(self.metrics.requests, status).inc()
        self.recent.done.append((time.monotonic(), not status.startswith("5")))

    async def start(self) -> None:
        await self.client.start()
        self.client.directory.on_change(self._forget_departed)
        self.client.directory.on_change(self._prepare_new_models)
        self._prepare_new_models()
        self._trace_writer = asyncio.create_task(self.traces.flush_forever())
        self._cpu_watch = asyncio.create_task(self._watch_cpu())
        await self.client.bus.subscribe(self.client.subjects.load_all(), self._on_load)
        gc_pauses.settle()  # started: what start-up made is never walked by the collector again

    async def close(self) -> None:
        await self.client.close()
        if self.spans:
            await asyncio.to_thread(self.spans.close)  # flushes what is batched

    async def _watch_cpu(self) -> None:
        while True:
            self.cpu.sample()
            await asyncio.sleep(1.0)

    async def _on_load(self, msg) -> None:
        stats = decode_reply(msg.data)
        if any(w.worker_id == stats.worker_id for w in self.client.directory.workers.values()):
            self.board.report(stats)
            self.metrics.queue_depth.labels(stats.worker_id).set(stats.waiting)

    def _prepare_new_models(self) -> None:
        """Read a newly served model's tokenizer and config off the request path; for a vision-language model,
        import torch too (embedding files are read with it, and its first import takes over a second)."""
        for model in self.live_models():
            if model not in self.files and model not in self._preparing:
                self._preparing.add(model)
                asyncio.get_running_loop().run_in_executor(None, self._prepare, model)

    def _prepare(self, model: str) -> None:
        try:
            files = self.model_files(model)
            if files.vision is not None:
                import torch  # noqa: F401
        except Exception as e:  # the request that needs it reports the problem
            log.warning("could not prepare model %s: %s", model, e)

    def _forget_departed(self) -> None:
        """A worker that left: its load report and its queue-depth series go with it."""
        live = {w.worker_id for w in self.client.directory.workers.values()}
        for worker_id in [w for w in self.board.reported if w not in live]:
            del self.board.reported[worker_id]
            self.metrics.queue_depth.remove(worker_id)

    def direct_links(self) -> dict:
        """This process's direct connections to the workers that offer one, by state (hpc/runtime/direct.py)."""
        counts = {"open": 0, "opening": 0, "failing": 0, "none": 0}
        for w in self.client.directory.workers.values():
            if w.direct:
                counts[self.client.bus.connections.state(w.direct) if self.client.direct else "none"] += 1
        return counts

    # ---- models ------------------------------------------------------------------------------------------------
    def live_models(self) -> list[str]:
        return sorted(self.client.models())

    def path_complete(self, model: str) -> bool:
        d = self.client.directory
        return bool(d.by_role("aggregated", model) or (d.by_role("prefill", model) and d.by_role("decode", model)))

    def model_files(self, model: str) -> ModelFiles:
        files = self.files.get(model)
        if files is None:
            workers = [w for w in self.client.directory.workers.values() if w.model == model and w.model_path]
            if not workers:
                raise self.missing(model)
            files = self.files[model] = ModelFiles(workers[0].model_path)
        return files

    def missing(self, model: str) -> ApiError:
        if model in self.declared or model in self.files:
            return ApiError(503, f"model {model!r} has no workers right now", "service_unavailable",
                            headers={"Retry-After": "1"})
        return ApiError(404, f"model {model!r} does not exist (served: {', '.join(self.live_models()) or 'none'})",
                        "not_found_error", "model")

    # ---- generation --------------------------------------------------------------------------------------------
    async def events(self, req: Common, prompt: list[int], files: ModelFiles, max_tokens: int,
                     started: float, images: list = ()) -> AsyncIterator[tuple[str, str | None, int, int]]:
        """(text delta, finish reason or None, completion tokens so far, prompt tokens from the prefix cache).
        With continuous usage stats every token batch is an event, even one whose text is still empty."""
        every_token = bool(req.stream and req.stream_options and req.stream_options.continuous_usage_stats)
        sampling = Sampling(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                            seed=req.seed, ignore_eos=req.ignore_eos)
        detok, stops = files.detokenizer(), StopStrings(req.stop_list())
        trace: dict = {}
        stream = self.client.generate(req.model, prompt, sampling, multimodal=list(images), trace=trace)
        count, cached, last = 0, 0, None
        preprocessed = time.perf_counter()
        times: list[float] = []
        try:
            async for delta in stream:
                now = time.perf_counter()
                if len(times) < 2:
                    times.append(now)
                (self.metrics.ttft if last is None else self.metrics.itl).observe(now - (last or started))
                (self.recent.ttft if last is None else self.recent.itl).append((time.monotonic(),
                                                                                 now - (last or started)))
                last = now
                count += len(delta.token_ids)
                cached += delta.cached_tokens
                text = detok.add(delta.token_ids) + (detok.flush() if delta.finish_reason else "")
                text, hit = stops.feed(text)
                if hit:
                    yield text, "stop", count, cached
                    return
                if delta.finish_reason:
                    yield text + stops.flush(), "length" if delta.finish_reason == "length" else "stop", count, cached
                    return
                if text or every_token:
                    yield text, None, count, cached
        finally:
            await stream.aclose()  # stops the work on the workers if we leave early (stop string, disconnect)
            if times:
                self._record(req.model, started, preprocessed, times, len(prompt), cached, len(images), trace,
                             time.perf_counter())

    def _record(self, model: str, started: float, preprocessed: float, times: list[float], prompt_tokens: int,
                cached: int, images: int, trace: dict, finished: float) -> None:
        """The request's stages: TTFT and its parts, and the time to the second token with the decode side's."""
        record = {"time": time.time(), "model": model, "prompt_tokens": prompt_tokens, "cached_tokens": cached,
                  "images": images, "preprocess": preprocessed - started, "ttft": times[0] - started,
                  "second_token": times[1] - times[0] if len(times) > 1 else None, "e2e": finished - started,
                  **trace}
        self.traces.add(record)
        if self.spans:
            self.spans.export(record)
        stages = {"preprocess": record["preprocess"], "ttft": record["ttft"],
                  "prefill_rtt": trace.get("prefill_rtt")}
        for side in ("prefill", "decode"):
            for stage, seconds in (trace.get(side) or {}).items():
                if stage != "kv_bytes":
                    stages[stage] = seconds
        worker = trace.get("prefill_worker", "")
        for stage, seconds in stages.items():
            if seconds is not None:
                self.metrics.child(self.metrics.stages, stage, trace.get("decode_worker", worker) if stage in (
                    "kv_wait", "kv_transfer", "decode_first") else worker).observe(seconds)


def control_app(fe: Frontend, on_ready: Callable[[], None] | None = None) -> FastAPI:
    """/v1/models, /health and /metrics; the generation endpoints are frontend/generation.py's hot path."""
    app = FastAPI(title="hpc frontend", docs_url=None, redoc_url=None, openapi_url=None)

    @app.on_event("startup")
    async def startup():
        await fe.start()
        if on_ready is not None:
            on_ready()

    @app.on_event("shutdown")
    async def shutdown():
        await fe.close()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):  # 404, 405: in OpenAI's format too
        fe.metrics.requests.labels(str(exc.status_code)).inc()
        return JSONResponse({"error": {"message": f"{request.method} {request.url.path}: {exc.detail}",
                                       "type": "invalid_request_error", "param": None, "code": exc.status_code}},
                            status_code=exc.status_code, headers=exc.headers)

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        paths = {w.model: w.model_path for w in fe.client.directory.workers.values()}
        # "root" is the model directory, as vLLM reports it: `hpc bench` reads the tokenizer from there.
        return {"object": "list", "data": [{"id": m, "object": "model", "created": now, "owned_by": "hpc",
                                            "root": paths.get(m)} for m in fe.live_models()]}

    @app.get("/health")
    async def health():
        models = sorted(set(fe.live_models()) | fe.declared)
        status = {m: "ready" if fe.path_complete(m) else "incomplete" for m in models}
        ready = bool(models) and all(s == "ready" for s in status.values())
        return JSONResponse({"status": "ready" if ready else "not ready", "models": status},
                            status_code=200 if ready else 503)

    # With several frontend processes, any of them answers for all (local=1: its own share, for the others).
    @app.get("/stats")
    async def stats(local: bool = False):  # the last minute and the direct connections, for `hpc status`
        own = {**fe.recent.raw(), "direct": fe.direct_links(), "cpu": fe.cpu.share()}
        if local:
            return own
        others = await fe.peers.gather_json("/stats?local=1") if fe.peers else []
        links = [own["direct"], *(o.get("direct") or {} for o in others)]
        direct = {state: sum(d.get(state, 0) for d in links) for state in own["direct"]}
        cpus = [c for c in (own["cpu"], *(o.get("cpu") for o in others)) if c]
        cpu = {"cores": round(sum(c["running"] for c in cpus), 3),  # the event loops' threads, over the last 10 s
               "waiting": max(c["waiting"] for c in cpus)} if cpus else None  # the process that waited most
        return {**fe.recent.summary(others), "direct": {"enabled": fe.client.direct, **direct}, "cpu": cpu}

    @app.get("/stats/requests")
    async def requests(window: float = 60.0, local: bool = False):  # for `hpc diagnose`: each request's stages
        records = fe.traces.since(window)
        if fe.peers and not local:
            for other in await fe.peers.gather_json(f"/stats/requests?window={window}&local=1"):
                records += other["requests"]
            records.sort(key=lambda r: r["time"])
        return {"window_s": window, "requests": records}

    @app.get("/stats/workers")
    async def workers():  # for `hpc diagnose`: where each worker runs and what it last reported
        reported = fe.board.reported
        out = {}
        for w in fe.client.directory.workers.values():
            s = reported.get(w.worker_id)
            out[w.worker_id] = {"role": w.role, "host": w.host, "gpus": list(w.gpus), "engine": w.engine,
                                "model": w.model, "max_batch_size": w.max_batch_size,
                                "waiting": s.waiting if s else None, "running": s.running if s else None,
                                "kv_blocks_total": s.kv_blocks_total if s else None,
                                "kv_blocks_free": s.kv_blocks_free if s else None,
                                "cpu_waiting": s.cpu_waiting if s else None}
        return out

    @app.get("/metrics")
    async def metrics(local: bool = False):
        own = generate_latest(fe.metrics.registry)
        if fe.peers and not local:
            own = merge_metrics([own.decode(), *await fe.peers.gather_text("/metrics?local=1")]).encode()
        return Response(own, media_type=CONTENT_TYPE_LATEST)

    return app


def create_app(fe: Frontend, on_ready: Callable[[], None] | None = None) -> GenerationApp:
    return GenerationApp(fe, control_app(fe, on_ready))
