"""The engine: one `step()` is schedule -> run -> update.

    scheduler.schedule()      which requests, how many tokens each
    runner.execute(...)       one forward pass, sampled token ids
    scheduler.update(...)     computed counts, new tokens, token-level stops
    outputs.process_token()   text, stop strings, logprobs -> RequestOutput

Requests come in through `add_request` and leave through the outputs of
`step`; every finished request shows up exactly once with `finished=True`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from inference.block_manager import BlockManager
from inference.config import EngineConfig
from inference.model_runner import ModelRunner
from inference.output_processor import OutputProcessor
from inference.outputs import RequestOutput
from inference.request import Request, RequestStatus
from inference.sampling_params import SamplingParams
from inference.scheduler import Scheduler


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_total_blocks: int
    num_free_blocks: int
    kv_cache_usage: float  # used blocks / total
    kv_waste_ratio: float  # allocated slots not holding a token / allocated slots
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    prompt_tokens_computed: int

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Share of looked-up prompt tokens served from the prefix cache."""
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


class StepError(RuntimeError):
    """The forward pass failed; the requests in that step were aborted, the
    engine itself is still usable."""

    def __init__(self, request_ids: list[str], cause: BaseException) -> None:
        super().__init__(f"engine step failed for {len(request_ids)} request(s): {cause!r}")
        self.request_ids = request_ids


def sample_request_id(request_id: str, index: int) -> str:
    """Scheduler id of sample `index` of a caller's request; sample 0 keeps the id."""
    return request_id if index == 0 else f"{request_id}#{index}"


def _eos_token_ids(folder: str, tokenizer) -> tuple[int, ...]:
    ids: set[int] = set()
    try:
        eos = GenerationConfig.from_pretrained(folder).eos_token_id
    except OSError:
        eos = None
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.hf_config = AutoConfig.from_pretrained(config.model)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.eos_token_ids = _eos_token_ids(config.model, self.tokenizer)
        self.vocab_size = self.hf_config.vocab_size
        self.runner = ModelRunner(config, self.hf_config)
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler_config(), self.block_manager)
        self.outputs = OutputProcessor(self.tokenizer)
        self._pending_outputs: list[str] = []  # parents finished outside step()

    # ---- requests ----------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        arrival_time: float | None = None,
        cache_salt: str | None = None,
    ) -> None:
        if request_id in self.outputs.states:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            prompt_text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            prompt_text, token_ids = None, list(prompt)
        self._validate(token_ids, params)
        arrival = time.monotonic() if arrival_time is None else arrival_time

        def sample(index: int) -> Request:
            return Request(
                sample_request_id(request_id, index), request_id, index, token_ids, params, self.eos_token_ids,
                arrival, priority, cache_salt,
            )

        leader = sample(0)
        leader.pending_samples = [sample(i) for i in range(1, params.n)]
        self.outputs.add(request_id, prompt_text, token_ids, params, arrival)
        self.scheduler.add_request(leader)

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        max_len = self.config.max_model_len
        if not token_ids:
            raise ValueError("prompt is empty")
        if any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in token_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        if len(token_ids) >= max_len:
            raise ValueError(
                f"prompt has {len(token_ids)} tokens, max_model_len is {max_len}: "
                "no room left to generate a token"
            )
        if params.max_tokens is not None and len(token_ids) + params.max_tokens > max_len:
            raise ValueError(
                f"prompt has {len(token_ids)} tokens and max_tokens is {params.max_tokens}, "
                f"together over max_model_len {max_len}"
            )
        bad_ids = [t for t in [*(params.logit_bias or {}), *params.stop_token_ids] if t >= self.vocab_size]
        if bad_ids:
            raise ValueError(f"logit_bias and stop_token_ids must be token ids below {self.vocab_size}, got {bad_ids[0]}")
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"n is {params.n}, over max_num_seqs {self.config.max_num_seqs}")

    def abort_request(self, request_id: str) -> None:
        state = self.outputs.states.get(request_id)
        if state is None:
            return
        now = time.monotonic()
        for index in range(len(state.samples)):
            rid = sample_request_id(request_id, index)
            request = self.scheduler.requests.get(rid)
            if request is not None:
                self.scheduler.finish_request(rid, RequestStatus.FINISHED_ABORTED)
                self.outputs.finish(request, "abort", now)
        # Samples that finished earlier keep their reason; any never started abort.
        for sample in state.samples:
            if sample.finish_reason is None:
                sample.finish_reason = "abort"
        state.metrics.finished_time = now
        self._pending_outputs.append(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending_outputs)

    # ---- one step ------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        scheduled_at = time.monotonic()  # queue time ends here, before the forward pass
        try:
            result = self.runner.execute(sched)
        except Exception as exc:
            parent_ids = list(dict.fromkeys(r.parent_id for r, _ in sched.scheduled))
            for parent_id in parent_ids:
                self.abort_request(parent_id)
            raise StepError(parent_ids, exc) from exc
        now = time.monotonic()
        sampled = dict(zip(result.request_ids, result.sampled.token_ids))
        logprobs = dict(zip(result.request_ids, result.sampled.logprobs))
        for request, _ in sched.scheduled:
            self.outputs.mark_scheduled(request.parent_id, scheduled_at)
            if request.request_id in result.prompt_logprobs:
                self.outputs.process_prompt_logprobs(request.parent_id, *result.prompt_logprobs[request.request_id])
        progressed = self.scheduler.update(sched, sampled)

        touched = dict.fromkeys(self._pending_outputs)
        self._pending_outputs = []
        for request in progressed:
            touched[request.parent_id] = None
            token_id = request.token_ids[-1]
            stopped = self.outputs.process_token(request, token_id, logprobs.get(request.request_id), now)
            if stopped:
                self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED)
            if request.status.finished:
                # A stop string on the last allowed token still reads "stop".
                self.outputs.finish(request, "stop" if stopped else request.status.value, now)
        return [self.outputs.make_output(parent_id) for parent_id in touched if parent_id in self.outputs.states]

    # ---- introspection -------------------------------------------------------
    def stats(self) -> EngineStats:
        bm = self.block_manager
        allocated = filled = 0
        for request in self.scheduler.running:
            allocated += len(request.block_table) * bm.block_size
            filled += request.num_computed_tokens
        total = bm.num_blocks
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_total_blocks=total,
            num_free_blocks=bm.num_free_blocks,
            kv_cache_usage=bm.num_used_blocks / total,
            kv_waste_ratio=(allocated - filled) / allocated if allocated else 0.0,
            num_preemptions=self.scheduler.stats.num_preemptions,
            prefix_cache_queries=self.scheduler.stats.prefix_cache_queries,
            prefix_cache_hits=self.scheduler.stats.prefix_cache_hits,
            prompt_tokens_computed=self.scheduler.stats.prompt_tokens_computed,
        )
