"""LLM, SamplingParams, DisaggregatedParams and the request outputs of the double, with the recorded signatures.

A step thread runs the requests (continuous batching, one token per request per step); each step's tokens come
from the "model" on this process (one rank) or from every MPI rank through the leader (several ranks, under
trtllm-llmapi-launch). The cache transceiver is a TCP server: a context-only request leaves its state there, and a
generation-only request fetches it from the endpoint in its opaque_state, across processes and nodes."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import socket
import socketserver
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from tensorrt_llm import _model, _mpi
from tensorrt_llm._recorded import api, bind

_ids = itertools.count(1)


def _say(text: str) -> None:
    print(f"[tensorrt_llm double] {text}", file=sys.stderr, flush=True)


class SamplingParams:
    def __init__(self, *args, **kwargs):
        for key, value in bind("SamplingParams", api()["SamplingParams"], args, kwargs).items():
            setattr(self, key, value)


@dataclass(slots=True, kw_only=True)
class DisaggregatedParams:
    request_type: str | None = None
    first_gen_tokens: list | None = None
    first_gen_log_probs: list | None = None
    first_gen_logits: list | None = None
    ctx_request_id: int | None = None
    opaque_state: bytes | None = None
    draft_tokens: list | None = None
    disagg_request_id: int | None = None
    ctx_dp_rank: int | None = None
    ctx_info_endpoint: str | None = None
    schedule_style: int | None = None
    multimodal_embedding_handles: list | None = None
    multimodal_hashes: list | None = None
    mrope_position_ids_handle: dict | None = None
    mrope_position_deltas_handle: dict | None = None

    def __post_init__(self):
        if self.request_type is not None and self.request_type not in api()["DisaggregatedParams"]["request_types"]:
            raise ValueError(f"Unknown request type: {self.request_type}")


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    disaggregated_params: DisaggregatedParams | None = None
    _sent: int = 0

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def token_ids_diff(self) -> list:
        return self.token_ids[self._sent:]


class RequestOutput:
    """What generate_async returns: awaitable with aresult(), async-iterable when streaming."""

    def __init__(self, request_id: int, prompt_token_ids: list, streaming: bool, engine: "_Engine"):
        self.request_id, self.prompt, self.prompt_token_ids = request_id, None, prompt_token_ids
        self.outputs = [CompletionOutput(0)]
        self.context_logits, self.finished, self._streaming, self._engine = None, False, streaming, engine
        self._aborted = False
        self._loop = asyncio.get_running_loop()
        self._updates: asyncio.Queue = asyncio.Queue()
        self._error: Exception | None = None

    def abort(self) -> None:
        self._aborted = True
        self._engine.abort(self.request_id)

    def aborted(self) -> bool:
        return self._aborted

    def _push(self, tokens: list, finish: str | None, params=None, error: Exception | None = None) -> None:
        self._loop.call_soon_threadsafe(self._updates.put_nowait, (tokens, finish, params, error))

    def _apply(self, update) -> None:
        tokens, finish, params, error = update
        out = self.outputs[0]
        out._sent = len(out.token_ids)
        out.token_ids = out.token_ids + tokens
        out.finish_reason, out.disaggregated_params = finish, params or out.disaggregated_params
        self.finished = finish is not None
        self._error = error

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.finished:
            raise StopAsyncIteration
        self._apply(await self._updates.get())
        if self._error:
            raise self._error
        return self

    async def aresult(self) -> "RequestOutput":
        while not self.finished:
            self._apply(await self._updates.get())
            if self._error:
                raise self._error
        return self

    def result(self, timeout: float | None = None):
        raise RuntimeError("the double serves the asyncio API only")


@dataclass
class _Request:
    output: RequestOutput
    context: list
    sampling: SamplingParams
    kind: str  # "context_and_generation" | "context_only" | "generation_only"
    params: DisaggregatedParams | None
    generated: int = 0
    fetched: bool = False


class _Transceiver(socketserver.ThreadingTCPServer):
    """Context states kept for generation-only requests of other processes, served one line of JSON each."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, release_after_s: float):
        self.states: dict[int, tuple[float, dict]] = {}
        self.release_after_s = release_after_s
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _TransceiverHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"{self.server_address[0]}:{self.server_address[1]}"

    def keep(self, ctx_id: int, state: dict) -> None:
        with self.lock:
            now = time.monotonic()
            for key, (t, _) in list(self.states.items()):
                if now - t > self.release_after_s:
                    del self.states[key]
                    _say(f"context {key}: KV never fetched; released after {self.release_after_s:.0f} s")
            self.states[ctx_id] = (now, state)

    def take(self, ctx_id: int) -> dict | None:
        with self.lock:
            entry = self.states.pop(ctx_id, None)
        if entry:
            _say(f"context {ctx_id}: KV sent to the generation side; released")
        return entry[1] if entry else None

    @staticmethod
    def fetch(endpoint: str, ctx_id: int, timeout: float = 10) -> dict:
        host, port = endpoint.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=timeout) as s:
            s.sendall(json.dumps({"id": ctx_id}).encode() + b"\n")
            reply = s.makefile("rb").readline()
        state = json.loads(reply or b"null")
        if not state:
            raise RuntimeError(f"context {ctx_id} is not held at {endpoint} (released, or never there)")
        return state


