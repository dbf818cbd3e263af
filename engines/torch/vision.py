"""The vision half of a LLaVA-style model: a CLIP ViT tower, a two-layer projector into the language model's
embedding space, and the image preprocessing (resize, centre crop, normalise) of CLIP's image processor.

Parameter names follow Hugging Face's LLaVA checkpoints (`vision_tower.vision_model.*`, `multi_modal_projector.*`,
or the `model.`-prefixed names newer transformers write), mapped onto this module's `vision.*` / `projector.*`.
One tile per image: LLaVA-1.6's "anyres" tiling is not implemented, so a 1.6 checkpoint sees each image as one
base-resolution tile (the embeddings are right for that tile; they are not what 1.6 would compute)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class LlavaConfig:
    vision: VisionConfig
    text_hidden_size: int
    image_token_index: int
    vision_feature_layer: int = -2
    select_strategy: str = "default"  # "default" drops the CLS token, "full" keeps it
    projector_act: str = "gelu"
    projector_bias: bool = True

    @property
    def tokens_per_image(self) -> int:
        return self.vision.num_patches + (self.select_strategy == "full")

    @classmethod
    def from_hf(cls, d: dict) -> "LlavaConfig":
        v = d["vision_config"]
        layer = d.get("vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise ValueError(f"config.json: vision_feature_layer {layer!r}: only one layer is supported")
        strategy = d.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ValueError(f"config.json: vision_feature_select_strategy {strategy!r} (default or full)")
        return cls(
            VisionConfig(v.get("hidden_size", 1024), v.get("intermediate_size", 4096), v.get("num_hidden_layers", 24),
                         v.get("num_attention_heads", 16), v.get("image_size", 336), v.get("patch_size", 14),
                         v.get("num_channels", 3), v.get("layer_norm_eps", 1e-5), v.get("hidden_act", "quick_gelu")),
            text_hidden_size=d["text_config"]["hidden_size"],
            image_token_index=d.get("image_token_index", d.get("image_token_id", 32000)),
            vision_feature_layer=layer, select_strategy=strategy,
            projector_act=d.get("projector_hidden_act", "gelu"),
            projector_bias=d.get("multimodal_projector_bias", True))


def is_llava(config_json: dict) -> bool:
    return "vision_config" in config_json and "text_config" in config_json


def _act(name: str):
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "gelu":
        return F.gelu
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return lambda x: F.gelu(x, approximate="tanh")
    raise ValueError(f"config.json: activation {name!r} is not supported (quick_gelu, gelu, gelu_pytorch_tanh)")


class _Embeddings(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(c.hidden_size))
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, c.patch_size, bias=False)
        self.position_embedding = nn.Embedding(c.num_patches + 1, c.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(pixels.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight[None]


class _SelfAttention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.heads = c.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(c.hidden_size, c.hidden_size)
                                                                for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(o.transpose(1, 2).reshape(b, n, d))


class _Mlp(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)
        self.act = _act(c.hidden_act)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Layer(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = _SelfAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = _Mlp(c)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Encoder(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(_Layer(c) for _ in range(c.num_hidden_layers))


class ClipVision(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.embeddings = _Embeddings(c)
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)  # (sic: Hugging Face's name)
        self.encoder = _Encoder(c)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)  # unused by LLaVA; loaded

    def features(self, pixels: torch.Tensor, layer: int) -> torch.Tensor:
        """The hidden states after `layer` (Hugging Face's indexing: 0 is the embeddings, -1 the last layer)."""
        x = self.pre_layrnorm(self.embeddings(pixels))
        stop = layer % (len(self.encoder.layers) + 1)
        for block in self.encoder.layers[:stop]:
            x = block(x)
        return x


class Projector(nn.Module):
    def __init__(self, c: LlavaConfig):
        super().__init__()
        self.linear_1 = nn.Linear(c.vision.hidden_size, c.text_hidden_size, bias=c.projector_bias)
        self.linear_2 = nn.Linear(c.text_hidden_size, c.text_hidden_size, bias=c.projector_bias)
        self.act = _act(c.projector_act)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaVision(nn.Module):
    """Pixels [B, 3, H, W] -> image embeddings [B, tokens_per_image, text hidden size]."""

    def __init__(self, c: LlavaConfig):
        super().__init__()
        self.config = c
        self.vision = ClipVision(c.vision)
        self.projector = Projector(c)

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.vision.features(pixels, self.config.vision_feature_layer)
        if self.config.select_strategy == "default":
            x = x[:, 1:]
        return self.projector(x)


# Checkpoint names -> this module's, for the checkpoint layouts transformers has written over the years.
VISION_PREFIXES = {"vision_tower.vision_model.": "vision.", "model.vision_tower.vision_model.": "vision.",
                   "model.vision_tower.": "vision.", "vision_tower.": "vision.",
                   "multi_modal_projector.": "projector.", "model.multi_modal_projector.": "projector."}
TEXT_PREFIXES = {"language_model.model.": "model.", "language_model.lm_head.": "lm_head.",
                 "model.language_model.": "model."}


def rename(key: str, prefixes: dict[str, str]) -> str | None:
    for old, new in sorted(prefixes.items(), key=lambda kv: -len(kv[0])):  # the longest prefix first
        if key.startswith(old):
            return new + key[len(old):]
    return None


@dataclass(frozen=True)
class ImageProcessing:
    size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @classmethod
    def from_dir(cls, model_dir: Path, c: LlavaConfig) -> "ImageProcessing":
        """preprocessor_config.json when the directory has one, CLIP's defaults at the tower's size otherwise."""
        try:
            p = json.loads((Path(model_dir) / "preprocessor_config.json").read_text())
        except (OSError, ValueError):
            return cls(c.vision.image_size)
        return cls(c.vision.image_size, tuple(p.get("image_mean", CLIP_MEAN)), tuple(p.get("image_std", CLIP_STD)))

    def pixels(self, data: bytes) -> torch.Tensor:
        """Encoded image bytes -> [3, size, size] float32: shortest side resized to `size` (bicubic), centre
        crop, scaled to [0, 1], normalised."""
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = self.size / min(w, h)
            im = im.resize((max(self.size, round(w * scale)), max(self.size, round(h * scale))),
                           Image.Resampling.BICUBIC)
            w, h = im.size
            left, top = (w - self.size) // 2, (h - self.size) // 2
            im = im.crop((left, top, left + self.size, top + self.size))
            raw = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        x = raw.view(self.size, self.size, 3).permute(2, 0, 1).float() / 255.0
        return (x - torch.tensor(self.mean)[:, None, None]) / torch.tensor(self.std)[:, None, None]
