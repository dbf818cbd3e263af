"""A Llama-family decoder (Llama 2/3, Mistral, Qwen2): RMSNorm, RoPE with llama3 scaling, GQA, SwiGLU.

Parameter names follow Hugging Face's, so a safetensors checkpoint loads as it is. The forward pass takes a packed
batch of sequences (prefill chunks and decode tokens together) and reads/writes a paged KV pool laid out
[block, layer, K|V, token-in-block, kv-head, head-dim]: all layers of one block are adjacent, so the KV of a run of
blocks is one contiguous byte range for transfers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from engines.torch.fused import add_rms_norm, silu_mul
from engines.torch.paged_attention import paged_decode
from engines.torch.rotary import rope_and_store
from engines.torch.skinny import skinny_linear, usable as skinny_usable, warm_up as tune_skinny


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 has biases on q, k, v
    o_bias: bool = False
    mlp_bias: bool = False
    eos_token_ids: tuple[int, ...] = field(default=())
    torch_dtype: str | None = None

    SUPPORTED = ("llama", "mistral", "qwen2")

    @classmethod
    def from_hf(cls, d: dict) -> "LlamaConfig":
        model_type = d.get("model_type", "llama")
        if model_type not in cls.SUPPORTED:
            raise ValueError(f"config.json: model_type {model_type!r} is not supported "
                             f"(expected one of {', '.join(cls.SUPPORTED)})")
        heads = d["num_attention_heads"]
        eos = d.get("eos_token_id")
        attention_bias = bool(d.get("attention_bias", False))
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-5), rope_theta=d.get("rope_theta", 10000.0),
            rope_scaling=d.get("rope_scaling"), max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias, o_bias=attention_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            eos_token_ids=tuple(eos if isinstance(eos, list) else ([eos] if eos is not None else [])),
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
        )

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        return 2 * self.num_key_value_heads * self.head_dim


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind not in (None, "default"):
        raise ValueError(f"config.json: rope_scaling type {kind!r} is not supported (llama3, linear, default)")
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # one fused kernel; computes in float32 internally
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        dtype = x.dtype  # Hugging Face's order of operations, so CPU results match it to float32 rounding
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Linear(nn.Linear):
    """nn.Linear whose products of few rows (decode steps) go to skinny.py's kernel once `skinny` is set."""

    skinny = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.skinny and skinny_usable(x, self.weight):
            return skinny_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


@dataclass
class SeqBatch:
    """One sequence's part of a packed batch: `length` new tokens starting at packed index `start`, at positions
    `context_start ...`; its KV lives in `block_table` (block ids, long tensor on the model's device)."""

    start: int
    length: int
    context_start: int
    block_table: torch.Tensor


