"""Builds the engine a worker wraps from the engine YAML (TensorRT-LLM field names)."""

from __future__ import annotations

from hpc.config import EngineConfig
from hpc.errors import HpcError


def build_engine(name: str, model_path: str, cfg: EngineConfig, random_weights: bool = False, tp=None,
                 role: str | None = None):
    if name == "torch" and role == "encode":  # the vision tower and projector only
        from engines.torch.encoder import TorchEncoder
        from engines.torch.engine import TorchEngineOptions

        return TorchEncoder(model_path, TorchEngineOptions(device=cfg.device, dtype=cfg.dtype,
                                                           random_weights=random_weights))
    if name == "torch":
        from engines.torch.engine import TorchEngine, TorchEngineOptions

        return TorchEngine(model_path, TorchEngineOptions(
            device=cfg.device, dtype=cfg.dtype, block_size=cfg.kv_cache_config.tokens_per_block,
            num_blocks=cfg.num_kv_blocks, free_gpu_memory_fraction=cfg.kv_cache_config.free_gpu_memory_fraction or 0.5,
            max_num_tokens=cfg.max_num_tokens, max_batch_size=cfg.max_batch_size,
            enable_chunked_prefill=cfg.enable_chunked_prefill, random_weights=random_weights,
            enable_block_reuse=cfg.kv_cache_config.enable_block_reuse is not False,
            cuda_graphs=cfg.cuda_graph_config is not None, overlap_decode=not cfg.disable_overlap_scheduler,
            graph_batch_sizes=tuple(sorted((cfg.cuda_graph_config.batch_sizes if cfg.cuda_graph_config else None)
                                           or (1, 2, 4, 8, 16, 32, 64)))), tp=tp)
    if name == "mocker":
        from engines.mocker import MockerEngine, MockerOptions

        t = cfg.mocker
        timing = t.model_dump() if t is not None else {}
        return MockerEngine(MockerOptions(**timing, block_size=cfg.kv_cache_config.tokens_per_block,
                                          num_blocks=cfg.num_kv_blocks or 4096, max_batch_size=cfg.max_batch_size,
                                          block_reuse=cfg.kv_cache_config.enable_block_reuse is not False))
    if name == "trtllm" and role == "encode":
        from engines.trtllm.encoder import TrtllmEncoder

        return TrtllmEncoder(model_path, cfg.model_dump(exclude_unset=True))
    if name == "trtllm":
        from engines.trtllm.engine import TrtllmEngine

        # Only what the YAML sets: TensorRT-LLM's own defaults stand for everything else.
        return TrtllmEngine(model_path, cfg.model_dump(exclude_unset=True))
    raise HpcError(f"unknown engine {name!r} (expected torch, mocker or trtllm)")
