"""The `draft_model` proposer: a smaller model with the target's tokenizer
guesses the next `num_speculative_tokens` tokens greedily, in the same
engine, on its own paged KV cache.

The draft has a block pool of its own (`DraftBlocks`, the same block size
as the target's) and a block table per request; the scheduler's block
manager never sees them. Each step, for the requests that speculate:

1. catch-up: one forward over each request's tokens the draft has not seen
   yet (at first its whole prompt; later the token the target sampled, plus
   any accepted drafts the draft did not run), at most
   `max_num_batched_tokens` tokens in all, so a long prompt catches up over
   several steps, drafting nothing until it is through;
2. the first draft token is the argmax at each caught-up request's last
   position; then `num_speculative_tokens - 1` single-token forwards, each
   feeding the previous draft token, give the rest.

Drafting is greedy, so a draft is a point mass and the target's verification
(verify.py) keeps its output exact, greedy or sampled.

Invariants, per request id:
- `num_computed` tokens of the request have their draft KV in its blocks,
  and they are the request's real tokens; past them, `drafted` holds the
  tokens whose KV the last step wrote speculatively. At the next step the
  ones the target accepted (a prefix) join `num_computed`; the rest are
  overwritten in place, so rejected drafts need no rollback here.
- The blocks cover every position written; state is dropped, and its blocks
  freed, when the request comes back among the finished ids, or to make
  room: first others that did not speculate this step, then the request
  itself (it drafts nothing and starts over later). Short of blocks, a
  request drafts less, never wrongly.
- No position reaches `max_positions` (the smaller of the target's
  `max_model_len` and the draft's own), as the rotary table ends there: a
  request that has that many tokens drafts no more.

With tensor parallelism the draft runs whole on rank 0 alone (which
verifies and proposes), acting as a group of one: it runs no collective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import AutoConfig

from inference.attention import AttentionMetadata
from inference.kv_cache import allocate_kv_cache, kv_cache_bytes
from inference.models import load_model
from inference.parallel import group
from inference.spec_decode.config import SpeculativeConfig

if TYPE_CHECKING:
    from inference.request import Request


@dataclass(slots=True)
class DraftModel:
    """The draft's weights, loaded before the KV budget is measured (they take from it)."""

    model: torch.nn.Module
    hf_config: object
    weight_bytes: int


