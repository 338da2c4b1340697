"""Offline API: `LLM(...).generate(prompts, params)`."""

from __future__ import annotations

import itertools

from tqdm import tqdm

from inference.config import EngineConfig
from inference.core_protocol import KVSnapshot
from inference.engine import EngineStats, LLMEngine
from inference.lora.config import LoRAConfig, LoRARequest
from inference.outputs import RequestOutput
from inference.sampling_params import SamplingParams


class LLM:
    def __init__(
        self,
        model: str | None = None,
        dtype: str = "auto",
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_memory: int | None = None,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        enable_lora: bool = False,
        max_loras: int = 1,
        max_lora_rank: int = 16,
        max_cpu_loras: int | None = None,
        speculative_config: dict | None = None,
        **kwargs,
    ) -> None:
        """`speculative_config`: vLLM's dict, e.g. {"method": "ngram", "num_speculative_tokens": 4}."""
        if enable_lora:
            kwargs["lora"] = LoRAConfig.create(max_loras, max_lora_rank, max_cpu_loras)
        config = EngineConfig.create(
            model=model, dtype=dtype, block_size=block_size, num_kv_blocks=num_kv_blocks,
            kv_cache_memory=kv_cache_memory, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
            enable_prefix_caching=enable_prefix_caching, speculative_config=speculative_config, **kwargs,
        )
        self.engine = LLMEngine(config)
        self._ids = itertools.count()

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLM:
        llm = cls.__new__(cls)
        llm.engine = LLMEngine(config)
        llm._ids = itertools.count()
        return llm

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: list[str] | list[list[int]] | str,
        params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | list[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """`lora_request`: one adapter for every prompt, or one (or None) per prompt."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        loras = lora_request if isinstance(lora_request, list) else [lora_request] * len(prompts)
        if len(loras) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(loras)} LoRA requests")
        for lora in loras:
            if lora is not None and lora.lora_name not in self.engine.lora_names:
                self.engine.add_lora(lora.lora_name, lora.lora_path)
        # Validate everything before anything runs, so a bad prompt fails the call cleanly.
        request_ids = [str(next(self._ids)) for _ in prompts]
        added = []
        try:
            for request_id, prompt, p, lora in zip(request_ids, prompts, params, loras):
                self.engine.add_request(request_id, prompt, p, lora_name=lora.lora_name if lora else None)
                added.append(request_id)
        except ValueError:
            for request_id in added:
                self.engine.abort_request(request_id)
            while self.engine.has_unfinished_requests():
                self.engine.step()
            raise
        results: dict[str, RequestOutput] = {}
        with tqdm(total=len(prompts), desc="Generating", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        results[output.request_id] = output
                        bar.update(1)
        return [results[request_id] for request_id in request_ids]

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def kv_snapshot(self) -> KVSnapshot:
        """Every KV block's state; `inference.kv_snapshot.kv_snapshot_json` gives
        the JSON the server's /debug/kv answers with."""
        return self.engine.kv_snapshot()
    def shutdown(self) -> None:
        """Stop the tensor-parallel ranks, if any (they also exit with this process)."""
        self.engine.shutdown()
