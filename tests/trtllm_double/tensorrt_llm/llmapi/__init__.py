from tensorrt_llm._llm import LLM, CompletionOutput, DisaggregatedParams, RequestOutput, SamplingParams

__all__ = ["LLM", "SamplingParams", "DisaggregatedParams", "RequestOutput", "CompletionOutput"]