class _TransceiverHandler(socketserver.StreamRequestHandler):
    def handle(self):
        ask = json.loads(self.rfile.readline() or b"{}")
        self.wfile.write(json.dumps(self.server.take(ask.get("id"))).encode() + b"\n")


class _Engine:
    """The step loop: every running request gets one token per step."""

    def __init__(self, forward, step_s: float):
        self.forward, self.step_s = forward, step_s
        self.requests: dict[int, _Request] = {}
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def add(self, req: _Request) -> None:
        with self.lock:
            self.requests[req.output.request_id] = req
        self.wake.set()

    def abort(self, request_id: int) -> None:
        with self.lock:
            req = self.requests.pop(request_id, None)
        if req is not None:
            _say(f"request {request_id} aborted")
            req.output._push([], "cancelled")

    def _run(self) -> None:
        while not self.stopping:
            with self.lock:
                batch = list(self.requests.values())
            if not batch:
                self.wake.wait(0.05)
                self.wake.clear()
                continue
            ready = [r for r in batch if self._fetch_if_needed(r)]
            try:
                tokens = self.forward([r.context for r in ready]) if ready else []
            except Exception as e:  # a rank died: every request in the batch fails
                for r in ready:
                    self._finish(r, [], "cancelled", RuntimeError(f"executor failed: {e}"))
                continue
            time.sleep(self.step_s)
            for r, t in zip(ready, tokens):
                self._advance(r, t)

    def _fetch_if_needed(self, r: _Request) -> bool:
        if r.kind != "generation_only" or r.fetched:
            return True
        p = r.params
        try:
            opaque = json.loads(p.opaque_state)
            state = _Transceiver.fetch(opaque["endpoint"], p.ctx_request_id)
            if state["prompt"] != r.context:
                raise RuntimeError("the fetched KV belongs to another prompt")
        except Exception as e:
            self._finish(r, [], "cancelled", RuntimeError(f"cache transceiver: {e}"))
            return False
        r.context = state["prompt"] + list(p.first_gen_tokens)
        r.generated, r.fetched = len(p.first_gen_tokens), True
        r.output._push(list(p.first_gen_tokens), None)  # the generation output begins with the first tokens
        return True

    def _advance(self, r: _Request, token: int) -> None:
        s = r.sampling
        r.context.append(token)
        r.generated += 1
        stops = set(s.stop_token_ids or ()) | ({s.end_id} if s.end_id is not None else set())
        finish = ("stop" if token in stops and not s.ignore_eos else
                  "length" if r.generated >= s.max_tokens or r.kind == "context_only" else None)
        params = None
        if r.kind == "context_only":
            ctx_id = r.output.request_id
            self.transceiver.keep(ctx_id, {"prompt": r.output.prompt_token_ids})
            params = DisaggregatedParams(request_type="context_only", first_gen_tokens=[token],
                                         ctx_request_id=ctx_id, disagg_request_id=ctx_id,
                                         opaque_state=json.dumps({"endpoint": self.transceiver.endpoint}).encode())
        if finish:
            self._finish(r, [token], finish, params=params)
        else:
            r.output._push([token], None)

    def _finish(self, r: _Request, tokens, finish, error=None, params=None) -> None:
        with self.lock:
            self.requests.pop(r.output.request_id, None)
        r.output._push(tokens, finish, params, error)


