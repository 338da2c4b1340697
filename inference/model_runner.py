"""Model runner: turns a SchedulerOutput into one forward pass and samples.

It owns the model weights, the KV cache tensors and the sampler; it reads
the scheduler's output (requests are never mutated here) and returns the
sampled token ids. Per step it builds `input_ids`, `positions`,
`slot_mapping`, `block_tables`, `seq_lens` and `query_start_loc` once, and
runs the LM head only on the rows that sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from inference.attention import AttentionMetadata
from inference.config import EngineConfig
from inference.models import load_model
from inference.sampler import LogprobEntry, Sampler, SamplerOutput, SamplingRow, gather_logprobs
from inference.request import Request
from inference.scheduler import SchedulerOutput

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(slots=True)
class RunnerOutput:
    request_ids: list[str]  # the requests that sampled, in batch order
    sampled: SamplerOutput
    # request id -> (first prompt position predicted, entries) for requests
    # that asked for prompt logprobs and computed prompt tokens this step
    prompt_logprobs: dict[str, tuple[int, list[LogprobEntry]]] = field(default_factory=dict)


def kv_block_bytes(hf_config, block_size: int, dtype: torch.dtype) -> int:
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    element = torch.tensor([], dtype=dtype).element_size()
    return 2 * hf_config.num_hidden_layers * block_size * num_kv_heads * head_dim * element


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = _DTYPES[config.dtype]
        self.block_size = config.block_size
        self.model = load_model(config.model, hf_config, self.dtype, config.device)
        self.sampler = Sampler(config.device)
        self.num_blocks = self._num_kv_blocks(hf_config)
        self.kv_caches = self._allocate_kv_cache()

    def _num_kv_blocks(self, hf_config) -> int:
        config = self.config
        if config.num_kv_blocks is not None:
            return config.num_kv_blocks
        per_block = kv_block_bytes(hf_config, self.block_size, self.dtype)
        if config.kv_cache_memory is not None:
            budget = config.kv_cache_memory
        else:
            budget = self._gpu_kv_budget()
        num_blocks = budget // per_block
        if num_blocks < 1:
            raise ValueError(f"KV cache budget {budget} bytes holds no {per_block}-byte block")
        return num_blocks

    def _gpu_kv_budget(self) -> int:
        """What the utilization target leaves after the weights, the peak
        activations of the largest step and memory torch does not manage."""
        torch.cuda.reset_peak_memory_stats()
        self.profile_forward()
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        not_torch = max(total - free - torch.cuda.memory_reserved(), 0)
        return int(total * self.config.gpu_memory_utilization) - torch.cuda.max_memory_allocated() - not_torch

    @torch.inference_mode()
    def profile_forward(self) -> torch.Tensor:
        """One prefill of `max_num_batched_tokens` tokens into a scratch cache,
        the largest step the scheduler can build; returns its last logits."""
        num_tokens = self.config.max_num_batched_tokens
        attn = self.model.layers[0].self_attn
        num_blocks = -(-num_tokens // self.block_size)
        shape = (num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim)
        bound = [layer.self_attn.kv_cache for layer in self.model.layers]
        for layer in self.model.layers:
            layer.self_attn.kv_cache = (
                torch.empty(shape, device=self.device, dtype=self.dtype),
                torch.empty(shape, device=self.device, dtype=self.dtype),
            )
        meta = AttentionMetadata(
            slot_mapping=torch.arange(num_tokens, device=self.device),
            block_tables=torch.arange(num_blocks, dtype=torch.int32, device=self.device)[None],
            seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=self.device),
            query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=self.device),
            max_query_len=num_tokens,
            max_seq_len=num_tokens,
        )
        positions = torch.arange(num_tokens, device=self.device)
        hidden = self.model(torch.zeros(num_tokens, dtype=torch.long, device=self.device), positions, meta)
        logits = self.model.compute_logits(hidden[-1:])
        for layer, kv_cache in zip(self.model.layers, bound):
            layer.self_attn.kv_cache = kv_cache
        return logits

    def _allocate_kv_cache(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        attn = self.model.layers[0].self_attn
        shape = (self.num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim)
        caches = []
        for layer in self.model.layers:
            kv = (
                torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device),
            )
            layer.self_attn.kv_cache = kv
            caches.append(kv)
        return caches

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for key_cache, value_cache in self.kv_caches:
            key_cache[dst] = key_cache[src]
            value_cache[dst] = value_cache[src]

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> RunnerOutput:
        self.sampler.drop(output.finished_request_ids)
        if output.block_copies:
            self._copy_blocks(output.block_copies)
        if not output.scheduled:
            return RunnerOutput([], SamplerOutput([], []))

        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        seq_lens: list[int] = []
        query_start_loc = [0]
        sample_rows: list[int] = []  # index into the flattened tokens
        rows: list[SamplingRow] = []
        prompt_rows: list[tuple[Request, int, int, int]] = []  # request, first row, first position, count
        max_blocks = 0
        for request, num_new in output.scheduled:
            start = request.num_computed_tokens
            end = start + num_new
            input_ids.extend(request.token_ids[start:end])
            positions.extend(range(start, end))
            table = request.block_table
            slot_mapping.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            seq_lens.append(end)
            query_start_loc.append(query_start_loc[-1] + num_new)
            max_blocks = max(max_blocks, len(table))
            # Position p's logits predict prompt token p + 1.
            num_prompt_rows = min(end, request.num_prompt_tokens - 1) - start
            if request.params.prompt_logprobs is not None and num_prompt_rows > 0:
                prompt_rows.append((request, query_start_loc[-2], start, num_prompt_rows))
            if end == request.num_tokens:
                sample_rows.append(query_start_loc[-1] - 1)
                stop_ids = request.eos_token_ids + tuple(request.params.stop_token_ids)
                rows.append(
                    SamplingRow(
                        request.request_id, request.params, request.prompt_token_ids,
                        request.output_token_ids, stop_ids, request.sample_index,
                    )
                )
        # One host tensor for the batch, padded with -1, instead of one per request.
        block_tables = torch.tensor(
            [r.block_table + [-1] * (max_blocks - len(r.block_table)) for r, _ in output.scheduled],
            dtype=torch.int32,
        )

        device = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64).to(device, non_blocking=True),
            block_tables=block_tables.to(device, non_blocking=True),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(device, non_blocking=True),
            query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32).to(device, non_blocking=True),
            max_query_len=max(b - a for a, b in zip(query_start_loc, query_start_loc[1:])),
            max_seq_len=max(seq_lens),
        )
        ids = torch.tensor(input_ids, dtype=torch.long).to(device, non_blocking=True)
        pos = torch.tensor(positions, dtype=torch.long).to(device, non_blocking=True)
        hidden = self.model(ids, pos, meta)
        prompt_logprobs = self._prompt_logprobs(hidden, prompt_rows)
        if not rows:
            return RunnerOutput([], SamplerOutput([], []), prompt_logprobs)
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=device)])
        return RunnerOutput([r.request_id for r in rows], self.sampler(logits, rows), prompt_logprobs)

    def _prompt_logprobs(
        self, hidden: torch.Tensor, prompt_rows: list[tuple[Request, int, int, int]]
    ) -> dict[str, tuple[int, list[LogprobEntry]]]:
        result = {}
        for request, row, first_pos, count in prompt_rows:
            logprobs = self.model.compute_logits(hidden[row : row + count]).float().log_softmax(dim=-1)
            targets = torch.tensor(request.token_ids[first_pos + 1 : first_pos + count + 1], device=hidden.device)
            entries = gather_logprobs(logprobs, targets, [request.params.prompt_logprobs] * count)
            result[request.request_id] = (first_pos, entries)
        return result
