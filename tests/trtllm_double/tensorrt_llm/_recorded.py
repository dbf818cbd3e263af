"""The double's contract: every call is checked against the TensorRT-LLM surface recorded in
engines/trtllm/recorded_api.yaml; a name the real API does not have is refused as TensorRT-LLM would refuse it."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml

RECORDED = Path(__file__).resolve().parents[3] / "engines" / "trtllm" / "recorded_api.yaml"


@lru_cache(maxsize=1)
def api() -> dict:
    return yaml.safe_load(RECORDED.read_text())


def bind(where: str, params: dict, args: tuple, kwargs: dict, extra: list[str] | None = None) -> dict:
    """Python's own binding rules against a recorded signature (`name: default`, `required`); `extra` lists the
    names **kwargs accepts. Returns every parameter's value."""
    names = list(params)
    if len(args) > len(names):
        raise TypeError(f"{where}() takes {len(names)} positional arguments but {len(args)} were given")
    bound = dict(zip(names, args))
    for key, value in kwargs.items():
        if key in bound:
            raise TypeError(f"{where}() got multiple values for argument {key!r}")
        if key not in params and (extra is None or key not in extra):
            raise TypeError(f"{where}() got an unexpected keyword argument {key!r}")
        bound[key] = value
    for key, default in params.items():
        if key not in bound:
            if default == "required":
                raise TypeError(f"{where}() missing required argument {key!r}")
            bound[key] = default
    return bound
