"""The in-process engine: the core plus tokenizer and output processing.

    core.step()               schedule -> run -> update, token ids out
    outputs.process(...)      text, stop strings, logprobs -> RequestOutput
    core.abort_requests(...)  samples a stop string finished

Requests come in through `add_request` and leave through the outputs of
`step`; every finished request shows up exactly once with `finished=True`.
The offline `LLM` drives this; the server runs the same core in its own
process instead (`inference/async_engine.py`).
"""

from __future__ import annotations

import time

from transformers import AutoTokenizer

from inference.config import EngineConfig
from inference.core_protocol import AddRequest, EngineStats, KVSnapshot, check_request
from inference.engine_core import EngineCore, StepError
from inference.output_processor import OutputProcessor
from inference.outputs import RequestOutput
from inference.sampling_params import SamplingParams

__all__ = ["EngineStats", "LLMEngine", "StepError"]


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.core = EngineCore(config)
        # Tests reach in to count cached tokens or break the forward pass.
        self.scheduler = self.core.scheduler
        self.runner = self.core.runner
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.outputs = OutputProcessor(self.tokenizer)

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        arrival_time: float | None = None,
        cache_salt: str | None = None,
        lora_name: str | None = None,
    ) -> None:
        if request_id in self.outputs.states:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            prompt_text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            prompt_text, token_ids = None, list(prompt)
        check_request(token_ids, params, self.config, self.core.vocab_size)
        if lora_name is not None and lora_name not in self.lora_names:
            raise ValueError(f"The model `{lora_name}` does not exist.")
        if params.structured_outputs is not None:
            from inference.structured_output import check_structured_outputs  # xgrammar only when asked for

            check_structured_outputs(params.structured_outputs)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        self.outputs.add(request_id, prompt_text, token_ids, params, arrival)
        self.core.add_request(AddRequest(request_id, token_ids, params, arrival, priority, cache_salt, lora_name))

    @property
    def lora_names(self) -> list[str]:
        lora = self.core.runner.lora
        return [] if lora is None else list(lora.registered)

    def add_lora(self, name: str, path: str) -> int:
        return self.core.add_lora(name, path)

    def remove_lora(self, name: str) -> None:
        self.core.remove_lora(name)

    def abort_request(self, request_id: str) -> None:
        self.core.abort_requests(self.outputs.abort(request_id, time.monotonic()))

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests() or self.outputs.has_pending

    def step(self) -> list[RequestOutput]:
        try:
            step = self.core.step()
        except StepError as exc:
            for request_id in exc.request_ids:
                self.outputs.abort(request_id, time.monotonic())
            raise
        outputs, stopped = self.outputs.process(step)
        self.core.abort_requests(stopped)
        return outputs

    def stats(self) -> EngineStats:
        return self.core.stats()

    def kv_snapshot(self) -> KVSnapshot:
        return self.core.kv_snapshot()
    def shutdown(self) -> None:
        """Stop the tensor-parallel ranks, if any."""
        self.core.shutdown()
