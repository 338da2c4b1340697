"""Model runner: turns a SchedulerOutput into one forward pass and samples.

It owns the model weights, the KV cache tensors, the persistent step
buffers, the decode CUDA graphs and the sampler; it reads the scheduler's
output (requests are never mutated here) and returns the sampled token ids.

Per step, `StepBuffers.prepare` fills the persistent inputs with NumPy and
copies them to the device; a decode-only batch that fits a graph bucket is
padded up to it and replayed (`DecodeGraphs`); any other batch runs eagerly;
the LM head runs only on the rows that sample, which `sampling_plan` picks
before the forward, and it turns what they sample into what each request
emits after.

With LoRA on (`inference/lora/`), the step's adapters are swapped into their
device slots first and each token's slot is written to the step buffers;
the other tensor-parallel ranks get both in the step's plan.

The KV cache holds `num_blocks` blocks for the block manager plus one scratch
block (id `num_blocks`) that padding rows write to and read; no request ever
owns it.

With `tensor_parallel_size` N > 1 the engine core starts the other
ranks (`inference.parallel.workers`) for the runner of rank 0, each with a runner of its own over its
shard of the model and its heads' KV cache; every rank has the same block
count (the smallest budget wins) and so the same block tables. Each step,
rank 0 prepares the batch, sends it (`StepPlan`), and every rank runs
`run_step`; rank 0 alone samples.

With speculative decoding (`inference/spec_decode/`), a request scheduled
with draft tokens runs its last token and the drafts as one query through
the paged prefill path (the Triton prefill kernel on GPU, the C++ one on the
CPU), with logits at each of those positions; `accepted_tokens` keeps the
drafts the target agrees with, and the proposer guesses the next drafts from
the request's tokens plus what it emits. A draft model (rank 0's alone) is
loaded with the weights, before the KV budget is measured, and takes from
that budget a draft block per target block plus lookahead blocks. With
graphs on, a step of decode and verify rows alone replays a verify graph of
its bucket (`DecodeGraphs`: real rows as eager, padding after them), so its
sampled rows are the eager ones.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch

import kernels
from inference.config import EngineConfig
from inference.cuda_graphs import DecodeGraphs, decode_buckets
from inference.kv_cache import allocate_kv_cache, kv_cache_bytes, profile_forward
from inference.memory_plan import kv_block_bytes
from inference.models import load_model
from inference.parallel import group
from inference.parallel.step_message import StepPlan, encode_step
from inference.sampler import Sampler, SamplerOutput, SamplingRow
from inference.sampling_plan import RunnerOutput, emitted, plan_logits, prompt_logprobs
from inference.spec_decode.draft_model import DraftModelProposer, load_draft_model, num_lookahead_blocks
from inference.spec_decode.proposer import build_proposer
from inference.request import Request
from inference.scheduler import SchedulerOutput
from inference.startup_phases import StartupPhases
from inference.step_buffers import StepBuffers

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class OtherRanks(Protocol):
    """Ranks 1..N-1 as rank 0's runner drives them (inference.parallel.workers
    implements it; not imported here, as its ranks import this module)."""

    def send(self, message: bytes) -> None: ...

    def stop(self) -> None: ...


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config, workers: OtherRanks | None = None) -> None:
        """Rank 0's runner gets the other ranks (`workers`), started and
        joined to the group by the engine core; a rank > 0's runner is built
        in its worker process, which has joined the group already."""
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = _DTYPES[config.dtype]
        self.block_size = config.block_size
        self.workers = workers
        # A verify graph's query length (k + 1); None without speculative decoding.
        self.verify_len = None if config.speculative is None else config.speculative.num_speculative_tokens + 1
        self.startup = StartupPhases()
        self._load(hf_config)

    def _load(self, hf_config) -> None:
        config = self.config
        spec = config.speculative
        phase = self.startup.phase
        if self.device.type == "cpu":
            # Built or loaded now, not inside the first request.
            with phase("cpu_kernels"):
                logger.info("CPU ops: %s", kernels.cpu_kernels())
        with phase("weights"):
            self.model = load_model(config.model, hf_config, self.dtype, config.device, config.load_format == "dummy")
            self.lora = None
            if config.lora is not None:
                from inference.lora.residency import LoRAResidency

                self.lora = LoRAResidency(self.model, hf_config, config.lora)
            self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
            packed = self.model.pack_cpu_weights() if self.device.type == "cpu" else 0
            self.draft = None
            if spec is not None and spec.method == "draft_model" and group.rank() == 0:
                # Before the KV budget is measured: the draft's weights take from it.
                self.draft = load_draft_model(spec.model, self.dtype, config.device)
                self.weight_bytes += self.draft.weight_bytes
        if packed:
            logger.info("Weight copies packed for the C++ linear kernel: %.0f MiB", packed / 2**20)
        self.weight_bytes += packed
        if self.device.type == "cpu":
            # One decode-sized forward now, so the first request does not pay
            # for the kernels' first calls.
            with phase("warmup"):
                self.profile_forward(16, 16)
        self.sampler = Sampler(config.device)
        self.num_blocks = self._num_kv_blocks(hf_config)
        with phase("kv_cache"):
            # num_blocks for the block manager, then the scratch block for padding rows
            self.kv_caches = allocate_kv_cache(self.model, self.num_blocks + 1, self.block_size)
            self.proposer = None
            if self.draft is not None:
                self.proposer = DraftModelProposer(
                    self.draft, spec, self.num_blocks + self._num_lookahead_blocks(), self.block_size,
                    config.max_model_len, config.max_num_batched_tokens, self.device,
                )
            elif spec is not None and group.rank() == 0:
                self.proposer = build_proposer(spec)
        self.kv_cache_bytes = kv_cache_bytes(self.kv_caches)
        if self.draft is not None:
            self.kv_cache_bytes += self.proposer.kv_cache_bytes
        attn = self.model.layers[0].self_attn
        workspace_numel = kernels.decode_workspace_numel(
            config.max_num_seqs, attn.num_heads, attn.head_dim, config.max_model_len, self.device
        )
        # The largest graph's tokens: its largest bucket, times k + 1 with verify graphs.
        graph_tokens = 0 if config.enforce_eager else self._decode_buckets()[-1] * (self.verify_len or 1)
        self.buffers = StepBuffers(
            max_num_tokens=max(config.max_num_batched_tokens, config.max_num_seqs, graph_tokens),
            max_num_logits=max(config.max_num_batched_tokens, config.max_num_seqs) if spec else config.max_num_seqs,
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
            self.graphs = DecodeGraphs(self.model, self.buffers, self._decode_buckets(), config.max_model_len,
                                       self.lora.batch if self.lora is not None else None, self.verify_len)
            if self.device.type == "cuda":
                with phase("graph_capture"):
                    self.graphs.capture()
        # Every rank's weights and KV cache (and, on CUDA, all it allocated), by rank.
        self.rank_memory_bytes = group.all_gather_ints(self._memory_bytes(), self.device)

    def _num_lookahead_blocks(self) -> int:
        if self.draft is None:
            return 0
        return num_lookahead_blocks(self.config.speculative, self.block_size, self.config.max_num_seqs)

    def _decode_buckets(self) -> list[int]:
        config = self.config
        return decode_buckets(config.max_num_seqs, config.max_cudagraph_capture_size, config.cudagraph_capture_sizes)

    def _memory_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated()
        return self.weight_bytes + self.kv_cache_bytes

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks, if any."""
        if self.workers is not None:
            self.workers.stop()
            self.workers = None

    def _num_kv_blocks(self, hf_config) -> int:
        config = self.config
        if kernels.prefill_autotunes(self.device):
            # Now, not in the first serving step of each bucket, which would stall every running request;
            # and before the KV budget is measured, as a first tuning (cold Triton cache) times its
            # configs with a 256 MB scratch buffer that a later start, reading the cache, does not need.
            with self.startup.phase("autotune"):
                self._tune_prefill()
        if config.num_kv_blocks is not None:
            return config.num_kv_blocks
        per_block = kv_block_bytes(hf_config, self.block_size, self.dtype, config.tensor_parallel_size)
        if config.kv_cache_memory is not None:
            budget = config.kv_cache_memory  # per rank
        else:
            budget = self._gpu_kv_budget()
        # Rank 0 with a draft model also holds a draft block per block, and the lookahead ones.
        draft_block = 0 if self.draft is None else kv_block_bytes(self.draft.hf_config, self.block_size, self.dtype)
        # One more target block is the scratch block.
        num_blocks = (budget - per_block - self._num_lookahead_blocks() * draft_block) // (per_block + draft_block)
        if num_blocks < 1:
            raise ValueError(
                f"KV cache budget {budget} bytes holds no {per_block}-byte block besides the scratch one"
            )
        # One block manager serves every rank: the smallest budget wins.
        return group.all_reduce_min(num_blocks, self.device)

    def _gpu_kv_budget(self) -> int:
        """What the utilization target leaves after the weights (measured, so
        every expert of an MoE model counts, active or not), the peak
        activations of the largest step, the graphs' memory pool and
        memory torch does not manage."""
        torch.cuda.reset_peak_memory_stats()
        self.profile_forward(self.config.max_num_batched_tokens)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        graph_pool = 0
        if not self.config.enforce_eager:
            # The graphs' pool keeps about one forward's activations of the
            # largest graph for good, beside what eager steps need: the largest
            # bucket's decode shape, or its verify shape where that takes more.
            num_reqs = self._decode_buckets()[-1]
            for query_len in {1, self.verify_len or 1}:
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                self.profile_forward(num_reqs * query_len, num_reqs)
                torch.cuda.synchronize()
                graph_pool = max(graph_pool, torch.cuda.max_memory_allocated() - base)
        free, total = torch.cuda.mem_get_info()
        not_torch = max(total - free - torch.cuda.memory_reserved(), 0)
        return int(total * self.config.gpu_memory_utilization) - peak - graph_pool - not_torch

    def _tune_prefill(self) -> None:
        """A prefill in each autotuning length bucket a step can reach, so each is tuned; the draft
        model's too (its prompt catch-up runs the prefill kernel on its own head shapes)."""
        config = self.config
        for query_len in kernels.prefill_tuning_lengths(min(config.max_model_len, config.max_num_batched_tokens)):
            self.profile_forward(query_len)
            if self.draft is not None:
                with group.acting_as(0, 1):
                    profile_forward(self.draft.model, query_len, 1, config.max_model_len, self.block_size)

    def profile_forward(self, num_tokens: int | None = None, num_reqs: int = 1) -> torch.Tensor:
        """`kv_cache.profile_forward` of this runner's model: by default a step of
        `max_num_batched_tokens`, the largest the scheduler can build."""
        return profile_forward(self.model, num_tokens or self.config.max_num_batched_tokens, num_reqs,
                               self.config.max_model_len, self.block_size)

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        src, dst = torch.tensor(copies).to(self.device, non_blocking=True).unbind(1)
        for key_cache, value_cache in self.kv_caches:
            key_cache[dst] = key_cache[src]
            value_cache[dst] = value_cache[src]

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> RunnerOutput:
        scheduled = output.scheduled
        plan = StepPlan(None, output.block_copies)
        rows: list[SamplingRow] = []
        groups: list[tuple[Request, list[int]]] = []  # (request, its drafts), per request that samples
        prompt_requests: list[tuple[Request, int]] = []  # request, first position
        if scheduled:
            shape = None if self.graphs is None else self.graphs.shape_for(scheduled, output.spec_token_ids)
            plan.use_graph = shape is not None
            num_padded_reqs, graph_query_len = shape or (len(scheduled), None)
            plan.batch = self.buffers.prepare(scheduled, num_padded_reqs, output.spec_token_ids, graph_query_len)
            if self.lora is not None:
                request_slots = self.lora.request_slots([request.lora_name for request, _ in scheduled])
                self.buffers.set_lora_slots(request_slots, plan.batch)
                plan.lora, plan.lora_loads = True, self.lora.loads
            rows, groups, prompt_requests = plan_logits(
                scheduled, output.spec_token_ids, self.buffers.np["query_start_loc"], plan
            )
        if self.workers is not None and (plan.batch is not None or plan.block_copies):
            self.workers.send(encode_step(self.buffers, plan))
        prompt_logits, logits = self.run_step(plan)
        sampled = self.sampler(logits, rows) if rows else SamplerOutput([], [])
        return emitted(sampled, groups, prompt_logprobs(prompt_logits, prompt_requests), self.proposer,
                       output.finished_request_ids)

    @torch.inference_mode()
    def run_step(self, plan: StepPlan) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """What every rank runs of a step: the block copies, the forward, and
        the logits of the plan's rows (prompt ranges, then the sampled rows)."""
        if plan.block_copies:
            self._copy_blocks(plan.block_copies)
        batch = plan.batch
        if batch is None:
            return [], None
        if plan.lora:
            if group.rank() > 0:
                self.lora.load_slots(plan.lora_loads)
            self.lora.set_token_slots(*self.buffers.lora_slots(batch))
        if plan.use_graph:
            hidden = self.graphs.run(batch)
        else:
            input_ids, positions = self.buffers.inputs(batch)
            hidden = self.model(input_ids, positions, self.buffers.metadata(batch))
        prompt_logits = [self.model.compute_logits(hidden[row : row + count]) for row, count in plan.prompt_rows]
        logits = None
        if plan.sample_rows:
            logits = self.model.compute_logits(hidden[self.buffers.set_logits_indices(plan.sample_rows)])
        return prompt_logits, logits
