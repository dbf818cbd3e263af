"""The encode role on TensorRT-LLM: its MultimodalEncoder runs the model's vision tower and projector and nothing
else (no language model, no KV cache on this GPU).

Each image is one encoder request; its embeddings come back as a tensor handle (CUDA IPC, from TensorRT-LLM's
executor process on this node), which this process opens and copies once, into the worker's NIXL-registered
embedding stage. The prefill worker reads them from there, on any node, and gives them to its engine as
`multi_modal_embeddings`. (TensorRT-LLM's own encode -> prefill handoff passes the handles themselves, which only
works when both run on one node.)"""

from __future__ import annotations

import asyncio

from engines.base import EngineError, EngineStats
from engines.trtllm.args import llm_kwargs
from engines.trtllm.engine import one_line, pil_image, require_tensorrt_llm, vision_info

# LLM arguments that mean nothing without a language model: the encoder gets the rest of the engine YAML.
_LANGUAGE_ONLY = ("cache_transceiver_config", "kv_cache_config", "speculative_config", "cuda_graph_config")


class TrtllmEncoder:
    moves_own_kv = True  # no KV here at all
    counts_own_image_tokens = True  # the model decides how many embeddings an image makes, not the frontend
    layout = None

    def __init__(self, model_path: str, engine_yaml: dict):
        require_tensorrt_llm()
        self.model_path = model_path
        self.vision = vision_info(model_path)
        if self.vision is None:
            raise EngineError(f"{model_path}: an encode worker needs a vision-language model (config.json has no "
                              f"vision_config)")
        self.hidden_size = self.vision["hidden_size"]
        self.kwargs = {k: v for k, v in llm_kwargs(engine_yaml).items() if k not in _LANGUAGE_ONLY}
        self.encoder = None
        self.device = None
        self._encoded = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        import torch
        from tensorrt_llm import MultimodalEncoder

        try:
            self.encoder = MultimodalEncoder(model=self.model_path, **self.kwargs)
        except Exception as e:
            raise EngineError(f"TensorRT-LLM's MultimodalEncoder could not load {self.model_path}: "
                              f"{type(e).__name__}: {one_line(e)}") from None
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None

    def shutdown(self) -> None:
        if self.encoder is not None:
            self.encoder.shutdown()
            self.encoder = None

    async def encode_images_async(self, images: list[bytes], tokens: list[int] | None = None) -> list:
        """Each image's embeddings [n, hidden], n as the model makes them. Images go to TensorRT-LLM together, so
        it batches them."""
        pending = [self.encoder.generate_async({"prompt_token_ids": [self.vision["image_token_id"]],
                                                "multi_modal_data": {"image": [pil_image(data)]}})
                   for data in images]
        try:
            outputs = await asyncio.gather(*(p.aresult() for p in pending))
        except Exception as e:
            raise RuntimeError(f"TensorRT-LLM's encoder failed: {type(e).__name__}: {one_line(e)}") from None
        self._encoded += len(images)
        return [self._embeddings(out) for out in outputs]

    def _embeddings(self, out):
        from tensorrt_llm._torch.shared_tensor import SharedTensorContainer

        params = getattr(out, "disaggregated_params", None)
        handles = getattr(params, "multimodal_embedding_handles", None)
        if not handles or len(handles) != 1:
            raise RuntimeError(f"TensorRT-LLM's encoder returned {len(handles or [])} embedding handles for one "
                               f"image (expected 1)")
        # Open the handle once and copy: the copy is ours, and the encoder's memory goes back to it when the view
        # is dropped (a handle must be opened exactly once for TensorRT-LLM's reference count to reach zero).
        view = SharedTensorContainer.from_dict(handles[0]).get_local_view()
        embeddings = view.reshape(-1, view.shape[-1]).clone()
        del view
        if embeddings.shape[1] != self.hidden_size:
            raise RuntimeError(f"the encoder's embeddings have hidden size {embeddings.shape[1]}; the model's is "
                               f"{self.hidden_size}")
        return embeddings

    def stats(self) -> EngineStats:
        return EngineStats()

    def kv_pool(self):
        return None

    def cancel(self, request_id: str) -> None:
        """An encode request is short and its embeddings are freed by the worker; nothing to abort here."""
