"""Continuous-batching scheduler (vLLM v1 style), pure Python.

There are no prefill and decode phases: every request has
`num_computed_tokens` catching up with `num_tokens_target`, and each step
hands out at most `max_num_batched_tokens` new tokens over at most
`max_num_seqs` requests. Running requests that need one token (decodes) go
first, then running prefills, then waiting requests; prefills are chunked to
fit the budget.

Invariants:
- Only the scheduler mutates `Request`s and the block manager (its own
  parts included: `request_blocks` hands out, caches and frees a request's
  blocks, `stop_check` appends tokens and ends requests).
- A running request's `block_table` holds exactly
  ceil((num_computed_tokens + tokens scheduled) / block_size) blocks.
- `running` is sorted by `Request.sort_key` (priority, then arrival); the
  preemption victim is its last element: lowest priority, newest.
- Preemption is by recompute: the victim's blocks are freed, its computed
  count drops to 0 and it waits again with its tokens kept, so nothing
  generated is lost.
- A finished or aborted request holds no blocks.
- At most the last prompt token is recomputed on a prefix-cache hit, so the
  step that finishes the prompt always has logits to sample from.
- A request whose grammar still compiles waits in `waiting_for_grammar`,
  outside the queue: it holds no batch slot and no block until
  `grammar_ready` hands it its matchers.
- A structured request's matcher has accepted exactly its output tokens; a
  sampled token the matcher refuses is not appended and ends the request.
- With LoRA on, the running requests use at most `max_loras` distinct
  adapters, so no step needs more device slots than there are. A waiting
  request whose adapter finds no free slot stays queued while others behind
  it are admitted (requests of adapters already running, base-model ones).
  Once it has been passed over in `LORA_PATIENCE_STEPS` steps, only
  base-model requests are admitted past it, so the running adapters drain
  and it cannot starve.
- Speculative decoding: a running request with only its last token to
  compute may carry draft tokens (`spec_token_ids`); it is scheduled for
  1 + the drafts that fit (budget, max_model_len, max_tokens; none in a
  step that starts with `spec_disable_by_batch_size` requests running), listed in
  `SchedulerOutput.spec_token_ids`, and the pool is asked for their slots
  (dropped, not preempting anyone, when it has none). After the step
  `num_computed_tokens` counts only the tokens whose KV is valid (the input
  token and the accepted drafts); the blocks past ceil(num_computed_tokens /
  block_size), which only rejected drafts wrote, go straight back to the
  pool. Prefix caching hashes only full blocks below `num_computed_tokens`,
  so a rejected draft's KV is never cached.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from inference.block_manager import BlockManager
from inference.config import SchedulerConfig
from inference.request import Request, RequestStatus
from inference.request_blocks import RequestBlocks
from inference.stop_check import append_tokens
from inference.spec_decode.stats import SpecDecodeStats, keeps_speculating


# Steps a request may wait for an adapter slot while later requests of running adapters pass it.
LORA_PATIENCE_STEPS = 8


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[tuple[Request, int]]  # (request, new tokens), batch order
    block_copies: list[tuple[int, int]]  # (src, dst): copy-on-write before the forward
    finished_request_ids: list[str]  # finished since the last step
    num_batched_tokens: int = 0
    # request id -> the draft tokens it verifies this step (after its last token)
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)


@dataclass(slots=True)
class SchedulerStats:
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up
    prefix_cache_hits: int = 0  # prompt tokens found cached
    prompt_tokens_computed: int = 0
    spec_decode: SpecDecodeStats = field(default_factory=SpecDecodeStats)


@dataclass(slots=True)
class _WaitingEntry:
    key: tuple[int, float, str]
    request: Request = field(compare=False)

    def __lt__(self, other: _WaitingEntry) -> bool:
        return self.key < other.key


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.block_size = config.block_size
        self.blocks = RequestBlocks(block_manager, config.block_size, config.enable_prefix_caching,
                                    config.prefix_caching_hash_algo)
        self.waiting: list[_WaitingEntry] = []  # heap
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.waiting_for_grammar: dict[str, Request] = {}
        self.stats = SchedulerStats()
        self._finished_ids: list[str] = []
        self._lora_waits: dict[str, int] = {}  # request id -> steps passed over for want of an adapter slot

    # ---- requests in and out -------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.status == RequestStatus.WAITING_FOR_GRAMMAR:
            for r in [request, *request.pending_samples]:
                self.requests[r.request_id] = r
            self.waiting_for_grammar[request.request_id] = request
            return
        self._enqueue(request)

    def grammar_ready(self, request_id: str, new_matcher: Callable[[], Any]) -> None:
        """The grammar of a request waiting for it compiled: each sample gets
        its own matcher from `new_matcher` and the request joins the queue.
        Unknown ids (aborted meanwhile) are ignored."""
        request = self.waiting_for_grammar.pop(request_id, None)
        if request is None:
            return
        for r in [request, *request.pending_samples]:
            r.grammar = new_matcher()
            r.status = RequestStatus.WAITING
        self._enqueue(request)

    def _enqueue(self, request: Request) -> None:
        if request.num_tokens_target == 0:
            # A one-token prompt has nothing to share: every sample runs alone.
            samples, request.pending_samples = request.pending_samples, []
        else:
            samples = []
        for r in [request, *samples]:
            self.requests[r.request_id] = r
            heapq.heappush(self.waiting, _WaitingEntry(r.sort_key, r))
        for sample in request.pending_samples:
            self.requests[sample.request_id] = sample

    def finish_request(self, request_id: str, status: RequestStatus) -> None:
        request = self.requests.pop(request_id, None)
        self._lora_waits.pop(request_id, None)
        if request is None:
            return
        for sample in request.pending_samples:
            self.finish_request(sample.request_id, status)
        request.pending_samples = []
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            self.waiting = [e for e in self.waiting if e.request is not request]
            heapq.heapify(self.waiting)
        elif request.status == RequestStatus.WAITING_FOR_GRAMMAR:
            self.waiting_for_grammar.pop(request_id, None)
        self.block_manager.free(request.block_table)
        request.block_table = []
        request.status = status
        self._finished_ids.append(request_id)

    @property
    def num_waiting(self) -> int:
        queued = sum(e.request.num_seats for e in self.waiting)
        return queued + sum(r.num_seats for r in self.waiting_for_grammar.values())

    @property
    def has_schedulable(self) -> bool:
        """Anything running or queued, as opposed to only grammars compiling."""
        return bool(self.running or self.waiting)

    @property
    def num_running(self) -> int:
        return sum(r.num_seats for r in self.running)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- one step --------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: dict[Request, int] = {}
        spec: dict[str, list[int]] = {}
        copies: list[tuple[int, int]] = []
        preempted = False

        # A large batch has no compute to spare for verifying drafts.
        limit = self.config.spec_disable_by_batch_size
        speculate = limit is None or self.num_running < limit
        # Decodes first, then running prefills; both in priority order.
        decodes = [r for r in self.running if r.num_tokens_target - r.num_computed_tokens == 1]
        prefills = [r for r in self.running if r.num_tokens_target - r.num_computed_tokens > 1]
        for request in decodes + prefills:
            if budget == 0:
                break
            if request.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(request.num_tokens_target - request.num_computed_tokens, budget)
            num_drafts = self._num_drafts(request, budget - num_new) if speculate else 0
            while not self.blocks.allocate(request, num_new + num_drafts, copies):
                if num_drafts:
                    num_drafts = 0  # no room for guesses: decode plainly before preempting anyone
                    continue
                victim = self.running[-1]
                budget += scheduled.pop(victim, 0)
                spec.pop(victim.request_id, None)
                # The victim's blocks go back to the pool: drop its pending copies.
                copies[:] = [c for c in copies if c[1] not in victim.block_table]
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            else:
                scheduled[request] = num_new + num_drafts
                budget -= num_new + num_drafts
                if num_drafts:
                    spec[request.request_id] = request.spec_token_ids[:num_drafts]

        # Admit waiting requests; not after a preemption, which means the pool
        # is already too small for what runs.
        lora_blocked: list[_WaitingEntry] = []  # passed over for want of an adapter slot
        strict = False  # one of them ran out of patience: only base-model requests pass
        while self.waiting and budget > 0 and not preempted:
            request = self.waiting[0].request
            if self.num_running + request.num_seats > self.config.max_num_seqs:
                break
            if not self._lora_fits(request, strict):
                lora_blocked.append(heapq.heappop(self.waiting))
                waits = self._lora_waits[request.request_id] = self._lora_waits.get(request.request_id, 0) + 1
                strict = strict or waits > LORA_PATIENCE_STEPS
                continue
            self._lora_waits.pop(request.request_id, None)
            hits = self.blocks.lookup_prefix(request)
            num_cached = len(hits) * self.block_size
            num_new = min(request.num_tokens_target - num_cached, budget)
            if not self.blocks.allocate(request, num_new, copies, hits):
                break
            heapq.heappop(self.waiting)
            if self.config.enable_prefix_caching:
                self.stats.prefix_cache_queries += request.num_tokens
                self.stats.prefix_cache_hits += num_cached
            request.num_cached_tokens = num_cached
            request.status = RequestStatus.RUNNING
            bisect.insort(self.running, request, key=lambda r: r.sort_key)
            scheduled[request] = num_new
            budget -= num_new

        for entry in lora_blocked:
            heapq.heappush(self.waiting, entry)
        order = {id(r): i for i, r in enumerate(self.running)}
        batch = sorted(scheduled.items(), key=lambda item: order[id(item[0])])
        finished, self._finished_ids = self._finished_ids, []
        return SchedulerOutput(batch, copies, finished, self.config.max_num_batched_tokens - budget, spec)

    def _num_drafts(self, request: Request, budget: int) -> int:
        """How many of a request's draft tokens to verify this step: none while
        it computes more than its last token, and no more than
        num_speculative_tokens, the budget, max_model_len (the positions) and
        max_tokens (what it may emit) allow."""
        if not request.spec_token_ids or request.num_tokens_target - request.num_computed_tokens != 1:
            return 0
        limit = min(len(request.spec_token_ids), self.config.num_speculative_tokens, budget,
                    self.config.max_model_len - request.num_tokens)
        max_tokens = request.params.max_tokens
        if max_tokens is not None:
            # A step emits at most the accepted drafts and one token more.
            limit = min(limit, max_tokens - request.num_output_tokens - 1)
        return max(limit, 0)

    def _lora_fits(self, request: Request, strict: bool) -> bool:
        """Whether admitting `request` keeps the running adapters within `max_loras`
        (never, when `strict`, for an adapter's request)."""
        if request.lora_name is None:
            return True
        if strict:
            return False
        running = {r.lora_name for r in self.running if r.lora_name is not None}
        return request.lora_name in running or len(running) < self.config.max_loras

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.block_manager.free(request.block_table)
        request.block_table = []
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.stats.num_preemptions += 1
        heapq.heappush(self.waiting, _WaitingEntry(request.sort_key, request))

    # ---- after the model ran ---------------------------------------------------
    def update(
        self, output: SchedulerOutput, sampled: dict[str, list[int]],
        draft_token_ids: dict[str, list[int]] | None = None,
    ) -> dict[str, list[int]]:
        """Advance computed counts, append the sampled tokens (a speculating
        request's accepted drafts and the token after them), finish requests
        that hit a token-level stop, and hand each request its next drafts.
        Returns request id -> the tokens appended, for those that got any:
        a stop inside an accepted run drops the tokens after it."""
        appended: dict[str, list[int]] = {}
        for request, num_new in output.scheduled:
            if request.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            token_ids = sampled.get(request.request_id, [])
            num_drafts = len(output.spec_token_ids.get(request.request_id, ()))
            if num_drafts:
                num_accepted = len(token_ids) - 1
                self.stats.spec_decode.observe(num_drafts, num_accepted)
                request.num_draft_tokens += num_drafts
                request.num_accepted_tokens += num_accepted
                request.spec_off = not keeps_speculating(request.num_draft_tokens, request.num_accepted_tokens)
                num_new -= num_drafts - num_accepted  # the rejected drafts' KV is garbage
            if request.num_computed_tokens < request.num_prompt_tokens:
                self.stats.prompt_tokens_computed += min(num_new, request.num_prompt_tokens - request.num_computed_tokens)
            request.num_computed_tokens += num_new
            self.blocks.free_uncomputed(request)
            # Appended before the blocks are hashed: accepted drafts are computed tokens already.
            token_ids, status = append_tokens(request, token_ids, self.config.max_model_len)
            self.blocks.cache_full_blocks(request)
            if request.pending_samples and request.num_computed_tokens == request.num_tokens_target:
                self._fork(request)
            if token_ids:
                appended[request.request_id] = token_ids
            if status is not None:
                self.finish_request(request.request_id, status)
            elif draft_token_ids is not None:
                request.spec_token_ids = [] if request.spec_off else draft_token_ids.get(request.request_id, [])
        return appended

    def _fork(self, leader: Request) -> None:
        for sample in leader.pending_samples:
            self.blocks.share(leader, sample)
            sample.status = RequestStatus.RUNNING
            bisect.insort(self.running, sample, key=lambda r: r.sort_key)
        leader.pending_samples = []
