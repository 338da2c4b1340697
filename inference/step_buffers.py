"""Persistent step inputs: device tensors sized once, filled each step.

Every tensor a forward pass reads (`input_ids`, `positions`, `slot_mapping`,
`seq_lens`, `query_start_loc`, `block_tables`, `lora_slots`, the decode
attention kernel's split workspace) and the rows to sample (`logits_indices`) live in buffers
allocated at start-up from the scheduler's limits, so no step allocates step
data on the device and a captured CUDA graph reads the same addresses on
every replay.

Each step writes host staging buffers with vectorised NumPy (pinned memory on
CUDA), then copies the used prefix of each to the device without blocking.

Invariants:
- `max_num_tokens >= max_num_seqs`, so a decode batch padded up to its graph
  bucket always fits (the runner sizes it for its verify graphs too).
- A staging buffer is rewritten only after the copies from it have run: each
  copy records an event that the next write waits for. A step that samples
  nothing does not read anything back, so nothing else would order them.
- Rows of `block_tables` hold the request's block ids, then -1; padding rows
  (`pad`) point at the runner's scratch block with `seq_len` 1, write their
  key and value to its slot 0, and are never sampled. A batch padded to a
  verify graph's token count has padding tokens past the padding rows that
  belong to no row (past `query_start_loc[num_padded_reqs]`): they too
  write only the scratch block's slot 0, and attention skips them.
- `lora_slots` holds each token's LoRA adapter slot, 0 for the base model
  and for padding; with LoRA on it is written every step (a captured decode
  graph reads it on replay), with LoRA off never.
- On the CPU the device tensors are the staging tensors themselves.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from inference.attention import AttentionMetadata
from inference.request import Request


@dataclass(slots=True)
class StepBatch:
    """What one prepared step holds, besides the buffers themselves."""

    num_reqs: int  # real requests
    num_padded_reqs: int  # rows the forward runs (>= num_reqs when padded to a bucket)
    num_tokens: int  # real tokens
    num_padded_tokens: int
    max_query_len: int
    max_seq_len: int


class StepBuffers:
    def __init__(
        self, max_num_tokens: int, max_num_reqs: int, max_blocks_per_seq: int, block_size: int,
        scratch_block_id: int, device: torch.device, decode_workspace: torch.Tensor | None = None,
        max_num_logits: int | None = None,
    ) -> None:
        assert max_num_tokens >= max_num_reqs, "a padded decode batch must fit the token buffers"
        self.block_size = block_size
        self.scratch_block_id = scratch_block_id
        self.device = device
        self.decode_workspace = decode_workspace
        pin = device.type == "cuda"

        def host(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, pin_memory=pin)

        self._host = {
            "input_ids": host(max_num_tokens, dtype=torch.int64),
            "positions": host(max_num_tokens, dtype=torch.int64),
            "slot_mapping": host(max_num_tokens, dtype=torch.int64),
            "seq_lens": host(max_num_reqs, dtype=torch.int32),
            "query_start_loc": host(max_num_reqs + 1, dtype=torch.int32),
            # One row per request, or with speculative decoding one per draft token too.
            "logits_indices": host(max_num_logits or max_num_reqs, dtype=torch.int64),
            "block_tables": host(max_num_reqs, max_blocks_per_seq, dtype=torch.int32),
            "lora_slots": host(max_num_tokens, dtype=torch.int32),
        }
        self._host["block_tables"].fill_(-1)
        self.np = {name: t.numpy() for name, t in self._host.items()}
        self._copied = torch.cuda.Event() if device.type == "cuda" else None
        self.gpu = {
            name: t if device.type == "cpu" else torch.zeros_like(t, device=device)
            for name, t in self._host.items()
        }

    def prepare(
        self, scheduled: list[tuple[Request, int]], num_padded_reqs: int,
        spec_token_ids: dict[str, list[int]] | None = None, graph_query_len: int | None = None,
    ) -> StepBatch:
        """Fill the host buffers for these (request, num_new_tokens) pairs and
        copy them to the device; rows num_reqs..num_padded_reqs-1 are padding
        of one token each. A request with drafts in `spec_token_ids` runs them
        after its own tokens (its num_new_tokens counts them). With
        `graph_query_len` (a graph's shape) the batch has num_padded_reqs *
        graph_query_len tokens, the last ones in no row, and that `max_query_len`."""
        spec_token_ids = spec_token_ids or {}
        self.wait_for_copies()
        h = self.np
        bs = self.block_size
        num_reqs = len(scheduled)
        starts = np.fromiter((r.num_computed_tokens for r, _ in scheduled), np.int64, num_reqs)
        num_new = np.fromiter((n for _, n in scheduled), np.int64, num_reqs)
        ends = starts + num_new
        qsl = h["query_start_loc"]
        qsl[0] = 0
        np.cumsum(num_new, out=qsl[1 : num_reqs + 1])
        num_tokens = int(qsl[num_reqs])

        tables = h["block_tables"]
        for i, (request, _) in enumerate(scheduled):
            table = request.block_table
            tables[i, : len(table)] = table
            tables[i, len(table) :] = -1
        h["input_ids"][:num_tokens] = list(
            itertools.chain.from_iterable(
                r.token_ids[s:e] + spec_token_ids.get(r.request_id, []) for (r, _), s, e in zip(scheduled, starts, ends)
            )
        )
        rows = np.repeat(np.arange(num_reqs), num_new)
        positions = np.arange(num_tokens) + np.repeat(starts - qsl[:num_reqs], num_new)
        h["positions"][:num_tokens] = positions
        h["slot_mapping"][:num_tokens] = tables[rows, positions // bs].astype(np.int64) * bs + positions % bs
        h["seq_lens"][:num_reqs] = ends

        num_pad = num_padded_reqs - num_reqs
        num_padded_tokens = num_padded_reqs * graph_query_len if graph_query_len else num_tokens + num_pad
        assert num_padded_tokens >= num_tokens + num_pad, "the graph shape is too small for the batch"
        if num_pad:
            pad_rows = slice(num_reqs, num_padded_reqs)
            qsl[num_reqs + 1 : num_padded_reqs + 1] = np.arange(num_tokens + 1, num_tokens + num_pad + 1)
            tables[pad_rows] = -1
            tables[pad_rows, 0] = self.scratch_block_id
            h["seq_lens"][pad_rows] = 1
        pad_tokens = slice(num_tokens, num_padded_tokens)  # the padding rows' tokens, then any in no row
        h["input_ids"][pad_tokens] = 0
        h["positions"][pad_tokens] = 0
        h["slot_mapping"][pad_tokens] = self.scratch_block_id * bs

        batch = StepBatch(
            num_reqs, num_padded_reqs, num_tokens, num_padded_tokens,
            # `initial`: a batch of padding alone (graph capture) has no real row.
            max_query_len=graph_query_len or int(num_new.max(initial=1)), max_seq_len=int(ends.max(initial=1)),
        )
        self.publish(batch)
        return batch

    def publish(self, batch: StepBatch, lora_slots: bool = False) -> None:
        """Copy the batch's rows of the host buffers to the device (after
        `prepare`, or after a tensor-parallel rank wrote them from rank 0's,
        `lora_slots` included when LoRA is on)."""
        if lora_slots:
            self._copy("lora_slots", batch.num_padded_tokens)
        self._copy("input_ids", batch.num_padded_tokens)
        self._copy("positions", batch.num_padded_tokens)
        self._copy("slot_mapping", batch.num_padded_tokens)
        self._copy("seq_lens", batch.num_padded_reqs)
        self._copy("query_start_loc", batch.num_padded_reqs + 1)
        self._copy("block_tables", batch.num_padded_reqs)

    def set_logits_indices(self, rows: list[int]) -> torch.Tensor:
        """Token rows whose logits are sampled, as a device tensor view."""
        self.wait_for_copies()
        self.np["logits_indices"][: len(rows)] = rows
        self._copy("logits_indices", len(rows))
        return self.gpu["logits_indices"][: len(rows)]

    def set_lora_slots(self, request_slots: np.ndarray, batch: StepBatch) -> None:
        """Spread each request's adapter slot over its tokens (padding: 0)."""
        self.wait_for_copies()
        qsl = self.np["query_start_loc"]
        slots = self.np["lora_slots"]
        slots[: batch.num_tokens] = np.repeat(request_slots, np.diff(qsl[: batch.num_reqs + 1]))
        slots[batch.num_tokens : batch.num_padded_tokens] = 0
        self._copy("lora_slots", batch.num_padded_tokens)

    def lora_slots(self, batch: StepBatch) -> tuple[torch.Tensor, np.ndarray]:
        """The batch's per-token adapter slots: the device view, and the host copy."""
        t = batch.num_padded_tokens
        return self.gpu["lora_slots"][:t], self.np["lora_slots"][:t]

    def _copy(self, name: str, num_rows: int) -> None:
        if self._copied is not None:
            self.gpu[name][:num_rows].copy_(self._host[name][:num_rows], non_blocking=True)
            self._copied.record()

    def wait_for_copies(self) -> None:
        """Call before writing the host buffers."""
        if self._copied is not None:
            self._copied.synchronize()  # returns at once unless a copy is still queued

    def metadata(self, batch: StepBatch, max_seq_len: int | None = None) -> AttentionMetadata:
        """Views of the device buffers for this batch. A captured graph passes
        a fixed `max_seq_len` bound (its grids must not depend on the step)."""
        g = self.gpu
        n, t = batch.num_padded_reqs, batch.num_padded_tokens
        return AttentionMetadata(
            slot_mapping=g["slot_mapping"][:t],
            block_tables=g["block_tables"][:n],
            seq_lens=g["seq_lens"][:n],
            query_start_loc=g["query_start_loc"][: n + 1],
            max_query_len=batch.max_query_len,
            max_seq_len=batch.max_seq_len if max_seq_len is None else max_seq_len,
            decode_workspace=self.decode_workspace,
        )

    def inputs(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
        t = batch.num_padded_tokens
        return self.gpu["input_ids"][:t], self.gpu["positions"][:t]
