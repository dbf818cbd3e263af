"""Loading a Llama-family model from a local Hugging Face directory, or random weights from a config."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from engines.base import EngineError
from engines.torch.model import LlamaConfig, LlamaForCausalLM, rope_inv_freq

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_config(model_dir: Path) -> LlamaConfig:
    path = Path(model_dir) / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise EngineError(f"{path}: not found (expected a Hugging Face model directory)") from None
    except ValueError as e:
        raise EngineError(f"{path}: invalid JSON: {e}") from None
    try:
        return LlamaConfig.from_hf(data)
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


def load_model(model_dir: str | Path, device: torch.device, dtype: str = "auto") -> LlamaForCausalLM:
    """The model in `model_dir` (config.json + safetensors, sharded or not) on `device`."""
    from safetensors.torch import load_file

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
    state = {}
    for f in files:
        if not f.exists():
            raise EngineError(f"{f}: weight shard listed in the index is missing")
        state.update(load_file(str(f), device=str(device)))
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
