"""Counters of speculative decoding, and when a request stops speculating.

Pure data (the scheduler imports it; no torch). The counters are vLLM's:
a draft is one request's guesses verified in one step; `num_accepted_tokens_per_pos[i]`
counts drafts whose guess at position i was accepted, so it never grows
past `num_drafts` and sums to `num_accepted_tokens`.

Auto-off: a request whose guesses are mostly wrong pays for verifying them
every step and gains nothing, so once it has drafted `AUTO_OFF_MIN_DRAFT_TOKENS`
tokens with an acceptance rate under `AUTO_OFF_ACCEPTANCE_RATE` it decodes
plainly until it finishes. The output is the same either way; only speed changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Enough guesses that one unlucky stretch does not switch a request off.
AUTO_OFF_MIN_DRAFT_TOKENS = 32
# Verifying k + 1 tokens costs well under k + 1 single-token steps but more
# than one; below this share of accepted guesses it stops paying off.
AUTO_OFF_ACCEPTANCE_RATE = 0.2


@dataclass(slots=True)
class SpecDecodeStats:
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)

    def observe(self, num_draft_tokens: int, num_accepted_tokens: int) -> None:
        """One draft of `num_draft_tokens` guesses, of which the first `num_accepted_tokens` were taken."""
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted_tokens
        per_pos = self.num_accepted_tokens_per_pos
        if len(per_pos) < num_draft_tokens:
            per_pos.extend([0] * (num_draft_tokens - len(per_pos)))
        for pos in range(num_accepted_tokens):
            per_pos[pos] += 1


def keeps_speculating(num_draft_tokens: int, num_accepted_tokens: int) -> bool:
    """Whether a request with these totals should go on drafting."""
    if num_draft_tokens < AUTO_OFF_MIN_DRAFT_TOKENS:
        return True
    return num_accepted_tokens >= AUTO_OFF_ACCEPTANCE_RATE * num_draft_tokens
