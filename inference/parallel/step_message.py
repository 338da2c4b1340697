"""One step's runner inputs, as rank 0 sends them to the other ranks.

`StepPlan` is everything a rank needs to run its part of a step: the
prepared batch (already padded to a graph shape if it is one: `use_graph`
with the batch's `num_padded_reqs` and `max_query_len`, 1 for a decode
graph and k + 1 for a verify graph, names the graph every rank replays,
so the header carries the verify choice), the KV block copies, and the
rows whose logits are computed (prompt-logprob ranges, then the sampled
rows), in the order rank 0 computes them, because computing logits gathers
across the ranks.

On the wire it is one int64 array: a fixed header, then the used prefix of
each step buffer. Only the block-table columns the longest sequence reaches
are sent; the receiver fills the rest of those rows with -1, as `prepare` does.
With LoRA on, each token's adapter slot follows, and the adapters rank 0
swapped in this step (`SlotLoad`s: slot, id, name, folder) trail as UTF-8
JSON, padded to whole int64s; the header gives its byte length.

Invariants:
- `decode_step(encode_step(p))` writes into the receiver's `StepBuffers`
  exactly the rows the sender's hold for this batch, then publishes them to
  the device; the plan it returns equals `p`.
- An empty plan (no batch, no copies) is never sent: an empty message means
  "stop" to a worker.
"""

from __future__ import annotations

import json
from dataclasses import astuple, dataclass, field

import numpy as np

from inference.lora.residency import SlotLoad
from inference.step_buffers import StepBatch, StepBuffers

_HEADER = 13  # int64 fields before the arrays
_TOKEN_ARRAYS = ("input_ids", "positions", "slot_mapping")


@dataclass(slots=True)
class StepPlan:
    batch: StepBatch | None  # None: nothing runs the forward this step
    block_copies: list[tuple[int, int]]
    use_graph: bool = False
    prompt_rows: list[tuple[int, int]] = field(default_factory=list)  # (first row, count) per request
    sample_rows: list[int] = field(default_factory=list)
    lora: bool = False  # the batch's `lora_slots` are set (LoRA is on)
    lora_loads: list[SlotLoad] = field(default_factory=list)


def encode_step(buffers: StepBuffers, plan: StepPlan) -> bytes:
    b = plan.batch or StepBatch(0, 0, 0, 0, 0, 0)
    h = buffers.np
    t, r = b.num_padded_tokens, b.num_padded_reqs
    num_cols = min(-(-b.max_seq_len // buffers.block_size), h["block_tables"].shape[1]) if r else 0
    loads = json.dumps([astuple(load) for load in plan.lora_loads]).encode() if plan.lora_loads else b""
    header = np.array([
        plan.batch is not None, b.num_reqs, r, b.num_tokens, t, b.max_query_len, b.max_seq_len,
        num_cols, plan.use_graph, len(plan.prompt_rows), len(plan.sample_rows), plan.lora, len(loads),
    ], dtype=np.int64)
    parts = [header, *(h[name][:t] for name in _TOKEN_ARRAYS), h["seq_lens"][:r], h["query_start_loc"][: r + 1],
             h["block_tables"][:r, :num_cols].ravel(), h["lora_slots"][: t if plan.lora else 0],
             np.asarray(plan.block_copies, np.int64).ravel(), np.asarray(plan.prompt_rows, np.int64).ravel(),
             np.asarray(plan.sample_rows, np.int64)]
    arrays = np.concatenate([p.astype(np.int64, copy=False) for p in parts]).tobytes()
    return arrays + loads + b"\0" * (-len(loads) % 8)


def decode_step(buffers: StepBuffers, data: bytes) -> StepPlan:
    """Write the message's batch into `buffers` (and onto the device) and return its plan."""
    header = np.frombuffer(data, dtype=np.int64, count=_HEADER)
    (has_batch, num_reqs, r, num_tokens, t, max_query_len, max_seq_len, num_cols, use_graph, num_prompt, num_sample,
     lora, loads_len) = (int(v) for v in header)
    loads_start = len(data) - loads_len - (-loads_len % 8)
    values = np.frombuffer(data, dtype=np.int64, count=loads_start // 8)
    loads = [SlotLoad(*load) for load in json.loads(data[loads_start : loads_start + loads_len])] if loads_len else []
    buffers.wait_for_copies()
    h = buffers.np
    pos = _HEADER

    def take(n: int) -> np.ndarray:
        nonlocal pos
        pos += n
        return values[pos - n : pos]

    for name in _TOKEN_ARRAYS:
        h[name][:t] = take(t)
    h["seq_lens"][:r] = take(r)
    h["query_start_loc"][: r + 1] = take(r + 1)
    h["block_tables"][:r, :num_cols] = take(r * num_cols).reshape(r, num_cols)
    h["block_tables"][:r, num_cols:] = -1
    if lora:
        h["lora_slots"][:t] = take(t)
    block_copies = [(int(s), int(d)) for s, d in take(len(values) - pos - 2 * num_prompt - num_sample).reshape(-1, 2)]
    prompt_rows = [(int(s), int(n)) for s, n in take(2 * num_prompt).reshape(-1, 2)]
    sample_rows = take(num_sample).tolist()
    batch = None
    if has_batch:
        batch = StepBatch(num_reqs, r, num_tokens, t, max_query_len, max_seq_len)
        buffers.publish(batch, lora_slots=bool(lora))
    return StepPlan(batch, block_copies, bool(use_graph), prompt_rows, sample_rows, bool(lora), loads)
