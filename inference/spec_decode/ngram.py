"""The `ngram` proposer (prompt lookup): guess that the text repeats itself.

For each request, take the longest suffix of n tokens, n from
`prompt_lookup_max` down to `prompt_lookup_min`, that also occurs earlier in
its tokens (prompt and output so far), and propose the up to
`num_speculative_tokens` tokens that followed its first occurrence. The first,
not the latest: in a loop the latest occurrence overlaps the suffix and has
only a token or two after it, while the first has the most. No match, no
draft.

The search runs on the whole batch at once: the contexts are padded into one
[requests, longest] array (padding -1, never a token id) and each n compares
every window of every row in one NumPy expression.

Invariants: a draft is a slice of its own context, never longer than
`num_speculative_tokens`; the proposer keeps no state between steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

if TYPE_CHECKING:
    from inference.request import Request

_PAD = -1


class NgramProposer:
    def __init__(self, min_n: int, max_n: int, num_speculative_tokens: int) -> None:
        self.min_n = min_n
        self.max_n = max_n
        self.num_speculative_tokens = num_speculative_tokens

    def propose(
        self, speculating: list[tuple[Request, list[int]]], finished_request_ids: list[str]
    ) -> list[list[int]]:
        """proposer.Proposer's step: each request's context is its tokens and what it emits now."""
        return self.drafts([request.token_ids + emitted for request, emitted in speculating])

    def drafts(self, contexts: list[list[int]]) -> list[list[int]]:
        """One draft (maybe empty) per context."""
        if not contexts:
            return []
        lengths = np.fromiter(map(len, contexts), np.int64, len(contexts))
        tokens = np.full((len(contexts), int(lengths.max())), _PAD, np.int64)
        for row, context in enumerate(contexts):
            tokens[row, : len(context)] = context
        starts, sizes = self._longest_matches(tokens, lengths)
        drafts = []
        for context, start, size in zip(contexts, starts.tolist(), sizes.tolist()):
            first = start + size
            drafts.append(context[first : first + self.num_speculative_tokens] if size else [])
        return drafts

    def _longest_matches(self, tokens: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per row, where the first occurrence of its longest matching suffix
        (other than the suffix itself) starts, and its length (0: none)."""
        num_rows, width = tokens.shape
        starts = np.zeros(num_rows, np.int64)
        sizes = np.zeros(num_rows, np.int64)
        for n in range(min(self.max_n, width - 1), self.min_n - 1, -1):
            rows = np.flatnonzero((sizes == 0) & (lengths > n))
            if rows.size == 0:
                continue
            row_lengths = lengths[rows]
            suffix = tokens[rows[:, None], row_lengths[:, None] - n + np.arange(n)]  # [rows, n]
            windows = sliding_window_view(tokens[rows], n, axis=1)  # [rows, width - n + 1, n]
            matches = (windows == suffix[:, None, :]).all(axis=2)
            # An earlier occurrence ends before the suffix starts, so a token follows it.
            matches &= np.arange(width - n + 1)[None, :] < (row_lengths - n)[:, None]
            found = matches.any(axis=1)
            starts[rows[found]] = np.argmax(matches, axis=1)[found]
            sizes[rows[found]] = n
        return starts, sizes
