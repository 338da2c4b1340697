"""Turns sampled tokens into RequestOutputs: text, stop strings, logprobs.

It keeps one state per caller-visible request (all n samples) and never
touches the scheduler; stop strings it detects are reported back to the
engine, which asks the scheduler to finish those requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from inference.detokenizer import IncrementalDetokenizer
from inference.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestMetrics, RequestOutput
from inference.request import Request
from inference.sampling_params import SamplingParams


@dataclass(slots=True)
class _Sample:
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_new: int = 0  # tokens added in the current step


@dataclass(slots=True)
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[_Sample]
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    prompt_logprobs: list[PositionLogprobs | None] | None = None

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, _RequestState] = {}

    def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
            params: SamplingParams, arrival_time: float) -> None:
        samples = [
            _Sample(IncrementalDetokenizer(self.tokenizer, params), logprobs=[] if params.logprobs is not None else None)
            for _ in range(params.n)
        ]
        self.states[request_id] = _RequestState(
            request_id, prompt, prompt_token_ids, params, samples, RequestMetrics(arrival_time),
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
        )

    def _decode_logprobs(self, entry: tuple[float, int, list[int], list[float]], token_id: int) -> PositionLogprobs:
        chosen_lp, chosen_rank, top_ids, top_lps = entry
        ids = [token_id] + [t for t in top_ids if t != token_id]
        texts = self.tokenizer.batch_decode([[t] for t in ids])
        out = {token_id: Logprob(chosen_lp, chosen_rank, texts[0])}
        for rank, (t, lp) in enumerate(zip(top_ids, top_lps), start=1):
            if t != token_id:
                out[t] = Logprob(lp, rank, texts[ids.index(t)])
        return out

    def process_prompt_logprobs(self, parent_id: str, first_pos: int, entries: list) -> None:
        """Prompt logprobs of one chunk; entry j scores prompt token first_pos + j + 1.
        A chunk recomputed after preemption is already recorded and skipped."""
        state = self.states[parent_id]
        known = state.prompt_logprobs
        for j, entry in enumerate(entries):
            if first_pos + j + 1 == len(known):
                known.append(self._decode_logprobs(entry, state.prompt_token_ids[first_pos + j + 1]))

    def process_token(self, request: Request, token_id: int, logprobs, now: float) -> bool:
        """Add one sampled token; True if a stop string finished the sample."""
        state = self.states[request.parent_id]
        sample = state.samples[request.sample_index]
        metrics = state.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        metrics.last_token_time = now
        state.num_cached_tokens = max(state.num_cached_tokens, request.num_cached_tokens)
        sample.token_ids.append(token_id)
        sample.num_new += 1
        if sample.logprobs is not None and logprobs is not None:
            sample.logprobs.append(self._decode_logprobs(logprobs, token_id))
        if sample.detokenizer.add_token(token_id):
            sample.stop_reason = sample.detokenizer.stop_reason
            return True
        return False

    def mark_scheduled(self, parent_id: str, now: float) -> None:
        metrics = self.states[parent_id].metrics
        if metrics.first_scheduled_time is None:
            metrics.first_scheduled_time = now

    def finish(self, request: Request, reason: str, now: float) -> None:
        state = self.states.get(request.parent_id)
        if state is None:
            return
        sample = state.samples[request.sample_index]
        if sample.finish_reason is None:
            sample.finish_reason = reason
            if sample.stop_reason is None:
                sample.stop_reason = request.stop_reason
        if state.finished:
            state.metrics.finished_time = now

    def make_output(self, parent_id: str) -> RequestOutput:
        state = self.states[parent_id]
        finished = state.finished
        outputs = []
        for index, s in enumerate(state.samples):
            done = s.finish_reason is not None
            outputs.append(
                CompletionOutput(
                    index=index,
                    text=s.detokenizer.visible_text(done),
                    token_ids=list(s.token_ids),
                    finish_reason=s.finish_reason,
                    logprobs=list(s.logprobs) if s.logprobs is not None else None,
                    stop_reason=s.stop_reason,
                )
            )
        new_counts = [s.num_new for s in state.samples]
        for s in state.samples:
            s.num_new = 0
        if finished:
            del self.states[parent_id]
        return RequestOutput(
            request_id=parent_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=outputs,
            finished=finished,
            prompt_logprobs=state.prompt_logprobs,
            metrics=state.metrics,
            num_cached_tokens=state.num_cached_tokens,
            new_token_counts=new_counts,
        )