class LLM:
    def __init__(self, *args, **kwargs):
        recorded = api()["LLM"]
        a = bind("LLM.__init__", recorded["__init__"], args, kwargs, extra=recorded["llm_args"])
        self.args = a
        world = (a["tensor_parallel_size"] or 1) * (a.get("pipeline_parallel_size") or 1)
        self._max_seq_len = a.get("max_seq_len")
        self._transceiver_config = a.get("cache_transceiver_config")
        self._conn = None
        self._end_id = _model.load(str(a["model"]))["eos_token_id"]  # the tokenizer's end id, as the real LLM
        if world > 1:
            if os.environ.get("TLLM_SPAWN_PROXY_PROCESS") != "1" or int(os.environ.get("tllm_mpi_size", 1)) != world:
                raise RuntimeError(f"Only {os.environ.get('tllm_mpi_size', 1)} MPI ranks are available, but "
                                   f"{world} are required (run under trtllm-llmapi-launch with {world} tasks)")
            self._conn = _mpi.connect()
            self._call(("load", str(a["model"])))
            forward = lambda contexts: self._call(("forward", contexts))[1]  # noqa: E731
        else:
            vocab = _model.load(str(a["model"]))["vocab_size"]
            forward = lambda contexts: _model.combine([_model.shard_best(contexts, 0, vocab)])  # noqa: E731
        self._engine = _Engine(forward, float(os.environ.get("TRTLLM_DOUBLE_STEP_MS", "2")) / 1000)
        self._engine.transceiver = _Transceiver(60.0)
        _say(f"loaded {a['model']} on {world} rank(s)")

    def _call(self, msg):
        self._conn.send(msg)  # one caller at a time: the load, then the step thread
        reply = self._conn.recv()
        if reply[0] == "error":
            raise RuntimeError(reply[1])
        return reply

    def generate_async(self, *args, **kwargs) -> RequestOutput:
        a = bind("LLM.generate_async", api()["LLM"]["generate_async"], args, kwargs)
        prompt, sampling, params = a["inputs"], a["sampling_params"] or SamplingParams(), a["disaggregated_params"]
        if isinstance(prompt, dict):
            prompt = self._expand_images(prompt)
        if not isinstance(prompt, list) or not all(isinstance(t, int) for t in prompt):
            raise TypeError("the double takes token ids (a list of int, or a dict with prompt_token_ids) as inputs")
        if self._max_seq_len and len(prompt) + sampling.max_tokens > self._max_seq_len:
            raise ValueError(f"The sum of prompt length ({len(prompt)}) and max_tokens ({sampling.max_tokens}) "
                             f"should not exceed max_seq_len ({self._max_seq_len})")
        if sampling.end_id is None:
            sampling.end_id = self._end_id
        kind = params.request_type if params and params.request_type else "context_and_generation"
        if kind != "context_and_generation" and self._transceiver_config is None:
            raise ValueError(f"a {kind} request needs cache_transceiver_config in the LLM arguments")
        out = RequestOutput(next(_ids), list(prompt), a["streaming"], self._engine)
        self._engine.add(_Request(out, list(prompt), sampling, kind, params))
        return out

    def _expand_images(self, inputs: dict) -> list[int]:
        """A multimodal prompt as the input processor makes it: each image token becomes the image's embeddings
        (here: context tokens the double's "model" derives from them)."""
        ids, images, embeddings = _multimodal_inputs(inputs)
        info = _model.vision(str(self.args["model"]))
        if images is None and embeddings is None:
            return ids
        if info is None:
            raise ValueError(f"{self.args['model']} is not a multimodal model; it takes no multi_modal_data")
        if images is not None:
            embeddings = [_model.encode_image(_pixels(im), info) for im in images]
        else:
            embeddings = [_checked_embedding(e, info) for e in embeddings]
        at = [i for i, t in enumerate(ids) if t == info["image_token_id"]]
        if len(at) != len(embeddings):
            raise ValueError(f"the prompt has {len(at)} image tokens for {len(embeddings)} images")
        vocab = _model.load(str(self.args["model"]))["vocab_size"]
        out, start = [], 0
        for pos, emb in zip(at, embeddings):
            out += ids[start:pos] + _model.image_context(emb, vocab)
            start = pos + 1
        return out + ids[start:]

    async def get_stats_async(self, timeout: float | None = 2):
        with self._engine.lock:
            running = len(self._engine.requests)
        yield {"numActiveRequests": running, "numQueuedRequests": 0,
               "kvCacheStats": {"maxNumBlocks": 1024, "freeNumBlocks": 1024 - running, "usedNumBlocks": running}}

    def shutdown(self) -> None:
        self._engine.stopping = True
        self._engine.transceiver.shutdown()
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# ---- multimodal ----------------------------------------------------------------------------------------------------
def _multimodal_inputs(inputs: dict):
    """prompt_token_ids and the images or embeddings of a dict prompt, with the recorded keys only."""
    recorded = api()["PromptInputs"]
    unknown = set(inputs) - set(recorded["keys"])
    if unknown:
        raise TypeError(f"the double refuses prompt keys TensorRT-LLM does not read: {sorted(unknown)}")
    if "prompt_token_ids" not in inputs:
        raise TypeError("the double takes prompt_token_ids, not text prompts")
    media = {}
    for key in ("multi_modal_data", "multi_modal_embeddings"):
        if inputs.get(key) is not None:
            extra = set(inputs[key]) - set(recorded["modalities"])
            if extra:
                raise ValueError(f"{key}: unsupported modalities {sorted(extra)}")
            media[key] = list(inputs[key].get("image") or [])
    if len(media) > 1:
        raise ValueError("multi_modal_data and multi_modal_embeddings in one prompt")
    return list(inputs["prompt_token_ids"]), media.get("multi_modal_data"), media.get("multi_modal_embeddings")


