"""The Engine protocol on TensorRT-LLM's LLM API (PyTorch backend).

- aggregated: one streaming `generate_async`;
- prefill: a context-only request (max_tokens 1) whose output carries the first token and TensorRT-LLM's
  DisaggregatedParams; those go to the decode worker as opaque bytes (`handoff`);
- decode: a generation-only request built from the handoff; TensorRT-LLM's cache transceiver pulls the KV from the
  prefill engine itself (NIXL or UCX, `cache_transceiver_config.backend`), so hpc moves no KV for this engine.
- images: TensorRT-LLM's input processor expands each image token to the model's own number of embeddings (which
  the frontend's count need not match), so each image's positions go back to one image token. Raw images go in as
  `multi_modal_data` (the engine runs its vision tower: aggregated, EP/D); embeddings from an encode worker or a file
  as `multi_modal_embeddings` (E/P/D). The decode worker gets the prefill's expanded prompt in the handoff.

Under `trtllm-llmapi-launch` this process is rank 0; the LLM object drives the other MPI ranks through
TensorRT-LLM's own proxy, so nothing here knows about them."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import msgspec

from engines.base import EngineError, EngineRequest, EngineStats, PrefillOutput, SamplingParams, TokenOutput
from engines.trtllm.args import llm_kwargs

log = logging.getLogger("engines.trtllm")

# Fields of DisaggregatedParams that never travel: the request type is set per phase; hpc asks for neither log
# probabilities nor logits (they hold tensors and Logprob objects, not plain data); the multimodal handles are CUDA
# IPC handles, valid on their own node only, and the decode side needs the KV, not the images.
_LOCAL_FIELDS = ("request_type", "first_gen_log_probs", "first_gen_logits", "multimodal_embedding_handles",
                 "multimodal_hashes", "mrope_position_ids_handle", "mrope_position_deltas_handle")
_FINISH = {"stop": "stop", "length": "length", "cancelled": "cancelled"}


@dataclass
class _Active:
    result: object  # TensorRT-LLM's RequestOutput
    generation_only: bool
    first_seen: bool = False
    abort_wanted: bool = False
    aborted: bool = False


class TrtllmEngine:
    moves_own_kv = True  # TensorRT-LLM's cache transceiver moves the KV; the worker's transfer layer stays out
    takes_raw_images = True  # its input processor and vision tower take the images themselves
    layout = None

    def __init__(self, model_path: str, engine_yaml: dict):
        require_tensorrt_llm()
        self.model_path = model_path
        self.kwargs = llm_kwargs(engine_yaml)
        self.vision = vision_info(model_path)
        self.hidden_size = self.vision["hidden_size"] if self.vision else 0
        self.llm = None
        self._active: dict[str, _Active] = {}
        self._iteration: dict = {}
        self._prompt_tokens = self._generated_tokens = 0
        self._poller: asyncio.Task | None = None
        self._aborting: set[asyncio.Task] = set()

    # ---- life cycle ------------------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        from tensorrt_llm import LLM

        try:
            self.llm = LLM(model=self.model_path, **self.kwargs)
        except Exception as e:  # any rank's load failure surfaces here, as TensorRT-LLM raises it
            raise EngineError(f"TensorRT-LLM could not load {self.model_path}: {type(e).__name__}: "
                              f"{one_line(e)}") from None
        self._poller = loop.create_task(self._poll_stats())

    def shutdown(self) -> None:
        if self._poller:
            self._poller.cancel()
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None

    # ---- requests --------------------------------------------------------------------------------------------
    def _sampling(self, s: SamplingParams, max_tokens: int | None = None):
        from tensorrt_llm import SamplingParams as TrtSampling

        return TrtSampling(max_tokens=max_tokens or s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                           top_k=s.top_k or None, seed=s.seed, stop_token_ids=list(s.stop_token_ids) or None,
                           ignore_eos=s.ignore_eos, detokenize=False)  # the frontend detokenizes

    def _inputs(self, req: EngineRequest):
        """The prompt as TensorRT-LLM takes it: token ids, or with images a dict in which each image holds one
        image token (TensorRT-LLM expands it)."""
        if not req.images:
            return req.prompt
        if self.vision is None:
            raise EngineError(f"{self.model_path} takes no images (its config.json has no vision_config)")
        ids, start = [], 0
        for im in sorted(req.images, key=lambda i: i.offset):
            ids += req.prompt[start:im.offset + 1]
            start = im.offset + (im.num_tokens or im.length)  # the frontend's positions, not the model's count
        ids += req.prompt[start:]
        if all(im.data is not None for im in req.images):
            return {"prompt_token_ids": ids, "multi_modal_data": {"image": [pil_image(im.data) for im in req.images]}}
        return {"prompt_token_ids": ids, "multi_modal_embeddings": {"image": [im.embeddings for im in req.images]}}

    def _submit(self, req: EngineRequest, sampling, streaming: bool, params=None, generation_only=False,
                inputs=None) -> _Active:
        try:
            result = self.llm.generate_async(inputs if inputs is not None else self._inputs(req),
                                             sampling_params=sampling, streaming=streaming,
                                             disaggregated_params=params)
        except (ValueError, TypeError) as e:  # TensorRT-LLM checks a request (length, parameters) on submit
            raise EngineError(one_line(e)) from None
        active = self._active[req.request_id] = _Active(result, generation_only)
        self._prompt_tokens += len(req.prompt) if not generation_only else 0
        return active

    async def _follow(self, rid: str, active: _Active, skip: int = 0) -> AsyncIterator[TokenOutput]:
        """New tokens of a streaming request as they come; `skip` drops tokens the prefill already returned. A
        consumer that leaves early aborts the request."""
        sent, finished = skip, False
        try:
            async for out in active.result:
                active.first_seen = True
                if active.abort_wanted:
                    self._abort(active)
                c = out.outputs[0]
                new, sent = list(c.token_ids[sent:]), max(sent, len(c.token_ids))
                reason = c.finish_reason
                if reason is None and out.finished:
                    reason = "stop"
                self._generated_tokens += len(new)
                if reason == "timeout":
                    finished = True
                    yield TokenOutput(new, "error", "TensorRT-LLM timed the request out")
                    return
                if new or reason:
                    finished = reason is not None
                    yield TokenOutput(new, _FINISH.get(reason, reason) if reason else None)
                if finished:
                    return
        except Exception as e:  # an engine failure mid-stream (e.g. out of memory) ends this request clearly
            finished = True
            yield TokenOutput([], "error", f"TensorRT-LLM: {type(e).__name__}: {one_line(e)}")
        finally:
            self._active.pop(rid, None)
            if not finished:
                self._abort_when_safe(active)

    def generate(self, req: EngineRequest) -> AsyncIterator[TokenOutput]:
        return self._follow(req.request_id, self._submit(req, self._sampling(req.sampling), streaming=True))

    async def prefill(self, req: EngineRequest) -> PrefillOutput:
        from tensorrt_llm.llmapi import DisaggregatedParams

        active = self._submit(req, self._sampling(req.sampling, max_tokens=1), streaming=False,
                              params=DisaggregatedParams(request_type="context_only"))
        try:
            out = await active.result.aresult()
        except asyncio.CancelledError:
            self._abort(active)
            raise
        except Exception as e:
            raise RuntimeError(f"TensorRT-LLM prefill failed: {type(e).__name__}: {one_line(e)}") from None
        finally:
            self._active.pop(req.request_id, None)
        c = out.outputs[0]
        if not c.token_ids:
            raise RuntimeError(f"TensorRT-LLM prefill ended without a token (finish reason {c.finish_reason})")
        first = c.token_ids[0]
        self._generated_tokens += 1
        # TensorRT-LLM says "stop" when the first token ends the request (end id or a stop token); "length" only
        # means the context-only request's max_tokens of 1.
        finish = "stop" if c.finish_reason == "stop" else "length" if req.sampling.max_tokens <= 1 else None
        # With images the context is TensorRT-LLM's expanded prompt; the decode side must submit the same tokens.
        expanded = list(out.prompt_token_ids) if req.images else None
        handoff = None if finish else encode_handoff(c.disaggregated_params, expanded)
        return PrefillOutput(first, finish, [], len(req.prompt), handoff=handoff)

    def decode_handoff(self, req: EngineRequest, handoff: bytes) -> AsyncIterator[TokenOutput]:
        """Continue a request that a peer prefilled: TensorRT-LLM fetches the KV named in the handoff."""
        params, prompt = decode_handoff(handoff)
        active = self._submit(req, self._sampling(req.sampling), streaming=True, params=params,
                              generation_only=True, inputs=prompt or req.prompt)
        # A generation-only request's output begins with the tokens the prefill already returned.
        return self._follow(req.request_id, active, skip=len(params.first_gen_tokens or []))

    def cancel(self, request_id: str) -> None:
        """While a consumer reads the request, a generation-only one is aborted at its next output (`_follow`);
        anything else at once. A consumer that leaves early ends the request through `_abort_when_safe`."""
        active = self._active.get(request_id)
        if active is None:
            return
        if active.generation_only and not active.first_seen:
            active.abort_wanted = True
        else:
            self._abort(active)

    def _abort_when_safe(self, active: _Active) -> None:
        """TensorRT-LLM cannot abort a generation-only request while its KV is still arriving (NVIDIA's own Dynamo
        worker avoids it too): with no consumer left, read it up to its first output, then abort."""
        if not active.generation_only or active.first_seen:
            self._abort(active)
            return

        async def at_first_output():
            try:
                await asyncio.wait_for(anext(active.result, None), 60)
            except Exception:  # an engine error or the deadline: the abort below is all that is left to do
                pass
            self._abort(active)

        task = asyncio.get_running_loop().create_task(at_first_output())
        self._aborting.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._aborting.discard)

    def _abort(self, active: _Active) -> None:
        if not active.aborted:
            active.aborted = True
            active.result.abort()
            log.info("request %s aborted", getattr(active.result, "request_id", "?"))

    # ---- what the worker's interface needs but this engine does not use ------------------------------------
    def kv_pool(self):
        return None

    def allocate(self, request_id: str, num_tokens: int, max_new_tokens: int) -> list[int]:
        raise EngineError("TensorRT-LLM allocates its own KV blocks")

    def decode(self, req, first_token, block_ids, num_tokens):
        raise EngineError("TensorRT-LLM decodes from a handoff (decode_handoff), not from hpc's KV blocks")

    def release(self, request_id: str) -> bool:
        return False

    # ---- stats -----------------------------------------------------------------------------------------------
    async def _poll_stats(self) -> None:
        """TensorRT-LLM's iteration stats (queue, running, KV blocks), about once a second."""
        while True:
            try:
                async for stat in self.llm.get_stats_async(timeout=2):
                    self._iteration = stat
            except asyncio.CancelledError:
                raise
            except Exception as e:  # stats are best effort; serving goes on without them
                log.debug("iteration stats unavailable: %s", e)
            await asyncio.sleep(1.0)

    def stats(self) -> EngineStats:
        it = self._iteration
        kv = it.get("kvCacheStats", {})
        return EngineStats(waiting=it.get("numQueuedRequests", 0),
                           running=it.get("numActiveRequests", len(self._active)),
                           kv_blocks_total=kv.get("maxNumBlocks", 0), kv_blocks_free=kv.get("freeNumBlocks", 0),
                           prompt_tokens=self._prompt_tokens, generated_tokens=self._generated_tokens)


