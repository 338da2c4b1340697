"""Verification: which draft tokens a request keeps.

The target model scores a request's last token and its k draft tokens in one
pass, and the sampler draws one token at each of the k + 1 positions,
position j seeing the output so far plus the first j drafts, exactly as a
step without speculation would see them if those drafts had been sampled
(so penalties, min_tokens, logit_bias, top-k/top-p/min-p and per-request
seeds apply unchanged). `accepted_tokens` then keeps the drafts up to the
first position whose target token differs, and that target token (or, all
accepted, the token after the last draft).

Greedy: the target token is the argmax, so this is the longest matching
prefix plus the target's next token.

Random sampling: this is standard rejection sampling specialised to a
proposer whose distribution is a point mass q = delta(d) on its draft d (as
n-gram lookup and suffix trees are: each drafts one sequence, no sampling). Rejection sampling accepts d with probability
min(1, p(d) / q(d)) = p(d) and, on rejection, draws from the residual
norm(max(p - q, 0)), which is p with d removed and renormalised. One draw
x ~ p, accepting d iff x == d, realises both at once: P(x == d) = p(d), and
given x != d, x ~ p(. | x != d), the residual. The emitted tokens are thus
distributed exactly as without speculation; for a seeded request they are
the very same tokens, since each position draws the sampler's counter-based
noise of (seed, sample, position) whatever the batch or the drafts.

Invariant: the result is never empty and holds at most len(drafts) + 1 tokens.
"""

from __future__ import annotations


def accepted_tokens(draft_token_ids: list[int], target_token_ids: list[int]) -> list[int]:
    """`target_token_ids[j]` is the token sampled after the first j drafts
    (len(draft_token_ids) + 1 of them); the tokens the request emits."""
    for position, draft in enumerate(draft_token_ids):
        if target_token_ids[position] != draft:
            return target_token_ids[: position + 1]
    return target_token_ids
