"""pagedinfer's engine: continuous batching on a paged KV cache.

`LLM` is imported lazily so that the pure-Python parts (scheduler, block
manager, requests) can be imported and tested without torch.
"""

from inference.outputs import CompletionOutput, Logprob, RequestOutput
from inference.sampling_params import SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "Logprob"]


def __getattr__(name: str):
    if name == "LLM":
        from inference.llm import LLM

        return LLM
    raise AttributeError(f"module 'inference' has no attribute {name!r}")
