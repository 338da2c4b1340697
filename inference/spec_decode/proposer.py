"""What the model runner asks of a proposer, whatever the method: one call
per step, so it never needs to know which method runs.

`propose` gets the requests that speculate after this step, each with the
tokens it emits in it (not yet appended: the scheduler appends them after
the step), and the ids of the requests finished or aborted since the last
step, whether or not they ever speculated; it returns one draft (maybe
empty) per request. A proposer that keeps per-request state (suffix) drops
it for the finished ids; the n-gram one keeps none.

Invariant: proposers read requests and never change them. Only rank 0
(which verifies) has a proposer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from inference.spec_decode.config import SpeculativeConfig
from inference.spec_decode.ngram import NgramProposer

if TYPE_CHECKING:
    from inference.request import Request


class Proposer(Protocol):
    def propose(
        self, speculating: list[tuple[Request, list[int]]], finished_request_ids: list[str]
    ) -> list[list[int]]: ...


def build_proposer(config: SpeculativeConfig) -> Proposer:
    """The proposer of a served method (`SpeculativeConfig.check_served` passed)
    that needs no model (the runner builds the draft model's: draft_model.py)."""
    if config.method == "ngram":
        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max, config.num_speculative_tokens)
    # Imported only when asked for: arctic-inference is optional (`make arctic-inference`).
    from inference.spec_decode.suffix import SuffixProposer

    return SuffixProposer(config)