@dataclass
class DecodeBatch:
    """The sequences that each add one token after context already in the pool, attended to together: one gather
    and one attention call per layer however many there are (attention per sequence costs launches per sequence,
    which made a decode step of 16 sequences several times slower than one of 1)."""

    rows: torch.Tensor  # their packed token indices [B]
    block_table: torch.Tensor  # [B, W] block ids, padded
    mask: torch.Tensor  # [B, 1, 1, W * block_size], True within each sequence's context
    lengths: torch.Tensor | None = None  # [B] context lengths, the new token included
    paged: bool = False  # attend from the pool through the block table (paged_attention.py), not a gathered copy


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.h, self.kvh, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, self.h * self.hd, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.hidden_size, self.kvh * self.hd, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.hidden_size, self.kvh * self.hd, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.h * self.hd, cfg.hidden_size, bias=cfg.o_bias)
        self.qkv_proj: nn.Linear | None = None  # q, k and v in one matrix, once fuse_projections has run

    def forward(self, x, rope: tuple, layer: int, seqs: list[SeqBatch], pool: torch.Tensor, slot_block, slot_off,
                decode: DecodeBatch | None = None):
        """`rope`: ("table", cos, sin) of each token, or ("fused", positions, inv_freq) for rotary.py's kernel."""
        t = x.shape[0]
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split([self.h * self.hd, self.kvh * self.hd, self.kvh * self.hd], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = q.view(t, self.h, self.hd), k.view(t, self.kvh, self.hd), v.view(t, self.kvh, self.hd)
        if rope[0] == "fused":
            rope_and_store(q, k, v, rope[1], rope[2], pool, layer, slot_block, slot_off)
        else:
            _, cos, sin = rope
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            pool[slot_block, layer, 0, slot_off] = k
            pool[slot_block, layer, 1, slot_off] = v
        if decode is not None and not seqs and decode.rows.shape[0] == t:  # decode only: no scatter needed
            return self.o_proj(self._attend_decode(q, pool, layer, decode).reshape(t, self.h * self.hd))
        out = torch.empty_like(q)
        for s in seqs:
            sl = slice(s.start, s.start + s.length)
            qs = q[sl]
            if s.context_start == 0:  # the whole context is in this batch: attend to it directly
                ks, vs = k[sl], v[sl]
            else:
                ctx = s.context_start + s.length
                kv = pool[s.block_table, layer]  # [blocks, 2, block_size, kvh, hd]
                ks = kv[:, 0].reshape(-1, self.kvh, self.hd)[:ctx]
                vs = kv[:, 1].reshape(-1, self.kvh, self.hd)[:ctx]
            out[sl] = self._attend(qs, ks, vs, s)
        if decode is not None:
            out[decode.rows] = self._attend_decode(q[decode.rows], pool, layer, decode)
        return self.o_proj(out.reshape(t, self.h * self.hd))

    def _attend_decode(self, q, pool: torch.Tensor, layer: int, d: DecodeBatch) -> torch.Tensor:
        """q [B, H, hd], one token per sequence, against each one's context in the pool."""
        if d.paged:
            return paged_decode(q, pool, layer, d.block_table, d.lengths)
        b = q.shape[0]
        kv = pool[d.block_table, layer]  # [B, W, 2, block_size, kvh, hd]
        k = kv[:, :, 0].reshape(b, -1, self.kvh, self.hd).transpose(1, 2)
        v = kv[:, :, 1].reshape(b, -1, self.kvh, self.hd).transpose(1, 2)
        o = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=d.mask, enable_gqa=self.h != self.kvh)
        return o[:, :, 0]

    def _attend(self, q, k, v, s: SeqBatch) -> torch.Tensor:
        """q [n, H, hd] against k, v [ctx, KVH, hd]. Prefill expands the KV heads to H so SDPA can take its
        flash kernel (with enable_gqa it falls back to the O(n^2)-memory math kernel on GPUs)."""
        mask, causal = None, False
        if s.length > 1:
            if self.h != self.kvh:
                k = k.repeat_interleave(self.h // self.kvh, dim=1)
                v = v.repeat_interleave(self.h // self.kvh, dim=1)
            if s.context_start == 0:
                causal = True
            else:  # a later prefill chunk, or the rest after a cached prefix: causal, aligned to the end. As a
                # CausalBias rather than a mask tensor, SDPA can still take its flash kernel.
                mask = causal_lower_right(s.length, k.shape[0])
        # [1, heads, tokens, head_dim]: the flash and memory-efficient kernels take 4-D inputs only.
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=s.length == 1 and self.h != self.kvh)
        return o[0].transpose(0, 1)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.gate_up_proj: nn.Linear | None = None  # gate and up in one matrix, once fuse_projections has run

    def forward(self, x):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _fused(*linears: nn.Linear) -> nn.Linear:
    """One Linear whose output is the given ones' outputs side by side."""
    with torch.no_grad():
        w = torch.cat([lin.weight for lin in linears])
        fused = Linear(w.shape[1], w.shape[0], bias=linears[0].bias is not None, device="meta")
        fused.weight = nn.Parameter(w, requires_grad=False)
        if linears[0].bias is not None:
            fused.bias = nn.Parameter(torch.cat([lin.bias for lin in linears]), requires_grad=False)
    return fused


def fuse_projections(model: "LlamaForCausalLM") -> None:
    """q, k, v and gate, up as one matrix each: two matrix products a layer fewer, which at decode (a few rows per
    product) is time saved per launch and per pass over the weights. After tensor-parallel sharding, if any."""
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        a.qkv_proj = _fused(a.q_proj, a.k_proj, a.v_proj)
        m.gate_up_proj = _fused(m.gate_proj, m.up_proj)
        del a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.tp = None  # engines.torch.parallel.TensorParallel once sharded
        self.fused = False  # the Triton kernels of rotary.py and fused.py (GPUs with Triton; after fuse_projections)

    def use_fused_kernels(self, skinny: bool = False) -> None:
        self.inv_freq_f32 = self.inv_freq.float().contiguous()  # the values the PyTorch path uses
        self.fused = True
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        for module in linears:
            module.skinny = skinny
        if skinny:
            tune_skinny(linears)

    def kv_block_shape(self, block_size: int) -> tuple[int, ...]:
        """One block of this rank's KV heads (all of them without tensor parallelism)."""
        c = self.config
        return (c.num_hidden_layers, 2, block_size, self.model.layers[0].self_attn.kvh, c.head_dim)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, seqs: list[SeqBatch], pool: torch.Tensor,
                slot_block: torch.Tensor, slot_off: torch.Tensor, logits_index: torch.Tensor,
                decode: DecodeBatch | None = None,
                embeds: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Packed tokens in, logits (float32) out for the rows in `logits_index`. `seqs` are attended one by one,
        `decode` (one new token each) together. `embeds` = (packed rows, vectors): input embeddings that replace
        those rows' token embeddings (image embeddings at a multimodal prompt's image tokens)."""
        x = self.model.embed_tokens(input_ids)
        if embeds is not None:
            x[embeds[0]] = embeds[1].to(x.dtype)
        reduce = self.tp.all_reduce if self.tp is not None else (lambda t: t)
        layers = self.model.layers
        if self.fused and x.is_cuda:  # the Triton kernels: rotary.py, fused.py
            rope = ("fused", positions, self.inv_freq_f32)
            h = add_rms_norm(x, layers[0].input_layernorm.weight, layers[0].input_layernorm.eps)
            for i, layer in enumerate(layers):
                a = reduce(layer.self_attn(h, rope, i, seqs, pool, slot_block, slot_off, decode))
                norm = layer.post_attention_layernorm
                h = add_rms_norm(a, norm.weight, norm.eps, residual=x)  # x += a; h = norm(x)
                m = layer.mlp
                out = reduce(m.down_proj(silu_mul(m.gate_up_proj(h))))
                if i + 1 < len(layers):
                    norm = layers[i + 1].input_layernorm
                    h = add_rms_norm(out, norm.weight, norm.eps, residual=x)
                else:
                    x = x + out
        else:
            freqs = positions[:, None].float() * self.inv_freq.float()[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            rope = ("table", emb.cos().to(x.dtype)[:, None, :], emb.sin().to(x.dtype)[:, None, :])
            for i, layer in enumerate(layers):
                h = layer.input_layernorm(x)
                x = x + reduce(layer.self_attn(h, rope, i, seqs, pool, slot_block, slot_off, decode))
                x = x + reduce(layer.mlp(layer.post_attention_layernorm(x)))
        x = self.model.norm(x[logits_index])
        return self.lm_head(x).float()

    def flops_per_token(self) -> int:
        """Matmul FLOPs per token through the layers (not the LM head, which runs on sampled rows only, and not
        attention's context-dependent part, which callers add)."""
        c = self.config
        attn = c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim \
            + c.num_attention_heads * c.head_dim * c.hidden_size
        mlp = 3 * c.hidden_size * c.intermediate_size
        return 2 * c.num_hidden_layers * (attn + mlp)