def _pixels(image):
    import numpy as np

    if not hasattr(image, "convert"):
        raise TypeError(f"multi_modal_data images are PIL images, not {type(image).__name__}")
    return np.asarray(image.convert("RGB"))


def _checked_embedding(tensor, info: dict):
    array = tensor.detach().float().cpu().numpy() if hasattr(tensor, "detach") else tensor
    if array.ndim != 2 or array.shape[1] != info["hidden_size"]:
        raise ValueError(f"multimodal embedding of shape {list(array.shape)}; expected [n, {info['hidden_size']}]")
    return array


class _EncoderOutput:
    """What MultimodalEncoder.generate_async returns: finished at once in the double."""

    def __init__(self, request_id: int, prompt_token_ids: list, params: DisaggregatedParams):
        self.request_id, self.prompt_token_ids, self.disaggregated_params = request_id, prompt_token_ids, params
        self.finished, self.outputs = True, []

    async def aresult(self) -> "_EncoderOutput":
        await asyncio.sleep(0)
        return self

    def abort(self) -> None:
        pass


class MultimodalEncoder:
    """The vision tower and projector only; each request's embeddings come back as one tensor handle."""

    def __init__(self, *args, **kwargs):
        recorded = api()
        a = bind("MultimodalEncoder.__init__", recorded["MultimodalEncoder"]["__init__"], args, kwargs,
                 extra=recorded["LLM"]["llm_args"])
        self.model = str(a["model"])
        _model.load(self.model)
        self.info = _model.vision(self.model)
        if self.info is None:
            raise ValueError(f"{self.model} has no vision encoder (config.json has no vision_config)")
        _say(f"multimodal encoder loaded {self.model}")

    def generate_async(self, *args, **kwargs) -> _EncoderOutput:
        import torch

        from tensorrt_llm._torch.shared_tensor import SharedTensorContainer

        a = bind("MultimodalEncoder.generate_async", api()["MultimodalEncoder"]["generate_async"], args, kwargs)
        ids, images, _ = _multimodal_inputs(a["inputs"])
        if not images:
            raise ValueError("MultimodalEncoder needs multi_modal_data images")
        rows = torch.from_numpy(np.concatenate([_model.encode_image(_pixels(im), self.info) for im in images]))
        handle = SharedTensorContainer.from_tensor(rows, local=True).dump_to_dict()
        params = DisaggregatedParams(multimodal_embedding_handles=[handle], multimodal_hashes=[[0] * 8] * len(images))
        return _EncoderOutput(next(_ids), ids, params)

    def shutdown(self) -> None:
        pass
