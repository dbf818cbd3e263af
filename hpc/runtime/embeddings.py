"""Reading a precomputed embedding file without running code: shared by the frontend, which checks a request's
files, and the workers, which load them."""

from __future__ import annotations

from pathlib import Path


class EmbeddingFileError(ValueError):
    """The file is not embeddings this model can take; the message says why."""


def read_embedding(path: Path, hidden_size: int):
    """The file's embeddings as a float tensor [n, hidden] (and the dict's other keys). No code runs: safetensors,
    or torch.load with weights_only. Shared by the frontend (checks) and the workers (loads)."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # an UnpicklingError for anything that would run code
        raise EmbeddingFileError(f"not a plain tensor file ({type(e).__name__}: {str(e)[:200]})") from None
    extra = {}
    if isinstance(obj, dict):
        if "mm_embeddings" not in obj:
            raise EmbeddingFileError(f"a dict of embeddings needs the key mm_embeddings (has: "
                                  f"{', '.join(map(str, obj)) or 'none'})")
        extra = {k: v for k, v in obj.items() if k != "mm_embeddings"}
        obj = obj["mm_embeddings"]
    if not isinstance(obj, torch.Tensor):
        raise EmbeddingFileError(f"holds a {type(obj).__name__}, not a tensor")
    if obj.dim() == 3 and obj.shape[0] == 1:
        obj = obj[0]
    if obj.dim() != 2 or obj.shape[0] == 0:
        raise EmbeddingFileError(f"a tensor of shape {list(obj.shape)}; expected [1, n, hidden] or [n, hidden]")
    if obj.shape[1] != hidden_size:
        raise EmbeddingFileError(f"hidden size {obj.shape[1]}; the model's is {hidden_size}")
    if not obj.is_floating_point():
        raise EmbeddingFileError(f"a tensor of {obj.dtype}; expected floating point")
    return obj, extra
