"""Turns the core's token ids into RequestOutputs: text, stop strings, logprobs.

It keeps one state per caller-visible request (all n samples) and never
touches the core; the samples a stop string finishes are handed back to the
caller, which aborts them in the core (a direct call in-process, a message
across processes). Tokens the core produced before it heard are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from inference.core_protocol import StepOutputs, sample_request_id
from inference.detokenizer import IncrementalDetokenizer
from inference.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestMetrics, RequestOutput
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
    num_unfinished: int  # samples without a finish reason; a counter, as this is asked per token
    num_cached_tokens: int = 0
    prompt_logprobs: list[PositionLogprobs | None] | None = None

    @property
    def finished(self) -> bool:
        return self.num_unfinished == 0


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, _RequestState] = {}
        self._pending: list[str] = []  # aborted requests whose final output is due

    def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
            params: SamplingParams, arrival_time: float) -> None:
        samples = [
            _Sample(IncrementalDetokenizer(self.tokenizer, params), logprobs=[] if params.logprobs is not None else None)
            for _ in range(params.n)
        ]
        self.states[request_id] = _RequestState(
            request_id, prompt, prompt_token_ids, params, samples, RequestMetrics(
                arrival_time, structured_kind=params.structured_outputs and params.structured_outputs.key[0],
            ), params.n,
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

    def _process_prompt_logprobs(self, state: _RequestState, first_pos: int, entries: list) -> None:
        """Prompt logprobs of one chunk; entry j scores prompt token first_pos + j + 1.
        A chunk recomputed after preemption is already recorded and skipped."""
        known = state.prompt_logprobs
        for j, entry in enumerate(entries):
            if first_pos + j + 1 == len(known):
                known.append(self._decode_logprobs(entry, state.prompt_token_ids[first_pos + j + 1]))

    def process(self, step: StepOutputs) -> tuple[list[RequestOutput], list[str]]:
        """One step's news as RequestOutputs, plus the sample ids a stop string
        finished here: the caller must abort those in the core."""
        stopped: list[str] = []
        touched = dict.fromkeys(self._pending)
        self._pending = []
        for request_id, seconds in step.grammar_compiles:
            if request_id in self.states:
                self.states[request_id].metrics.grammar_compile_time = seconds
        for out in step.outputs:
            state = self.states.get(out.request_id)
            if state is None:
                continue  # aborted here while the core was still stepping it
            sample = state.samples[out.sample_index]
            if sample.finish_reason is not None:
                continue  # a stop string ended it; the core had not heard yet
            metrics = state.metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = step.scheduled_time
            if out.prompt_logprobs is not None:
                self._process_prompt_logprobs(state, *out.prompt_logprobs)
            state.num_cached_tokens = max(state.num_cached_tokens, out.num_cached_tokens)
            metrics.num_preemptions = max(metrics.num_preemptions, out.num_preemptions)
            metrics.prefill_time = max(metrics.prefill_time, out.prefill_time)
            metrics.decode_time = max(metrics.decode_time, out.decode_time)
            if out.new_token_ids:
                touched[out.request_id] = None
                if metrics.first_token_time is None:
                    metrics.first_token_time = step.token_time
                metrics.last_token_time = step.token_time
            for position, token_id in enumerate(out.new_token_ids):
                sample.token_ids.append(token_id)
                sample.num_new += 1
                if sample.logprobs is not None and out.logprobs is not None:
                    sample.logprobs.append(self._decode_logprobs(out.logprobs[position], token_id))
                if sample.detokenizer.add_token(token_id):
                    # A stop string on the last allowed token still reads "stop".
                    sample.stop_reason = sample.detokenizer.stop_reason
                    self._finish(state, sample, "stop", step.token_time)
                    if out.finish_reason is None:
                        stopped.append(sample_request_id(out.request_id, out.sample_index))
                    break
            if out.finish_reason is not None and sample.finish_reason is None:
                sample.stop_reason = out.stop_reason
                self._finish(state, sample, out.finish_reason, step.token_time)
                touched[out.request_id] = None
        return [self._make_output(request_id) for request_id in touched if request_id in self.states], stopped

    def abort(self, request_id: str, now: float) -> list[str]:
        """Finish a request as aborted; its output comes with the next
        `process`. Returns the ids of its samples the core may still run."""
        state = self.states.get(request_id)
        if state is None:
            return []
        running = [sample_request_id(request_id, i) for i, s in enumerate(state.samples) if s.finish_reason is None]
        # Samples that finished earlier keep their reason.
        for sample in state.samples:
            if sample.finish_reason is None:
                sample.finish_reason = "abort"
        state.num_unfinished = 0
        state.metrics.finished_time = now
        self._pending.append(request_id)
        return running

    def drop(self, request_id: str) -> None:
        """Forget a request that failed; nobody will read its output."""
        self.states.pop(request_id, None)

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    @staticmethod
    def _finish(state: _RequestState, sample: _Sample, reason: str, now: float) -> None:
        sample.finish_reason = reason
        state.num_unfinished -= 1
        if state.finished:
            state.metrics.finished_time = now

    def _make_output(self, parent_id: str) -> RequestOutput:
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
