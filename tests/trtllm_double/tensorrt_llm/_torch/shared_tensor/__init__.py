"""SharedTensorContainer of the double: the same-process form of TensorRT-LLM's tensor handles (its REBUILD_LOCAL
method: the double's encoder runs in the worker's process, where TensorRT-LLM's own runs in its executor process and
hands CUDA IPC handles over). The dict keys are those of the real container."""

from __future__ import annotations

import itertools
import os
import threading

REBUILD_LOCAL = 3
_store: dict[int, object] = {}
_lock = threading.Lock()
_tokens = itertools.count()


class SharedTensorContainer:
    def __init__(self, method_key: int, tensor_handle: dict):
        self.method_key, self.tensor_handle = method_key, tensor_handle

    @classmethod
    def from_tensor(cls, tensor, local: bool = False) -> "SharedTensorContainer":
        if not local:
            raise RuntimeError("the double shares tensors within its process only (local=True)")
        token = next(_tokens)
        with _lock:
            _store[token] = tensor
        return cls(REBUILD_LOCAL, {"local_token": token, "producer_pid": os.getpid()})

    @classmethod
    def from_dict(cls, tensor_info: dict) -> "SharedTensorContainer":
        if tensor_info["method_key"] != REBUILD_LOCAL:
            raise ValueError(f"Unsupported shared tensor method key: {tensor_info['method_key']}")
        return cls(REBUILD_LOCAL, {"local_token": tensor_info["local_token"],
                                   "producer_pid": tensor_info["producer_pid"]})

    def dump_to_dict(self) -> dict:
        return {"method_key": self.method_key, **self.tensor_handle}

    def get_local_view(self):
        if self.tensor_handle["producer_pid"] != os.getpid():
            raise RuntimeError("REBUILD_LOCAL handle crossed a process boundary")
        with _lock:
            tensor = _store.pop(self.tensor_handle["local_token"], None)
        if tensor is None:
            raise RuntimeError("REBUILD_LOCAL tensor missing from same-process registry.")
        return tensor
