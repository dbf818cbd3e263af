"""Tiny random-weight Llama models with a real BPE tokenizer, made locally (no hub downloads) for tests and demos."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from engines.torch.loader import random_model
from engines.torch.model import LlamaConfig

CORPUS = """The quick brown fox jumps over the lazy dog. A prefill worker computes the prompt's KV cache and the
first token; the decode worker pulls that cache over the network and streams the remaining tokens to the client.
Slurm allocates nodes; srun starts steps on them. Every request has a deadline, and every process is stopped by
its PID. Hello, world! How are you today? I am fine, thank you. What is the capital of France? Paris is the
capital of France. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Tell me a story about a dragon who learned to code.
Once upon a time there was a small model that answered every question with random words."""

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SPECIAL = ["<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
IMAGE_TOKEN = "<image>"


def train_tokenizer(vocab_size: int, extra_special: tuple[str, ...] = ()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL + list(extra_special),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    return tok


def tiny_config(vocab_size: int, **overrides) -> dict:
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 256},
        "max_position_embeddings": 2048, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
        "torch_dtype": "float32",
    }
    cfg.update(overrides)
    return cfg


def make_tiny_model(out_dir: str | Path, seed: int = 0, vocab_size: int = 512, shards: int = 1,
                    **overrides) -> Path:
    """Write config.json, safetensors (sharded when shards > 1), tokenizer.json and tokenizer_config.json."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(vocab_size)
    tok.save(str(out / "tokenizer.json"))
    cfg_dict = tiny_config(tok.get_vocab_size(), **overrides)
    (out / "config.json").write_text(json.dumps(cfg_dict, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|bos|>", "eos_token": "<|eos|>", "chat_template": CHAT_TEMPLATE,
        "model_max_length": cfg_dict["max_position_embeddings"]}, indent=2))
    model = random_model(LlamaConfig.from_hf(cfg_dict), torch.device("cpu"), torch.float32, seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if shards <= 1:
        save_file(state, str(out / "model.safetensors"))
    else:
        names = sorted(state)
        weight_map = {}
        for i in range(shards):
            part = {n: state[n] for n in names[i::shards]}
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file(part, str(out / fname))
            weight_map.update({n: fname for n in part})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out


def tiny_vision_config(**overrides) -> dict:
    cfg = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "image_size": 56, "patch_size": 14, "num_channels": 3, "layer_norm_eps": 1e-5,
           "hidden_act": "quick_gelu", "projection_dim": 32}
    cfg.update(overrides)
    return cfg


def make_tiny_llava(out_dir: str | Path, seed: int = 0, vocab_size: int = 512) -> Path:
    """A LLaVA directory as transformers writes one (config.json with vision_config and text_config, one
    safetensors file with `language_model.*`, `vision_tower.vision_model.*`, `multi_modal_projector.*`): 56-pixel
    images of 16 patches, so 16 image tokens each."""
    from safetensors.torch import save_file

    from engines.torch.vision import LlavaConfig, LlavaVision

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(vocab_size, extra_special=(IMAGE_TOKEN,))
    tok.save(str(out / "tokenizer.json"))
    text = tiny_config(tok.get_vocab_size())
    cfg = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "text_config": text,
           "vision_config": tiny_vision_config(), "image_token_index": tok.token_to_id(IMAGE_TOKEN),
           "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
           "image_seq_length": 16, "eos_token_id": 1, "torch_dtype": "float32", "tie_word_embeddings": False}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|bos|>", "eos_token": "<|eos|>", "chat_template": CHAT_TEMPLATE,
        "model_max_length": text["max_position_embeddings"]}, indent=2))
    lm = random_model(LlamaConfig.from_hf(text), torch.device("cpu"), torch.float32, seed)
    vision = LlavaVision(LlavaConfig.from_hf(cfg))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in vision.named_parameters():
            p.normal_(0.0, 0.02 if "norm" not in name else 0.1, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)
    state = {f"language_model.{k}": v.contiguous() for k, v in lm.state_dict().items()}
    state.update({k.replace("vision.", "vision_tower.vision_model.", 1).replace("projector.", "multi_modal_projector.", 1):
                  v.contiguous() for k, v in vision.state_dict().items()})
    save_file(state, str(out / "model.safetensors"))
    return out


if __name__ == "__main__":
    import sys

    print(make_tiny_model(sys.argv[1] if len(sys.argv) > 1 else ".hpc/models/tiny-llama"))
