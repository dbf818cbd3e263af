"""Engine YAML -> TensorRT-LLM LLM arguments, checked against the LLM-API names recorded in recorded_api.yaml."""

from __future__ import annotations

import difflib
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

RECORDED = Path(__file__).with_name("recorded_api.yaml")

# Engine-YAML keys only the reference engine and the mocker read; TensorRT-LLM never sees them.
HPC_ONLY_KEYS = ("device", "num_kv_blocks", "mocker")


@lru_cache(maxsize=1)
def recorded() -> dict:
    return yaml.safe_load(RECORDED.read_text())


def accepted_keys(section: str) -> list[str]:
    """The keys TensorRT-LLM accepts in one part of the engine YAML: "" for the top level (LLM arguments), or a
    nested section such as "kv_cache_config"."""
    api = recorded()
    if section == "":
        init = [k for k in api["LLM"]["__init__"] if k != "model"]
        return init + api["LLM"]["llm_args"]
    names = {"kv_cache_config": "KvCacheConfig", "cache_transceiver_config": "CacheTransceiverConfig",
             "cuda_graph_config": "CudaGraphConfig"}
    return list(api[names[section]]) if section in names else []


def closest(key: str, candidates: list[str]) -> str | None:
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return match[0] if match else None


def llm_kwargs(engine_yaml: dict[str, Any]) -> dict[str, Any]:
    """The LLM(...) keyword arguments of an engine YAML: what the user wrote, less the keys only hpc's other
    engines read. `backend: pytorch` is the LLM class itself, not an argument."""
    kwargs = {k: v for k, v in engine_yaml.items() if k not in HPC_ONLY_KEYS}
    if kwargs.get("backend") in (None, "pytorch"):
        kwargs.pop("backend", None)
    return kwargs
