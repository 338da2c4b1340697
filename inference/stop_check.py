"""Token-level stops: appending a step's tokens to a request until one ends it.

The scheduler's own part (it alone calls this, and so it alone mutates
requests), as vLLM's scheduler keeps its `check_stop` beside it.

Invariants: tokens are appended one at a time, each checked as if it came
from its own step, so a speculating request's accepted run stops exactly
where decoding token by token would; a structured request's matcher has
accepted exactly its output tokens, and a token it refuses is not appended.
"""

from __future__ import annotations

from inference.request import Request, RequestStatus


def append_tokens(request: Request, token_ids: list[int], max_model_len: int) -> tuple[list[int], RequestStatus | None]:
    """Append `token_ids` until one ends the request: the tokens appended, and
    how it ends (None: it goes on)."""
    for count, token_id in enumerate(token_ids):
        if request.grammar is not None and not request.grammar.accept_token(token_id):
            return token_ids[:count], RequestStatus.FINISHED_GRAMMAR
        request.token_ids.append(token_id)
        status = check_stop(request, token_id, max_model_len)
        if status is None and request.grammar is not None and request.grammar.is_terminated():
            status = RequestStatus.FINISHED_STOPPED  # complete, even where EOS is ignored
        if status is not None:
            return token_ids[: count + 1], status
    return token_ids, None


def check_stop(request: Request, token_id: int, max_model_len: int) -> RequestStatus | None:
    """How `token_id`, just appended, ends the request, or None."""
    params = request.params
    num_output = request.num_output_tokens
    if num_output >= params.min_tokens:
        if not params.ignore_eos and token_id in request.eos_token_ids:
            request.stop_reason = None
            return RequestStatus.FINISHED_STOPPED
        if token_id in params.stop_token_ids:
            request.stop_reason = token_id
            return RequestStatus.FINISHED_STOPPED
    if params.max_tokens is not None and num_output >= params.max_tokens:
        return RequestStatus.FINISHED_LENGTH
    if request.num_tokens >= max_model_len:
        return RequestStatus.FINISHED_LENGTH
    return None
