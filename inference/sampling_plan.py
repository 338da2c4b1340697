"""Which rows of a step's forward get logits, and what each request emits.

The runner's two ends of a step, apart from the forward: before it, the
rows to sample (a request that finishes its tokens this step samples at its
last position, and one verifying k drafts at those k + 1 positions, position
j seeing the first j drafts as output) and the prompt-logprobs ranges; after
it, the tokens each request emits (the drafts the target agrees with, then
the target's own), their logprobs, and the proposer's next drafts.

Invariants: requests are only read here; rows are in batch order, a
request's k + 1 verify rows consecutive; what a request emits is a prefix of
its drafts plus exactly one sampled token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from inference.core_protocol import LogprobEntry
from inference.parallel.step_message import StepPlan
from inference.request import Request
from inference.sampler import SamplerOutput, SamplingRow, gather_logprobs
from inference.spec_decode.proposer import Proposer
from inference.spec_decode.verify import accepted_tokens


@dataclass(slots=True)
class RunnerOutput:
    request_ids: list[str]  # the requests that sampled, in batch order
    token_ids: list[list[int]]  # per request: the tokens it emits (its accepted drafts, then the target's)
    logprobs: list[list[LogprobEntry] | None]  # per request, of those tokens; None where not asked for
    # request id -> (first prompt position predicted, entries) for requests
    # that asked for prompt logprobs and computed prompt tokens this step
    prompt_logprobs: dict[str, tuple[int, list[LogprobEntry]]] = field(default_factory=dict)
    # request id -> the drafts its next step verifies; None when speculation is off
    draft_token_ids: dict[str, list[int]] | None = None


def plan_logits(
    scheduled: list[tuple[Request, int]], spec_token_ids: dict[str, list[int]], query_start_loc: np.ndarray,
    plan: StepPlan,
) -> tuple[list[SamplingRow], list[tuple[Request, list[int]]], list[tuple[Request, int]]]:
    """Fill the plan's logits rows; return the rows to sample, the (request,
    drafts) they belong to, and the (request, first position) of each
    prompt-logprobs range."""
    rows: list[SamplingRow] = []
    groups: list[tuple[Request, list[int]]] = []
    prompt_requests: list[tuple[Request, int]] = []
    for i, (request, num_new) in enumerate(scheduled):
        start = request.num_computed_tokens
        end = start + num_new
        # Position p's logits predict prompt token p + 1.
        num_prompt_rows = min(end, request.num_prompt_tokens - 1) - start
        if request.params.prompt_logprobs is not None and num_prompt_rows > 0:
            plan.prompt_rows.append((int(query_start_loc[i]), num_prompt_rows))
            prompt_requests.append((request, start))
        drafts = spec_token_ids.get(request.request_id, [])
        if end == request.num_tokens + len(drafts):
            first_row = int(query_start_loc[i + 1]) - 1 - len(drafts)
            stop_ids = request.eos_token_ids + tuple(request.params.stop_token_ids)
            output_token_ids = request.output_token_ids
            for j in range(len(drafts) + 1):
                plan.sample_rows.append(first_row + j)
                rows.append(SamplingRow(
                    request.request_id, request.params, request.prompt_token_ids,
                    output_token_ids + drafts[:j], stop_ids, request.sample_index, request.grammar,
                ))
            groups.append((request, drafts))
    return rows, groups, prompt_requests


def emitted(
    sampled: SamplerOutput, groups: list[tuple[Request, list[int]]],
    prompt_logprobs: dict[str, tuple[int, list[LogprobEntry]]], proposer: Proposer | None,
    finished_request_ids: list[str],
) -> RunnerOutput:
    """Per request, the tokens it emits (verified against its drafts) with
    their logprobs, and the drafts its next step verifies (the proposer
    hears of the finished requests every step, even one that samples nothing)."""
    token_ids: list[list[int]] = []
    logprobs: list[list[LogprobEntry] | None] = []
    first = 0
    for _, drafts in groups:
        end = first + len(drafts) + 1
        tokens = accepted_tokens(drafts, sampled.token_ids[first:end])
        token_ids.append(tokens)
        # Row j's entry scores the token sampled there: the accepted one.
        entries = sampled.logprobs[first : first + len(tokens)]
        logprobs.append(None if entries[0] is None else entries)
        first = end
    draft_token_ids = None
    if proposer is not None:
        speculating = [(r, t) for (r, _), t in zip(groups, token_ids) if not r.spec_off and r.grammar is None]
        proposals = proposer.propose(speculating, finished_request_ids)
        draft_token_ids = {r.request_id: draft for (r, _), draft in zip(speculating, proposals)}
    return RunnerOutput([r.request_id for r, _ in groups], token_ids, logprobs, prompt_logprobs, draft_token_ids)


def prompt_logprobs(
    prompt_logits: list[torch.Tensor], prompt_requests: list[tuple[Request, int]]
) -> dict[str, tuple[int, list[LogprobEntry]]]:
    """request id -> (first position predicted, its prompt logprobs entries)."""
    result = {}
    for logits, (request, first_pos) in zip(prompt_logits, prompt_requests):
        count = logits.shape[0]
        logprobs = logits.float().log_softmax(dim=-1)
        targets = torch.tensor(request.token_ids[first_pos + 1 : first_pos + count + 1]).to(logits.device)
        entries = gather_logprobs(logprobs, targets, [request.params.prompt_logprobs] * count)
        result[request.request_id] = (first_pos, entries)
    return result