def load_draft_model(folder: str, dtype: torch.dtype, device: str) -> DraftModel:
    """The whole draft model on this device (never sharded)."""
    hf_config = AutoConfig.from_pretrained(folder)
    with group.acting_as(0, 1):
        model = load_model(folder, hf_config, dtype, device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if device == "cpu":
        weight_bytes += model.pack_cpu_weights()
    return DraftModel(model, hf_config, weight_bytes)


def num_lookahead_blocks(config: SpeculativeConfig, block_size: int, max_num_seqs: int) -> int:
    """Draft blocks beyond the target's count: each running request may write
    its drafts' KV past the target's blocks."""
    return max_num_seqs * (math.ceil(config.num_speculative_tokens / block_size) + 1)


class DraftBlocks:
    """The draft's free block ids: a stack, O(1) each way."""

    def __init__(self, num_blocks: int) -> None:
        self.free = list(range(num_blocks - 1, -1, -1))

    def grow(self, block_table: list[int], num_blocks: int) -> bool:
        """Extend `block_table` to `num_blocks` blocks; False (and unchanged) if the pool is short."""
        need = num_blocks - len(block_table)
        if need > len(self.free):
            return False
        for _ in range(max(need, 0)):
            block_table.append(self.free.pop())
        return True

    def release(self, block_table: list[int]) -> None:
        self.free.extend(block_table)
        block_table.clear()


@dataclass(slots=True)
class _DraftState:
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    drafted: list[int] = field(default_factory=list)  # tokens after num_computed whose KV was written


class DraftModelProposer:
    def __init__(self, draft: DraftModel, config: SpeculativeConfig, num_blocks: int, block_size: int,
                 max_model_len: int, max_num_batched_tokens: int, device: torch.device) -> None:
        self.model = draft.model
        self.num_speculative_tokens = config.num_speculative_tokens
        self.block_size = block_size
        self.max_positions = min(max_model_len, getattr(draft.hf_config, "max_position_embeddings", max_model_len))
        self.max_num_batched_tokens = max_num_batched_tokens
        self.device = device
        self.kv_cache_bytes = kv_cache_bytes(allocate_kv_cache(self.model, num_blocks, block_size))
        self.blocks = DraftBlocks(num_blocks)
        self.states: dict[str, _DraftState] = {}

    def propose(
        self, speculating: list[tuple[Request, list[int]]], finished_request_ids: list[str]
    ) -> list[list[int]]:
        """proposer.Proposer's step."""
        for request_id in finished_request_ids:
            self._drop(request_id)
        drafts: list[list[int]] = [[] for _ in speculating]
        # (index in speculating, state, tokens to feed, first position, drafts wanted after them)
        feeds: list[tuple[int, _DraftState, list[int], int, int]] = []
        budget = self.max_num_batched_tokens
        keep = {request.request_id for request, _ in speculating}
        for i, (request, emitted) in enumerate(speculating):
            if budget == 0:
                break
            tokens = request.token_ids + emitted
            if len(tokens) >= self.max_positions:  # no position left for a draft, maybe not for its tokens
                self._drop(request.request_id)
                continue
            state = self.states.setdefault(request.request_id, _DraftState())
            _accept(state, tokens)
            num_new = min(len(tokens) - state.num_computed, budget)
            done = state.num_computed + num_new == len(tokens)
            num_drafts = min(self.num_speculative_tokens, self.max_positions - len(tokens)) if done else 0
            # Positions written: the new tokens, then every draft but the last.
            end = state.num_computed + num_new + max(num_drafts - 1, 0)
            if not self._room(request.request_id, state, -(-end // self.block_size), keep):
                continue
            feeds.append((i, state, tokens[state.num_computed: state.num_computed + num_new], state.num_computed,
                          num_drafts))
            budget -= num_new
        if feeds:
            with group.acting_as(0, 1):
                self._draft(feeds, drafts)
        return drafts

    def _room(self, request_id: str, state: _DraftState, num_blocks: int, keep: set[str]) -> bool:
        """Blocks for `num_blocks` in the request's table, freeing other requests' state (those not
        speculating this step first) if need be; False, with its own state dropped, if even that fails."""
        while not self.blocks.grow(state.block_table, num_blocks):
            victim = next((rid for rid in self.states if rid not in keep), None)
            if victim is None:
                self._drop(request_id)
                return False
            self._drop(victim)
        return True

    def _drop(self, request_id: str) -> None:
        state = self.states.pop(request_id, None)
        if state is not None:
            self.blocks.release(state.block_table)

    @torch.inference_mode()
    def _draft(self, feeds: list[tuple[int, _DraftState, list[int], int, int]],
               drafts: list[list[int]]) -> None:
        """Catch up every fed request, then draft greedily for those that asked for drafts."""
        next_ids = self._forward([(state, tokens, start) for _, state, tokens, start, _ in feeds])
        going: list[tuple[int, _DraftState, int]] = []  # (index, state, drafts wanted)
        for (i, state, tokens, _, num_drafts), token_id in zip(feeds, next_ids):
            state.num_computed += len(tokens)
            if num_drafts:
                drafts[i].append(token_id)
                going.append((i, state, num_drafts))
        for j in range(1, self.num_speculative_tokens):
            going = [(i, state, n) for i, state, n in going if n > j]
            if not going:
                break
            # Draft j (from 1) sits at position num_computed + j - 1.
            next_ids = self._forward([(state, [drafts[i][-1]], state.num_computed + j - 1) for i, state, _ in going])
            for (i, _, _), token_id in zip(going, next_ids):
                drafts[i].append(token_id)
        for i, state, _, _, _ in feeds:
            state.drafted = drafts[i][:-1]

    def _forward(self, queries: list[tuple[_DraftState, list[int], int]]) -> list[int]:
        """One forward of each (state, tokens, first position), writing their KV; the argmax at each last token."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc = [0]
        seq_lens = []
        for state, tokens, start in queries:
            table = state.block_table
            for position in range(start, start + len(tokens)):
                positions.append(position)
                slots.append(table[position // self.block_size] * self.block_size + position % self.block_size)
            input_ids += tokens
            query_start_loc.append(len(input_ids))
            seq_lens.append(start + len(tokens))
        width = max(len(state.block_table) for state, _, _ in queries)
        tables = [state.block_table + [-1] * (width - len(state.block_table)) for state, _, _ in queries]

        def tensor(values, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

        meta = AttentionMetadata(
            slot_mapping=tensor(slots, torch.int64), block_tables=tensor(tables, torch.int32),
            seq_lens=tensor(seq_lens, torch.int32), query_start_loc=tensor(query_start_loc, torch.int32),
            max_query_len=max(len(tokens) for _, tokens, _ in queries), max_seq_len=max(seq_lens),
        )
        hidden = self.model(tensor(input_ids, torch.int64), tensor(positions, torch.int64), meta)
        last_rows = tensor(query_start_loc[1:], torch.int64) - 1
        return self.model.compute_logits(hidden[last_rows]).argmax(dim=-1).tolist()


def _accept(state: _DraftState, tokens: list[int]) -> None:
    """Move the drafts the target accepted (the longest prefix of `drafted` that `tokens` goes on with) into
    `num_computed`, but never the last token: its logits give the next draft, so it is fed again (its KV
    rewritten as it was). It can match without a verify step: the target may sample what the draft guessed.
    The others' KV is stale, to be overwritten."""
    start = state.num_computed
    num_accepted = 0
    for drafted, token in zip(state.drafted, tokens[start:-1]):
        if drafted != token:
            break
        num_accepted += 1
    state.num_computed += num_accepted
    state.drafted = []
