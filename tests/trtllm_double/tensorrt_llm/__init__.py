"""A test double of the TensorRT-LLM surface hpc calls (tests only; the real package cannot be installed on these
machines). Every call is checked against engines/trtllm/recorded_api.yaml."""

from tensorrt_llm._llm import LLM, MultimodalEncoder, SamplingParams

__version__ = "double"
__all__ = ["LLM", "MultimodalEncoder", "SamplingParams"]
