"""The frontend's HTTP surface: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from frontend.api import ApiError, ChatRequest, Common, CompletionRequest, Unsupported, error_response
from frontend.preprocess import ModelFiles, PreprocessError, StopStrings
from frontend.router import LoadBoard, make_router
from hpc.runtime.client import NoWorkers, ServingClient, ServingError
from hpc.runtime.messaging import PeerGone, RequestTimeout
from hpc.runtime.protocol import Sampling, decode_reply

log = logging.getLogger("frontend")
BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60)


class FrontendMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.ttft = Histogram("hpc_frontend_ttft_seconds", "Time to first token", registry=r, buckets=BUCKETS)
        self.itl = Histogram("hpc_frontend_itl_seconds", "Time between tokens", registry=r, buckets=BUCKETS)
        self.requests = Counter("hpc_frontend_requests", "Requests by HTTP status", ["status"], registry=r)
        self.in_flight = Gauge("hpc_frontend_in_flight", "Requests being served", registry=r)
        self.queue_depth = Gauge("hpc_worker_queue_depth", "Queue depth each worker reports", ["worker"],
                                 registry=r)


class Frontend:
    def __init__(self, deployment: str, etcd: str, nats: str, router: str = "round-robin",
                 models: list[str] = (), request_timeout: float = 600.0):
        self.client = ServingClient(deployment, etcd, nats, first_token_timeout=request_timeout)
        self.board = LoadBoard(self.client.in_flight)
        self.client.choose = make_router(router, self.board)
        self.declared = set(models)
        self.files: dict[str, ModelFiles] = {}
        self.metrics = FrontendMetrics()

    async def start(self) -> None:
        await self.client.start()
        await self.client.bus.subscribe(self.client.subjects.load_all(), self._on_load)

    async def close(self) -> None:
        await self.client.close()

    async def _on_load(self, msg) -> None:
        stats = decode_reply(msg.data)
        self.board.report(stats)
        self.metrics.queue_depth.labels(stats.worker_id).set(stats.waiting)

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
                     started: float) -> AsyncIterator[tuple[str, str | None, int]]:
        """(text delta, finish reason or None, completion tokens so far)."""
        sampling = Sampling(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                            seed=req.seed, ignore_eos=req.ignore_eos)
        detok, stops = files.detokenizer(), StopStrings(req.stop_list())
        stream = self.client.generate(req.model, prompt, sampling)
        count, last = 0, None
        try:
            async for delta in stream:
                now = time.perf_counter()
                (self.metrics.ttft if last is None else self.metrics.itl).observe(now - (last or started))
                last = now
                count += len(delta.token_ids)
                text, hit = stops.feed(detok.add(delta.token_ids))
                if hit:
                    yield text, "stop", count
                    return
                if delta.finish_reason:
                    yield text + stops.flush(), "length" if delta.finish_reason == "length" else "stop", count
                    return
                if text:
                    yield text, None, count
        finally:
            await stream.aclose()  # stops the work on the workers if we leave early (stop string, disconnect)


def to_api_error(e: Exception) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, (Unsupported, PreprocessError)):
        return ApiError(400, str(e), param=getattr(e, "option", None))
    if isinstance(e, NoWorkers):
        return ApiError(503, str(e), "service_unavailable", headers={"Retry-After": "1"})
    if isinstance(e, RequestTimeout):
        return ApiError(504, f"a worker did not answer in time: {e}", "timeout")
    if isinstance(e, PeerGone):
        return ApiError(502, f"the worker serving the request failed: {e}", "worker_error")
    if isinstance(e, ServingError):
        if e.code == "bad_request":
            return ApiError(400, str(e))
        return ApiError(503 if e.code == "unavailable" else 502, str(e), "worker_error")
    log.exception("unexpected error")
    return ApiError(500, f"internal error: {type(e).__name__}", "internal_error")


def create_app(fe: Frontend) -> FastAPI:
    app = FastAPI(title="hpc frontend", docs_url=None, redoc_url=None)

    @app.on_event("startup")
    async def startup():
        await fe.start()

    @app.on_event("shutdown")
    async def shutdown():
        await fe.close()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            err = ApiError(400, f"malformed JSON: {first.get('ctx', {}).get('error', first.get('msg'))}")
        else:
            where = ".".join(str(p) for p in first["loc"] if p != "body")
            err = ApiError(400, f"{where or 'body'}: {first['msg']}", param=where or None)
        fe.metrics.requests.labels("400").inc()
        return error_response(err)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        fe.metrics.requests.labels(str(exc.status)).inc()
        return error_response(exc)

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

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(fe.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        def prompt(files: ModelFiles) -> list[int]:
            return files.encode(files.render_chat([{"role": m.role, "content": m.text()} for m in req.messages]))

        return await serve(req, request, prompt, req.max_completion_tokens or req.max_tokens, chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        def prompt(files: ModelFiles) -> list[int]:
            p = req.prompt
            if isinstance(p, list) and p and all(isinstance(t, str) for t in p):
                if len(p) != 1:
                    raise Unsupported("prompt", "one prompt per request")
                p = p[0]
            ids = files.encode(p) if isinstance(p, str) else list(p)
            if not ids:
                raise ApiError(400, "prompt: empty", param="prompt")
            return ids

        return await serve(req, request, prompt, req.max_tokens, chat=False)

    async def serve(req: Common, request: Request, make_prompt, max_tokens: int | None, chat: bool):
        started = time.perf_counter()
        try:
            req.check_supported()
            if not fe.path_complete(req.model):
                raise fe.missing(req.model) if req.model not in fe.live_models() else NoWorkers(
                    f"model {req.model!r} has no complete path (prefill and decode, or aggregated) right now")
            files = fe.model_files(req.model)
            prompt = make_prompt(files)
            max_tokens = max_tokens or max(1, min(16, files.context_length - len(prompt)))
            files.check_length(len(prompt), max_tokens)
            events = fe.events(req, prompt, files, max_tokens, started)
            first = await events.__anext__()  # errors before the first token become HTTP errors
        except Exception as e:
            raise to_api_error(e) from None
        fe.metrics.in_flight.inc()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        usage = lambda n: {"prompt_tokens": len(prompt), "completion_tokens": n,  # noqa: E731
                           "total_tokens": len(prompt) + n}
        if not req.stream:
            text, reason, n = first
            try:
                async for more, reason, n in events:
                    text += more
            except Exception as e:
                fe.metrics.in_flight.dec()
                raise to_api_error(e) from None
            fe.metrics.in_flight.dec()
            fe.metrics.requests.labels("200").inc()
            choice = {"index": 0, "finish_reason": reason, "logprobs": None}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                    "model": req.model, "choices": [choice], "usage": usage(n)}

        def chunk(text: str | None, reason: str | None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
            body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": int(time.time()), "model": req.model, "choices": [choice]}
            return f"data: {json.dumps(body)}\n\n"

        async def sse():
            n = 0
            try:
                if chat:
                    yield chunk(None, None, role=True)
                text, reason, n = first
                yield chunk(text, reason)
                async for text, reason, n in events:
                    yield chunk(text, reason)
                if req.stream_options and req.stream_options.include_usage:
                    body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                            "created": int(time.time()), "model": req.model, "choices": [], "usage": usage(n)}
                    yield f"data: {json.dumps(body)}\n\n"
                fe.metrics.requests.labels("200").inc()
            except asyncio.CancelledError:  # the client went away: `events` cancels the work as it closes
                fe.metrics.requests.labels("499").inc()
                raise
            except Exception as e:  # after the first token: report in the stream, never hang it
                err = to_api_error(e)
                fe.metrics.requests.labels(str(err.status)).inc()
                yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.type, 'code': err.status}})}\n\n"
            finally:
                fe.metrics.in_flight.dec()
                await events.aclose()
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app
