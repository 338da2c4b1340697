"""The `suffix` proposer: Suffix Decoding (arXiv 2411.04975) on Snowflake's
arctic-inference suffix trees, as vLLM serves it.

The library keeps a tree per active request (its prompt and output so far)
and one global tree of the outputs of the last
`suffix_decoding_max_cached_requests` requests, running ones included. A
draft is the likeliest continuation of the request's last `max_tree_depth`
tokens in whichever of its own tree and the global one scores it higher:
at most `num_speculative_tokens` tokens, at most `max_spec_factor` times
the length of the match, each at least `min_token_prob` likely by the
trees' counts. So a request drafts from what earlier requests answered,
which n-gram lookup (its own tokens only) cannot.

Invariants, per request id: it is started (its prompt in the library) the
first step it speculates, and stopped exactly once, when it comes back among
the finished ids; one that never speculated is never started. While started,
the library holds its output up to what it emits this step: every token a
request appends comes from a step that sampled it, and preemption keeps its
tokens, so adding each step's emitted tokens keeps them in step; a request
that stops speculating is no longer extended, and still stopped when it
finishes. Tokens a stop cuts off the end of the finishing step's run reach
the trees anyway: the model did produce them. The requests are read, never
changed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from arctic_inference.suffix_decoding import SuffixDecodingCache

from inference.spec_decode.config import SpeculativeConfig

if TYPE_CHECKING:
    from inference.request import Request


class SuffixProposer:
    def __init__(self, config: SpeculativeConfig) -> None:
        self.max_tree_depth = config.suffix_decoding_max_tree_depth
        self.num_speculative_tokens = config.num_speculative_tokens
        self.max_spec_factor = config.suffix_decoding_max_spec_factor
        self.min_token_prob = config.suffix_decoding_min_token_prob
        self.cache = SuffixDecodingCache(self.max_tree_depth, config.suffix_decoding_max_cached_requests)

    def propose(
        self, speculating: list[tuple[Request, list[int]]], finished_request_ids: list[str]
    ) -> list[list[int]]:
        """proposer.Proposer's step. Stopping a finished request frees the
        tree of its prompt; its answer stays among the recent responses."""
        active = self.cache.active_requests  # started, not yet stopped
        for request_id in finished_request_ids:
            if request_id in active:
                self.cache.stop_request(request_id)
        return [self._draft(request, emitted) for request, emitted in speculating]

    def _draft(self, request: Request, emitted: list[int]) -> list[int]:
        request_id = request.request_id
        new_tokens = emitted
        if request_id not in self.cache.active_requests:
            self.cache.start_request(request_id, request.prompt_token_ids)
            new_tokens = request.output_token_ids + emitted  # its first sampling step: no output yet, as a rule
        self.cache.add_active_response(request_id, new_tokens)
        # Only the last max_tree_depth tokens can match (the library would cut the rest itself, after a copy).
        context = (request.token_ids[-self.max_tree_depth :] + emitted)[-self.max_tree_depth :]
        draft = self.cache.speculate(
            request_id, context, max_spec_tokens=self.num_speculative_tokens,
            max_spec_factor=self.max_spec_factor, min_token_prob=self.min_token_prob,
        )
        return draft.token_ids
