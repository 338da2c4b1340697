"""Model runner: turns a SchedulerOutput into one forward pass and samples.

It owns the model weights, the KV cache tensors, the persistent step
buffers, the decode CUDA graphs and the sampler; it reads the scheduler's
output (requests are never mutated here) and returns the sampled token ids.

Per step, `StepBuffers.prepare` fills the persistent inputs with NumPy and
copies them to the device; a decode-only batch that fits a graph bucket is
padded up to it and replayed (`DecodeGraphs`); any other batch runs eagerly;
the LM head runs only on the rows that sample.

The KV cache holds `num_blocks` blocks for the block manager plus one scratch
block (id `num_blocks`) that padding rows write to and read; no request ever
owns it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

import kernels
from inference.attention import AttentionMetadata
from inference.config import EngineConfig
from inference.cuda_graphs import DecodeGraphs
from inference.models import load_model
from inference.sampler import LogprobEntry, Sampler, SamplerOutput, SamplingRow, gather_logprobs
from inference.request import Request
from inference.scheduler import SchedulerOutput
from inference.step_buffers import StepBuffers

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
        attn = self.model.layers[0].self_attn
        workspace_numel = kernels.decode_workspace_numel(
            config.max_num_seqs, attn.num_heads, attn.head_dim, config.max_model_len, self.device
        )
        self.buffers = StepBuffers(
            max_num_tokens=max(config.max_num_batched_tokens, config.max_num_seqs),
            max_num_reqs=config.max_num_seqs,
            max_blocks_per_seq=-(-config.max_model_len // self.block_size),
            block_size=self.block_size,
            scratch_block_id=self.num_blocks,
            device=self.device,
            decode_workspace=torch.empty(workspace_numel, dtype=torch.float32, device=self.device)
            if workspace_numel else None,
        )
        self.graphs = None
        if not config.enforce_eager:
            self.graphs = DecodeGraphs(self.model, self.buffers, config.max_num_seqs, config.max_model_len)
            if self.device.type == "cuda":
                self.graphs.capture()

    def _num_kv_blocks(self, hf_config) -> int:
        config = self.config
        if config.num_kv_blocks is not None:
            return config.num_kv_blocks
        per_block = kv_block_bytes(hf_config, self.block_size, self.dtype)
        if config.kv_cache_memory is not None:
            budget = config.kv_cache_memory
        else:
            budget = self._gpu_kv_budget()
        num_blocks = budget // per_block - 1  # one more is the scratch block
        if num_blocks < 1:
            raise ValueError(f"KV cache budget {budget} bytes holds no {per_block}-byte block")
        return num_blocks

    def _gpu_kv_budget(self) -> int:
        """What the utilization target leaves after the weights, the peak
        activations of the largest step, the decode graphs' memory pool and
        memory torch does not manage."""
        torch.cuda.reset_peak_memory_stats()
        self.profile_forward(self.config.max_num_batched_tokens)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        graph_pool = 0
        if not self.config.enforce_eager:
            # The graphs' pool keeps about one forward's activations of the
            # largest bucket for good, beside what eager steps need.
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            num_reqs = self.config.max_num_seqs
            self.profile_forward(num_reqs, num_reqs)
            torch.cuda.synchronize()
            graph_pool = torch.cuda.max_memory_allocated() - base
        free, total = torch.cuda.mem_get_info()
        not_torch = max(total - free - torch.cuda.memory_reserved(), 0)
        return int(total * self.config.gpu_memory_utilization) - peak - graph_pool - not_torch

    @torch.inference_mode()
    def profile_forward(self, num_tokens: int | None = None, num_reqs: int = 1) -> torch.Tensor:
        """A forward of `num_reqs` requests of `num_tokens // num_reqs` new
        tokens each into a scratch cache (by default one prefill of
        `max_num_batched_tokens`, the largest step the scheduler can build);
        returns the last logits."""
        num_tokens = num_tokens or self.config.max_num_batched_tokens
        per_req = num_tokens // num_reqs
        num_tokens = per_req * num_reqs
        attn = self.model.layers[0].self_attn
        blocks_per_req = -(-per_req // self.block_size)
        shape = (num_reqs * blocks_per_req, self.block_size, attn.num_kv_heads, attn.head_dim)
        bound = [layer.self_attn.kv_cache for layer in self.model.layers]
        for layer in self.model.layers:
            layer.self_attn.kv_cache = (
                torch.empty(shape, device=self.device, dtype=self.dtype),
                torch.empty(shape, device=self.device, dtype=self.dtype),
            )
        arange = functools.partial(torch.arange, dtype=torch.int32, device=self.device)
        meta = AttentionMetadata(
            slot_mapping=(arange(num_reqs)[:, None] * blocks_per_req * self.block_size + arange(per_req)).flatten().long(),
            block_tables=arange(num_reqs * blocks_per_req).view(num_reqs, blocks_per_req),
            seq_lens=torch.full((num_reqs,), per_req, dtype=torch.int32, device=self.device),
            query_start_loc=arange(num_reqs + 1) * per_req,
            max_query_len=per_req,
            max_seq_len=per_req,
        )
        positions = arange(per_req).long().repeat(num_reqs)
        hidden = self.model(torch.zeros(num_tokens, dtype=torch.long, device=self.device), positions, meta)
        logits = self.model.compute_logits(hidden[-1:])
        for layer, kv_cache in zip(self.model.layers, bound):
            layer.self_attn.kv_cache = kv_cache
        return logits

    def _allocate_kv_cache(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        attn = self.model.layers[0].self_attn
        # num_blocks for the block manager, then the scratch block for padding rows
        shape = (self.num_blocks + 1, self.block_size, attn.num_kv_heads, attn.head_dim)
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
        src, dst = torch.tensor(copies).to(self.device, non_blocking=True).unbind(1)
        for key_cache, value_cache in self.kv_caches:
            key_cache[dst] = key_cache[src]
            value_cache[dst] = value_cache[src]

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> RunnerOutput:
        if output.block_copies:
            self._copy_blocks(output.block_copies)
        scheduled = output.scheduled
        if not scheduled:
            return RunnerOutput([], SamplerOutput([], []))

        num_reqs = len(scheduled)
        graphs = self.graphs
        use_graph = graphs is not None and num_reqs <= graphs.max_batch_size and all(n == 1 for _, n in scheduled)
        batch = self.buffers.prepare(scheduled, graphs.bucket_for(num_reqs) if use_graph else num_reqs)
        if use_graph:
            hidden = graphs.run(batch)
        else:
            input_ids, positions = self.buffers.inputs(batch)
            hidden = self.model(input_ids, positions, self.buffers.metadata(batch))

        query_start_loc = self.buffers.np["query_start_loc"]
        sample_rows: list[int] = []  # index into the flattened tokens
        rows: list[SamplingRow] = []
        prompt_rows: list[tuple[Request, int, int, int]] = []  # request, first row, first position, count
        for i, (request, num_new) in enumerate(scheduled):
            start = request.num_computed_tokens
            end = start + num_new
            # Position p's logits predict prompt token p + 1.
            num_prompt_rows = min(end, request.num_prompt_tokens - 1) - start
            if request.params.prompt_logprobs is not None and num_prompt_rows > 0:
                prompt_rows.append((request, int(query_start_loc[i]), start, num_prompt_rows))
            if end == request.num_tokens:
                sample_rows.append(int(query_start_loc[i + 1]) - 1)
                stop_ids = request.eos_token_ids + tuple(request.params.stop_token_ids)
                rows.append(
                    SamplingRow(
                        request.request_id, request.params, request.prompt_token_ids,
                        request.output_token_ids, stop_ids, request.sample_index, request.grammar,
                    )
                )
        prompt_logprobs = self._prompt_logprobs(hidden, prompt_rows)
        if not rows:
            return RunnerOutput([], SamplerOutput([], []), prompt_logprobs)
        logits = self.model.compute_logits(hidden[self.buffers.set_logits_indices(sample_rows)])
        return RunnerOutput([r.request_id for r in rows], self.sampler(logits, rows), prompt_logprobs)

    def _prompt_logprobs(
        self, hidden: torch.Tensor, prompt_rows: list[tuple[Request, int, int, int]]
    ) -> dict[str, tuple[int, list[LogprobEntry]]]:
        result = {}
        for request, row, first_pos, count in prompt_rows:
            logprobs = self.model.compute_logits(hidden[row : row + count]).float().log_softmax(dim=-1)
            targets = torch.tensor(request.token_ids[first_pos + 1 : first_pos + count + 1]).to(hidden.device)
            entries = gather_logprobs(logprobs, targets, [request.params.prompt_logprobs] * count)
            result[request.request_id] = (first_pos, entries)
        return result
