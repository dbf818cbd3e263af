"""Loading a Llama-family model from a local Hugging Face directory, or random weights from a config. A LLaVA
directory (config.json with `vision_config` and `text_config`) gives its language model here and its vision tower
and projector through `load_vision`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from engines.base import EngineError
from engines.torch.model import LlamaConfig, LlamaForCausalLM, rope_inv_freq
from engines.torch.vision import TEXT_PREFIXES, VISION_PREFIXES, LlavaConfig, LlavaVision, is_llava, rename

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _config_json(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise EngineError(f"{path}: not found (expected a Hugging Face model directory)") from None
    except ValueError as e:
        raise EngineError(f"{path}: invalid JSON: {e}") from None


def read_config(model_dir: Path) -> LlamaConfig:
    """The language model's config (a LLaVA directory's `text_config`)."""
    path = Path(model_dir) / "config.json"
    data = _config_json(model_dir)
    if is_llava(data):
        text = dict(data["text_config"])
        text.setdefault("eos_token_id", data.get("eos_token_id"))
        text.setdefault("torch_dtype", data.get("torch_dtype") or data.get("dtype"))
        data = text
    return _parse(LlamaConfig.from_hf, data, path)


def _parse(parse, data: dict, path: Path):
    """A config class from config.json's dict; a missing field or a bad value names the file."""
    try:
        return parse(data)
    except KeyError as e:
        raise EngineError(f"{path}: field {e.args[0]} is missing") from None
    except ValueError as e:
        raise EngineError(str(e)) from None


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return DTYPES[name]


def random_model(cfg: LlamaConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LlamaForCausalLM:
    """Random weights (normal, std 0.02 as in HF's init) built directly on the device."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype.is_floating_point else torch.float32)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied weights appear once
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise EngineError(f"{index}: not a safetensors index ({e})") from None
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    raise EngineError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def read_llava(model_dir: str | Path) -> LlavaConfig | None:
    """The vision side's config of a LLaVA directory; None for a text-only model."""
    data = _config_json(Path(model_dir))
    if not is_llava(data):
        return None
    return _parse(LlavaConfig.from_hf, data, Path(model_dir) / "config.json")


def _read_weights(files: list[Path], prefixes: dict[str, str] | None, device: torch.device) -> dict:
    """The tensors whose names map through `prefixes` (None: every tensor, names as they are), read one by one."""
    from safetensors import safe_open

    state = {}
    for f in files:
        if not f.exists():
            raise EngineError(f"{f}: weight shard listed in the index is missing")
        with safe_open(str(f), framework="pt", device=str(device)) as st:
            for key in st.keys():
                name = key if prefixes is None else rename(key, prefixes)
                if name is not None:
                    state[name] = st.get_tensor(key)
    return state


def load_vision(model_dir: str | Path, device: torch.device, dtype: str = "auto",
                random_weights: bool = False, seed: int = 0) -> LlavaVision | None:
    """The vision tower and projector of a LLaVA directory on `device` (None for a text-only model)."""
    model_dir = Path(model_dir)
    cfg = read_llava(model_dir)
    if cfg is None:
        return None
    tdtype = resolve_dtype(dtype, device)
    with torch.device("meta" if not random_weights else device):
        vision = LlavaVision(cfg)
    if random_weights:
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, p in vision.named_parameters():
                if "norm" in name or name.endswith(".bias"):
                    p.fill_(1.0 if name.endswith("weight") else 0.0)
                else:
                    p.normal_(0.0, 0.02, generator=gen)
        return vision.to(tdtype).eval()
    state = {k: v.to(tdtype) for k, v in _read_weights(weight_files(model_dir), VISION_PREFIXES, device).items()}
    expected = set(vision.state_dict())
    missing, unexpected = expected - state.keys(), state.keys() - expected - {"vision.embeddings.position_ids"}
    if missing or unexpected:
        raise EngineError(f"{model_dir}: vision weights do not match config.json: missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}")
    state.pop("vision.embeddings.position_ids", None)
    vision.load_state_dict(state, strict=True, assign=True)
    return vision.eval()


def load_model(model_dir: str | Path, device: torch.device, dtype: str = "auto") -> LlamaForCausalLM:
    """The model in `model_dir` (config.json + safetensors, sharded or not) on `device`: a LLaVA directory's
    language model."""
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    files = weight_files(model_dir)
    tdtype = resolve_dtype(dtype, device)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(tdtype)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    state = _read_weights(files, TEXT_PREFIXES if read_llava(model_dir) else None, device)
    state = {k: v.to(tdtype) for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = {k for k in model.state_dict() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise EngineError(f"{model_dir}: weights do not match config.json: missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(cfg).to(device)  # a buffer, built on the meta device above
    return model.eval()
