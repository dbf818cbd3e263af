"""Tokenizer, chat template and limits of a model, read from its Hugging Face directory."""

from __future__ import annotations

import json
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment


class PreprocessError(ValueError):
    """A request the model cannot take (too long, bad messages); answered with 400."""


class ModelFiles:
    def __init__(self, model_dir: str | Path):
        from tokenizers import Tokenizer

        d = Path(model_dir)
        self.tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
        tok_cfg = _read_json(d / "tokenizer_config.json")
        cfg = _read_json(d / "config.json")
        text_cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
        self.context_length = int(cfg.get("max_position_embeddings") or text_cfg.get("max_position_embeddings")
                                  or tok_cfg.get("model_max_length") or 4096)
        eos = cfg.get("eos_token_id", text_cfg.get("eos_token_id"))
        self.eos_token_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        self.bos_token = _token_text(tok_cfg.get("bos_token"))
        self.eos_token = _token_text(tok_cfg.get("eos_token"))
        template = tok_cfg.get("chat_template")
        if isinstance(template, list):  # several named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        self.vision = _vision_info(cfg, self.tokenizer)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self.chat_template = env.from_string(template) if template else None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def render_chat(self, messages: list[dict]) -> str:
        if self.chat_template is None:
            raise PreprocessError("this model has no chat template; use /v1/completions")
        return self.chat_template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos_token,
                                         eos_token=self.eos_token)

    def check_length(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens + max_tokens > self.context_length:
            raise PreprocessError(f"the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: "
                                  f"{prompt_tokens + max_tokens} exceeds the model's context length of "
                                  f"{self.context_length} tokens")

    def detokenizer(self) -> "Detokenizer":
        return Detokenizer(self.tokenizer)


class Detokenizer:
    """Turns a growing list of token ids into text deltas. Holds text back while it ends in an incomplete UTF-8
    sequence. The tokenizers library's DecodeStream does the per-token work in Rust, over a window of recent
    tokens (O(n) for a long answer); the ids are kept here only to flush the text held back at the end. Tokens
    that arrive together go to it in one call where the library takes a list (tokenizers 0.23 does): one call per
    delta, not per token."""

    takes_lists = True  # until a DecodeStream refuses a list

    def __init__(self, tokenizer):
        from tokenizers.decoders import DecodeStream

        self.tokenizer = tokenizer
        self.stream = DecodeStream(skip_special_tokens=True)
        self.ids: list[int] = []
        self.prefix_offset = 0  # where the ids of the last text sent begin: context for the flush
        self.read_offset = 0  # ids before this are sent as text

    def add(self, token_ids: list[int]) -> str:
        if len(token_ids) > 1 and Detokenizer.takes_lists:
            try:
                text = self.stream.step(self.tokenizer, token_ids)
            except TypeError:  # an older tokenizers: one id a call (nothing was taken)
                Detokenizer.takes_lists = False
            else:
                self.ids += token_ids
                if text is None:
                    return ""
                self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
                return text
        out = []
        for token_id in token_ids:
            self.ids.append(token_id)
            text = self.stream.step(self.tokenizer, token_id)
            if text is not None:
                out.append(text)
                self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return "".join(out)

    def flush(self) -> str:
        """At the end of the answer: the text held back, even if it ends in an incomplete sequence."""
        if self.read_offset == len(self.ids):
            return ""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):]


class StopStrings:
    """Finds stop strings in streamed text, holding back just enough text that a stop string split across
    deltas is never sent to the client."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to send now, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        cut = max(0, len(self.pending) - self.hold)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def _vision_info(cfg: dict, tokenizer):
    """A LLaVA-style config.json (vision_config + text_config): the image token and positions per image."""
    from frontend.media import VisionInfo

    v, text = cfg.get("vision_config"), cfg.get("text_config")
    if not isinstance(v, dict) or not isinstance(text, dict):
        return None
    token_id = cfg.get("image_token_index", cfg.get("image_token_id"))
    token = tokenizer.id_to_token(token_id) if token_id is not None else None
    if token is None:
        raise PreprocessError(f"config.json: image_token_index {token_id} is not in the tokenizer")
    patches = (v.get("image_size", 336) // v.get("patch_size", 14)) ** 2
    full = cfg.get("vision_feature_select_strategy", "default") == "full"
    return VisionInfo(token_id, token, patches + full, text.get("hidden_size", 4096))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def _token_text(tok) -> str:
    return tok.get("content", "") if isinstance(tok, dict) else (tok or "")


def _raise(message):
    raise PreprocessError(message)
