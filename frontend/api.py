"""OpenAI request bodies (the subset served) and error responses in OpenAI's format."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_STOP_CHARS = 256


class Unsupported(Exception):
    def __init__(self, option: str, why: str):
        super().__init__(f"{option}: {why}")
        self.option = option


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers


class StreamOptions(BaseModel):
    include_usage: bool = False
    # vLLM's extension: usage (completion tokens so far) on every chunk, so a client times tokens, not text.
    continuous_usage_stats: bool = False


class Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send extra fields; those we cannot honour are refused below

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    logprobs: Any = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences (got {len(stops)})")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence has at most {MAX_STOP_CHARS} characters")
        return stop

    def prompt_chars(self) -> int:
        """Characters of text the prompt holds, before any tokenization (token-id prompts: 0)."""
        raise NotImplementedError

    def check_supported(self) -> None:
        if self.n != 1:
            raise Unsupported("n", "only n=1 is supported")
        if self.logprobs not in (None, False, 0):
            raise Unsupported("logprobs", "log probabilities are not implemented")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise Unsupported(name, "penalties are not implemented")
        extra = self.model_extra  # fields the schema does not name: most requests have none
        if extra:
            for name in ("tools", "functions", "best_of", "suffix", "logit_bias", "top_logprobs", "echo"):
                if extra.get(name):
                    raise Unsupported(name, "not supported by this server")

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None

    def text(self, index: int = 0, image_token: str = "", images: list | None = None) -> str:
        """The message as text. With `images`, each image part becomes `image_token` in the text and its
        (where, url) is appended to `images`; without, image parts are refused (a text model)."""
        if not isinstance(self.content, list):
            return self.content or ""
        parts = []
        for i, part in enumerate(self.content):
            kind = part.get("type") if isinstance(part, dict) else None
            where = f"messages[{index}].content[{i}]"
            if kind == "text":
                parts.append(str(part.get("text", "")))
            elif kind == "image_url" and images is not None:
                spec = part.get("image_url")
                url = spec.get("url") if isinstance(spec, dict) else spec
                if not isinstance(url, str) or not url:
                    raise Unsupported(f"{where}.image_url.url", "expected a URL, a data: URL or a file path")
                images.append((where, url))
                parts.append(image_token)
            else:
                raise Unsupported(where, f"content part of type {kind!r} is not supported"
                                  + (" by this text model" if kind == "image_url" else ""))
        return "".join(parts)

    def has_images(self) -> bool:
        return isinstance(self.content, list) and any(isinstance(p, dict) and p.get("type") == "image_url"
                                                      for p in self.content)


class ChatRequest(Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def prompt_chars(self) -> int:
        return sum(len(m.content) if isinstance(m.content, str) else sum(len(str(part.get("text", "")))
                   for part in m.content or [] if isinstance(part, dict)) for m in self.messages)

    def check_supported(self) -> None:
        super().check_supported()
        fmt = (self.model_extra or {}).get("response_format")
        if fmt and fmt.get("type") not in (None, "text"):
            raise Unsupported("response_format", "only text output is supported")


class CompletionRequest(Common):
    prompt: str | list[int] | list[str]

    def prompt_chars(self) -> int:
        p = self.prompt
        if isinstance(p, str):
            return len(p)
        return sum(len(x) for x in p) if p and isinstance(p[0], str) else 0