def encode_handoff(params, prompt: list[int] | None = None) -> bytes:
    """TensorRT-LLM's DisaggregatedParams of a context-only request (and, for a multimodal prompt, the expanded
    prompt it ran), as bytes for the protocol."""
    if params is None:
        raise RuntimeError("TensorRT-LLM returned no disaggregated params for a context-only request (is "
                           "cache_transceiver_config set in the prefill engine YAML?)")
    fields = {f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.name not in _LOCAL_FIELDS}
    return msgspec.msgpack.encode({"params": {k: v for k, v in fields.items() if v is not None}, "prompt": prompt})


def decode_handoff(data: bytes):
    """(DisaggregatedParams for the generation-only request, the prompt to submit or None for the request's own)."""
    from tensorrt_llm.llmapi import DisaggregatedParams

    try:
        handoff = msgspec.msgpack.decode(data)
        return DisaggregatedParams(request_type="generation_only", **handoff["params"]), handoff.get("prompt")
    except (msgspec.DecodeError, TypeError, ValueError, KeyError) as e:
        raise EngineError(f"the prefill worker's disaggregated params do not fit this TensorRT-LLM: {e}") from None


def require_tensorrt_llm() -> None:
    try:
        import tensorrt_llm  # noqa: F401
    except ImportError as e:
        raise EngineError(f"engine trtllm: TensorRT-LLM is not importable here ({e}); it runs in NVIDIA's "
                          f"TensorRT-LLM container (see docs/trtllm.md)") from None


def vision_info(model_path: str) -> dict | None:
    """A vision-language checkpoint's image token and hidden size (config.json), None for a text-only model."""
    try:
        cfg = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None  # TensorRT-LLM reports a bad model directory when it loads
    if not cfg.get("vision_config"):
        return None
    text = cfg.get("text_config") or {}
    token = cfg.get("image_token_index", cfg.get("image_token_id"))
    return {"image_token_id": token, "hidden_size": int(text.get("hidden_size", cfg.get("hidden_size", 0)))}


def pil_image(data: bytes):
    """An encoded image (checked by the frontend) as the PIL image TensorRT-LLM's input processors take."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__
