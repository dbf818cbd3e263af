"""POST /v1/chat/completions and /v1/completions, served as a plain ASGI app in front of the FastAPI app that
serves everything else (/v1/models, /health, /metrics).

This is the frontend's hot path. It skips FastAPI's routing and middleware stack and Starlette's
StreamingResponse, which starts a task group per response. benchmarks/frontend.py measures what that saves."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Callable

import msgspec
from pydantic import ValidationError

from frontend import media
from frontend.api import ApiError, ChatRequest, Common, CompletionRequest, Unsupported
from frontend.http_protocol import ON_DISCONNECT
from frontend.preprocess import ModelFiles, PreprocessError
from hpc.runtime.protocol import MultimodalPart
from hpc.runtime.client import NoWorkers, ServingError
from hpc.runtime.ids import unique_id
from hpc.runtime.messaging import PeerGone, RequestTimeout

log = logging.getLogger("frontend")
MAX_BODY_BYTES = 32 << 20
# A prompt longer than this many characters per token of context cannot fit: refused before it is tokenized.
MAX_CHARS_PER_TOKEN = 32
# Prompts longer than this are templated and tokenized in a thread, so one large request never holds the event loop.
TOKENIZE_INLINE_CHARS = 16384
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]
DONE = b"data: [DONE]\n\n"
_encode = msgspec.json.Encoder().encode
# Characters that JSON leaves raw but line splitters (Python's str.splitlines, httpx's iter_lines) break lines at.
_LINE_BREAKS = ((b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"), (b"\xc2\x85", b"\\u0085"))


def sse_event(body: dict) -> bytes:
    data = _encode(body)
    for raw, escaped in _LINE_BREAKS:
        if raw in data:
            data = data.replace(raw, escaped)
    return b"data: " + data + b"\n\n"


class ClientGone(Exception):
    """The client closed the connection before the request was read or answered."""


def to_api_error(e: Exception) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, (Unsupported, PreprocessError)):
        return ApiError(400, str(e), param=getattr(e, "option", None))
    if isinstance(e, media.MediaError):
        return ApiError(e.status, e.message)
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


async def read_body(receive) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def parse(model: type[Common], body: bytes) -> Common:
    """The request body, validated; the first problem as a 400 naming the field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        if first["type"] == "json_invalid":
            raise ApiError(400, f"malformed JSON: {first.get('ctx', {}).get('error', first['msg'])}") from None
        where = ".".join(str(p) for p in first["loc"])
        raise ApiError(400, f"{where or 'body'}: {first['msg']}", param=where or None) from None


async def send_json(send, status: int, body: dict, headers: dict | None = None) -> None:
    data = _encode(body)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


def prompt_of(req: Common, files: ModelFiles) -> list[int]:
    if isinstance(req, ChatRequest):
        return files.encode(files.render_chat([{"role": m.role, "content": m.text()} for m in req.messages]))
    p = req.prompt
    if isinstance(p, list) and p and all(isinstance(t, str) for t in p):
        if len(p) != 1:
            raise Unsupported("prompt", "one prompt per request")
        p = p[0]
    ids = files.encode(p) if isinstance(p, str) else list(p)
    if not ids:
        raise ApiError(400, "prompt: empty", param="prompt")
    return ids


async def tokenize(req: Common, files: ModelFiles, policy: media.MediaPolicy = media.MediaPolicy()
                   ) -> tuple[list[int], list[MultimodalPart]]:
    """The prompt's token ids and its images (checked, their image tokens expanded to the positions they take)."""
    chars, limit = req.prompt_chars(), files.context_length * MAX_CHARS_PER_TOKEN
    if chars > limit:
        raise ApiError(400, f"the prompt has {chars} characters; the model's context of {files.context_length} "
                            f"tokens holds no more than {limit}", param="messages" if isinstance(req, ChatRequest)
                       else "prompt")
    if isinstance(req, ChatRequest) and any(m.has_images() for m in req.messages):
        return await multimodal_prompt(req, files, policy)
    if chars > TOKENIZE_INLINE_CHARS:
        return await asyncio.to_thread(prompt_of, req, files), []
    return prompt_of(req, files), []


