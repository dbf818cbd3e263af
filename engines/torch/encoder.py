"""The encode role on the reference engine: the vision tower and projector only. No language model and no KV
pool, so an encode worker takes the memory of the vision part (about 0.6 GB for LLaVA-1.5's CLIP ViT-L), not of
the whole model."""

from __future__ import annotations

from pathlib import Path

import torch

from engines.base import EngineError, EngineStats
from engines.torch.engine import TorchEngineOptions, encode_with, pick_device
from engines.torch.loader import load_vision
from engines.torch.vision import ImageProcessing


class TorchEncoder:
    moves_own_kv = True  # no KV here at all
    layout = None

    def __init__(self, model_dir: str | Path, options: TorchEngineOptions | None = None):
        o = options or TorchEngineOptions()
        self.device = pick_device(o.device)
        self.vision = load_vision(model_dir, self.device, o.dtype, random_weights=o.random_weights, seed=o.seed)
        if self.vision is None:
            raise EngineError(f"{model_dir}: an encode worker needs a vision-language model (config.json has no "
                              f"vision_config)")
        self.image_processing = ImageProcessing.from_dir(Path(model_dir), self.vision.config)
        self.hidden_size = self.vision.config.text_hidden_size  # what the embeddings feed: the language model

    def encode_images(self, images: list[bytes], tokens: list[int] | None = None) -> list[torch.Tensor]:
        return encode_with(self.vision, self.image_processing, self.device, images)

    def start(self, loop) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def cancel(self, request_id: str) -> None:
        pass

    def stats(self) -> EngineStats:
        return EngineStats()

    def kv_pool(self):
        return None
