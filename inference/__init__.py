"""pagedinfer's engine: continuous batching on a paged KV cache."""

from inference.llm import LLM
from inference.outputs import CompletionOutput, Logprob, RequestOutput
from inference.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