async def multimodal_prompt(req: ChatRequest, files: ModelFiles, policy: media.MediaPolicy
                            ) -> tuple[list[int], list[MultimodalPart]]:
    vision = files.vision
    urls: list[tuple[str, str]] = []
    messages = [{"role": m.role, "content": m.text(i, vision.image_token if vision else "", urls)}
                for i, m in enumerate(req.messages)]
    items = await media.load_all(urls, policy, vision, req.model)
    ids = await asyncio.to_thread(lambda: files.encode(files.render_chat(messages)))
    at = [i for i, t in enumerate(ids) if t == vision.image_token_id]
    if len(at) != len(items):
        raise ApiError(400, f"the prompt has {len(at)} image tokens ({vision.image_token}) for {len(items)} "
                            f"images: the text must not contain the image token itself", param="messages")
    out, parts, last = [], [], 0
    for position, item in zip(at, items):
        out.extend(ids[last:position])
        parts.append(MultimodalPart(item.kind, len(out), item.num_tokens, item.digest, data=item.data,
                                    path=item.path))
        out.extend([vision.image_token_id] * item.num_tokens)
        last = position + 1
    out.extend(ids[last:])
    return out, parts


class Chunks:
    """The OpenAI response bodies of one request, chat or text completion."""

    def __init__(self, req: Common, prompt_tokens: int):
        self.chat = isinstance(req, ChatRequest)
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + unique_id()
        self.model, self.created, self.prompt_tokens = req.model, int(time.time()), prompt_tokens

    def usage(self, n: int, cached: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def _event(self, choices: list, **extra) -> bytes:
        body = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, **extra}
        return sse_event(body)

    def role(self) -> bytes:
        return self._event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                             "logprobs": None}])

    def delta(self, text: str, reason: str | None, usage: dict | None = None) -> bytes:
        if self.chat:
            choice = {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": reason,
                      "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
        return self._event([choice], **({"usage": usage} if usage else {}))

    def final_usage(self, n: int, cached: int) -> bytes:
        return self._event([], usage=self.usage(n, cached))

    def whole(self, text: str, reason: str | None, n: int, cached: int) -> dict:
        choice = {"index": 0, "finish_reason": reason, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice], "usage": self.usage(n, cached)}


class DisconnectWatch:
    """Cancels the request's task if the client disconnects before the response is complete: during the prefill
    as well as while tokens stream, so the workers stop at once. Its `send` passes the response on and stops
    watching at the last message. Under the frontend's own HTTP protocol the protocol calls it when the connection
    drops; under another server a task waits on `receive()` (uvicorn's reports a completed response as a
    disconnect too, hence the stop at the last message)."""

    def __init__(self, scope, receive, send):
        self._send, self.gone, self._active = send, False, True
        self._task, self._watcher = asyncio.current_task(), None
        if ON_DISCONNECT in scope:
            scope[ON_DISCONNECT] = self._disconnected
            return

        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            self._disconnected()

        self._watcher = asyncio.create_task(watch())  # it first runs while we wait for the workers

    def _disconnected(self) -> None:
        if self._active:
            self.gone = True
            self._task.cancel()

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body"):
            self.stop()
        await self._send(message)

    def stop(self) -> None:
        self._active = False
        if self._watcher is not None:
            self._watcher.cancel()


class GenerationApp:
    """The ASGI app the frontend serves: the generation endpoints here, anything else to `fallback`."""

    ROUTES = {"/v1/chat/completions": ChatRequest, "/v1/completions": CompletionRequest}

    def __init__(self, fe, fallback: Callable):
        self.fe, self.fallback = fe, fallback

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.fe.api_keys and not self.fe.authorized(scope):
            return await self.fail(send, ApiError(401, "invalid or missing API key: send Authorization: Bearer "
                                                       "<key>", "invalid_request_error",
                                                  headers={"WWW-Authenticate": "Bearer"}))
        model = self.ROUTES.get(scope.get("path")) if scope["type"] == "http" else None
        if model is None:
            return await self.fallback(scope, receive, send)
        if scope["method"] != "POST":
            return await self.fail(send, ApiError(405, f"{scope['path']} takes POST", headers={"Allow": "POST"}))
        try:
            body = await read_body(receive)
        except ClientGone:
            return self.fe.count("499")
        except ApiError as e:
            return await self.fail(send, e)
        watch = DisconnectWatch(scope, receive, send)
        try:
            await self.generate(model, body, watch.send)
        except asyncio.CancelledError:
            if not watch.gone:  # the server is shutting down
                raise
            if hasattr(asyncio.current_task(), "uncancel"):  # Python 3.11+: this cancellation is handled
                asyncio.current_task().uncancel()
            self.fe.count("499")
        finally:
            watch.stop()

    async def fail(self, send, err: ApiError) -> None:
        self.fe.count(str(err.status))
        await send_json(send, err.status, {"error": {"message": err.message, "type": err.type, "param": err.param,
                                                     "code": err.status}}, err.headers)

    async def generate(self, model: type[Common], body: bytes, send) -> None:
        fe, started = self.fe, time.perf_counter()
        try:
            req = parse(model, body)
            req.check_supported()
            if not fe.path_complete(req.model):
                raise fe.missing(req.model) if req.model not in fe.live_models() else NoWorkers(
                    f"model {req.model!r} has no complete path (prefill and decode, or aggregated) right now")
            files = fe.model_files(req.model)
            prompt, images = await tokenize(req, files, fe.media_policy)
            max_tokens = (req.max_completion_tokens if isinstance(req, ChatRequest) else None) or req.max_tokens
            max_tokens = max_tokens or max(1, min(16, files.context_length - len(prompt)))
            files.check_length(len(prompt), max_tokens)
        except Exception as e:
            return await self.fail(send, to_api_error(e))
        events = fe.events(req, prompt, files, max_tokens, started, images)
        try:
            try:
                first = await events.__anext__()  # errors before the first token become HTTP errors
            except Exception as e:
                return await self.fail(send, to_api_error(e))
            chunks = Chunks(req, len(prompt))
            fe.metrics.in_flight.inc()
            try:
                if req.stream:
                    await self.stream(send, req, chunks, first, events)
                else:
                    await self.whole(send, chunks, first, events)
            finally:
                fe.metrics.in_flight.dec()
        finally:
            await events.aclose()  # stops the work on the workers if we leave early

    async def whole(self, send, chunks: Chunks, first: tuple, events: AsyncIterator) -> None:
        text, reason, n, cached = first
        try:
            async for more, reason, n, cached in events:
                text += more
        except Exception as e:
            return await self.fail(send, to_api_error(e))
        self.fe.count("200")
        await send_json(send, 200, chunks.whole(text, reason, n, cached))

    async def stream(self, send, req: Common, chunks: Chunks, first: tuple, events: AsyncIterator) -> None:
        """The SSE body, a chunk per text delta. The last delta, the usage and [DONE] end the body in one write: one
        TCP segment, one wake-up of the client, instead of three. An error after the first token is reported in
        the stream, which then ends: never a hung stream."""
        opts = req.stream_options
        continuous = bool(opts and opts.continuous_usage_stats)
        text, reason, n, cached = first
        piece = (chunks.role() if chunks.chat else b"") + chunks.delta(text, reason,
                                                                       chunks.usage(n, cached) if continuous else None)
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        while reason is None:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
            try:
                text, reason, n, cached = await events.__anext__()
                piece = chunks.delta(text, reason, chunks.usage(n, cached) if continuous else None)
            except StopAsyncIteration:
                piece = b""
                break
            except Exception as e:
                err = to_api_error(e)
                self.fe.count(str(err.status))
                error = sse_event({"error": {"message": err.message, "type": err.type, "code": err.status}})
                await send({"type": "http.response.body", "body": error + DONE, "more_body": False})
                return
        if opts and opts.include_usage:
            piece += chunks.final_usage(n, cached)
        self.fe.count("200")
        await send({"type": "http.response.body", "body": piece + DONE, "more_body": False})
