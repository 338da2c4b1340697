"""Batched sampling with per-request parameters and one device-to-host copy.

Order of operations, as in vLLM: logprobs are taken from the raw model
logits; then the grammar bitmask of structured rows (on a copy, and only on
those rows, so the other rows' logits stay bit-identical), logit_bias and
the min_tokens ban on stop tokens, repetition / presence / frequency
penalties; then greedy rows take the argmax, and random rows are scaled by
temperature, cut by min-p, top-k and top-p, and sampled.

Invariants:
- Every choice of which transforms run is made on the host from the
  SamplingParams, never from device values: a step reads nothing back but its
  result. The per-row parameters go up in at most two host-to-device copies
  (one int64, one float32; pinned and non-blocking on CUDA), and the sampled
  ids, with the logprob columns when a row asks for them, come back in one
  copy (non-blocking into pinned memory, then one event sync on CUDA).
- All transforms run batched over the rows: token id lists (penalties) and
  (token, value) lists (logit_bias, bans) are padded on the host with the id
  `vocab`, scattered into a `vocab + 1`-wide tensor and the spare column is
  dropped, so padding never needs a mask.

Sampling uses the exponential race: with E_i ~ Exp(1) independent,
E_i / p_i ~ Exp(p_i), and the smallest of independent exponentials is the
i-th with probability p_i / sum(p), so argmax(p / E) draws from p exactly.
Unseeded rows take E from the global generator. A seeded row takes E_i =
-log(u_i), u_i = (h + 0.5) / 2**32, h a 32-bit hash of (seed, sample index,
number of output tokens so far, token id): a counter-based stream, so the
i-th token of a seeded request depends on nothing else in the batch, its
order, or the global generator, and needs no per-request state. Treating
the hash words as independent uniform 32-bit integers, u is uniform on the
2**32 midpoints of (0, 1), so the draw is exact up to that 2**-32
resolution. The row part of the hash is folded on the host; the token part
is integer tensor ops on the device, with products below 2**63 so int64
never overflows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from inference.core_protocol import LogprobEntry
from inference.sampling_params import SamplingParams


@dataclass(slots=True)
class SamplingRow:
    """What the sampler needs of one request that samples this step."""

    request_id: str
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    stop_ids: tuple[int, ...]  # banned while output is shorter than min_tokens
    sample_index: int = 0  # the n samples of a seeded request draw different streams
    grammar: Any = None  # the request's GrammarMatcher, for structured output


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[LogprobEntry | None]  # per row, None where not asked for


_MASK32 = 0xFFFFFFFF
_HASH_MULTIPLIER = 0x45D9F3B  # < 2**27: a 32-bit word times it stays far below 2**63


def _mix32(x):
    """32-bit multiply-xorshift hash of a word in [0, 2**32); the same on
    Python ints and int64 tensors, so host and device fold the same way."""
    x = (((x >> 16) ^ x) * _HASH_MULTIPLIER) & _MASK32
    x = (((x >> 16) ^ x) * _HASH_MULTIPLIER) & _MASK32
    return (x >> 16) ^ x


def seed_key(seed: int, sample_index: int, num_output_tokens: int) -> int:
    """The host half of a seeded row's hash (seed taken modulo 2**64)."""
    key = 0x2545F491  # a non-zero start, so seed 0 does not sit on the hash's fixed point 0
    for word in (seed & _MASK32, (seed >> 32) & _MASK32, sample_index, num_output_tokens):
        key = _mix32(key ^ (word & _MASK32))
    return key


def seeded_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exp(1) noise [len(keys), vocab], float32, from the hash of (row key, token id)."""
    token_hash = _mix32(torch.arange(vocab, device=keys.device))
    bits = _mix32(keys[:, None] ^ token_hash)
    # float64: (h + 0.5) / 2**32 is exact there and strictly inside (0, 1).
    uniform = (bits.double() + 0.5) * 2.0**-32
    return uniform.log().neg_().float()


def _counts(token_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Occurrences of each token id per row; `token_ids` is padded with
    `vocab`, whose spare column is dropped."""
    counts = torch.zeros(token_ids.shape[0], vocab + 1, dtype=torch.float32, device=token_ids.device)
    counts.scatter_add_(1, token_ids, torch.ones(token_ids.shape, dtype=torch.float32, device=token_ids.device))
    return counts[:, :vocab]


def apply_penalties(
    logits: torch.Tensor, seen_ids: torch.Tensor | None, output_ids: torch.Tensor | None,
    repetition: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor,
) -> torch.Tensor:
    """Repetition penalty on prompt and output tokens `seen_ids` (vLLM / HF
    definition); presence and frequency penalties on `output_ids` (OpenAI
    definition). Id tensors are [rows, width] padded with the vocabulary
    size; None skips that penalty."""
    vocab = logits.shape[1]
    if seen_ids is not None:
        penalty = repetition[:, None]
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(_counts(seen_ids, vocab) > 0, penalised, logits)
    if output_ids is not None:
        counts = _counts(output_ids, vocab)
        logits = logits - (frequency[:, None] * counts + presence[:, None] * (counts > 0))
    return logits


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask with -inf the tokens less likely than min_p times the top one."""
    probs = logits.softmax(dim=-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask with -inf the tokens outside each row's top-k, then outside the
    smallest prefix whose mass reaches top_p. top_k 0 means off."""
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
    cut = torch.arange(vocab, device=logits.device)[None, :] >= k[:, None]
    probs = sorted_logits.masked_fill(cut, float("-inf")).softmax(dim=-1)
    # Keep a token if the mass before it is < top_p: the top token always stays.
    cut |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    return torch.empty_like(logits).scatter_(1, order, sorted_logits.masked_fill(cut, float("-inf")))


def _logprob_columns(logprobs: torch.Tensor, chosen: torch.Tensor, num_top: int) -> torch.Tensor:
    """[rows, 2 + 2 * num_top] float64: chosen logprob, its rank (1 = most
    likely), top ids, top logprobs. float64 holds the ids exactly."""
    chosen_lp = logprobs.gather(1, chosen[:, None])
    rank = (logprobs > chosen_lp).sum(dim=-1, keepdim=True) + 1
    top_values, top_ids = logprobs.topk(num_top, dim=-1)
    return torch.cat([chosen_lp.double(), rank.double(), top_ids.double(), top_values.double()], dim=1)


def _entry(columns: list[float], n: int, num_top: int) -> LogprobEntry:
    """A row of `_logprob_columns`, cut to the row's own `n` top tokens."""
    top_ids = [int(t) for t in columns[2 : 2 + n]]
    return columns[0], int(columns[1]), top_ids, columns[2 + num_top : 2 + num_top + n]


def _download(packed: torch.Tensor) -> list:
    """The one device-to-host copy of a step, as nested lists."""
    if packed.device.type == "cuda":
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        # An event sync waits for this copy only; sync debug mode does not flag it.
        done = torch.cuda.Event()
        done.record()
        done.synchronize()
        packed = host
    return packed.tolist()


def _upload(arrays: dict[str, np.ndarray], dtype: type[np.number], device: torch.device) -> dict[str, torch.Tensor]:
    """One host-to-device copy of same-dtype arrays, returned as device views."""
    if not arrays:
        return {}
    flat = torch.from_numpy(np.concatenate([a.ravel() for a in arrays.values()]).astype(dtype, copy=False))
    if device.type == "cuda":
        # Pinned and non-blocking: no sync; the pinned block is not reused before the copy ran.
        flat = flat.pin_memory().to(device, non_blocking=True)
    views, start = {}, 0
    for name, array in arrays.items():
        views[name] = flat[start : start + array.size].view(array.shape)
        start += array.size
    return views


def _padded(lists: list[list], fill: float) -> np.ndarray:
    """[rows, longest] array of the lists, padded with `fill`."""
    out = np.full((len(lists), max(max(map(len, lists), default=0), 1)), fill)
    for i, values in enumerate(lists):
        out[i, : len(values)] = values
    return out


def _padded_ids(lists: list[list[int]], vocab: int) -> np.ndarray:
    """Token ids padded with `vocab`, the spare column; ids outside the logits go there too."""
    return np.minimum(_padded(lists, vocab), vocab)


def gather_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, num_top: list[int]) -> list[LogprobEntry]:
    """Per row: the chosen token's logprob and rank (1 = most likely), and the
    row's top-`num_top[row]` tokens with their logprobs; one host copy."""
    width = max(num_top, default=0)
    host = _download(_logprob_columns(logprobs, chosen, width))
    return [_entry(columns, n, width) for columns, n in zip(host, num_top)]


def _logit_edits(row: SamplingRow) -> dict[int, float]:
    """token id -> what to add to its logit: the logit_bias, and -inf for the
    stop ids while the output is shorter than min_tokens."""
    edits = dict(row.params.logit_bias or {})
    if len(row.output_token_ids) < row.params.min_tokens:
        edits.update(dict.fromkeys(row.stop_ids, float("-inf")))
    return edits


class Sampler:
    def __init__(self, device: str) -> None:
        self.device = torch.device(device)

    def _host_params(self, rows: list[SamplingRow], vocab: int) -> tuple[dict, dict]:
        """The int64 and float32 per-row arrays of the transforms this batch
        needs, by name; a row a transform does not apply to gets its no-op."""
        params = [r.params for r in rows]
        ints: dict[str, np.ndarray] = {}
        floats: dict[str, np.ndarray] = {}
        edits = [_logit_edits(r) for r in rows]
        if any(edits):
            ints["edit_ids"] = _padded_ids([list(e) for e in edits], vocab)
            floats["edit_values"] = _padded([list(e.values()) for e in edits], 0.0)
        if any(p.repetition_penalty != 1.0 for p in params):
            seen = [r.prompt_token_ids + r.output_token_ids if r.params.repetition_penalty != 1.0 else []
                    for r in rows]
            ints["seen_ids"] = _padded_ids(seen, vocab)
            floats["repetition"] = np.array([p.repetition_penalty for p in params])
        if any(p.presence_penalty or p.frequency_penalty for p in params):
            output = [r.output_token_ids if r.params.presence_penalty or r.params.frequency_penalty else []
                      for r in rows]
            ints["output_ids"] = _padded_ids(output, vocab)
            floats["presence"] = np.array([p.presence_penalty for p in params])
            floats["frequency"] = np.array([p.frequency_penalty for p in params])
        random = [p for p in params if not p.greedy]
        if random:
            floats["temperature"] = np.array([p.temperature for p in params])
            if any(p.min_p > 0 for p in random):
                floats["min_p"] = np.array([0.0 if p.greedy else p.min_p for p in params])
            if any(p.top_k > 0 or p.top_p < 1.0 for p in random):
                ints["top_k"] = np.array([0 if p.greedy else p.top_k for p in params])
                floats["top_p"] = np.array([1.0 if p.greedy else p.top_p for p in params])
            seeded = [i for i, p in enumerate(params) if not p.greedy and p.seed is not None]
            if seeded:
                ints["seeded_rows"] = np.array(seeded)
                ints["seed_keys"] = np.array([
                    seed_key(rows[i].params.seed, rows[i].sample_index, len(rows[i].output_token_ids))
                    for i in seeded
                ])
        return ints, floats

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        raw = logits.float()
        vocab = raw.shape[1]
        ints, floats = self._host_params(rows, vocab)
        t = _upload(ints, np.int64, self.device) | _upload(floats, np.float32, self.device)

        logits = raw
        grammars = {i: r.grammar for i, r in enumerate(rows) if r.grammar is not None}
        if grammars:
            # Imported here: free-text serving never loads xgrammar.
            from inference.structured_output import apply_bitmask, fill_bitmask

            logits = raw.clone()  # raw stays unmasked for the logprobs
            apply_bitmask(logits, fill_bitmask(grammars, len(rows), vocab), list(grammars))
        if "edit_ids" in t:
            edits = torch.zeros(len(rows), vocab + 1, dtype=torch.float32, device=raw.device)
            logits = logits + edits.scatter_add_(1, t["edit_ids"], t["edit_values"])[:, :vocab]
        if "seen_ids" in t or "output_ids" in t:
            logits = apply_penalties(
                logits, t.get("seen_ids"), t.get("output_ids"),
                t.get("repetition"), t.get("presence"), t.get("frequency"),
            )
        token_ids = logits.argmax(dim=-1)
        if "temperature" in t:
            greedy = t["temperature"] == 0
            scaled = logits / torch.where(greedy, 1.0, t["temperature"])[:, None]
            if "min_p" in t:
                scaled = apply_min_p(scaled, t["min_p"])
            if "top_k" in t:
                scaled = apply_top_k_top_p(scaled, t["top_k"], t["top_p"])
            probs = scaled.softmax(dim=-1)
            noise = torch.empty_like(probs).exponential_()
            if "seed_keys" in t:
                noise.index_copy_(0, t["seeded_rows"], seeded_noise(t["seed_keys"], vocab))
            token_ids = torch.where(greedy, token_ids, (probs / noise).argmax(dim=-1))

        wanted = [r.params.logprobs for r in rows]
        if all(n is None for n in wanted):
            return SamplerOutput(_download(token_ids), [None] * len(rows))
        width = max(n or 0 for n in wanted)
        columns = _logprob_columns(raw.log_softmax(dim=-1), token_ids, width)
        host = _download(torch.cat([token_ids[:, None].double(), columns], dim=1))
        return SamplerOutput(
            [int(c[0]) for c in host],
            [None if n is None else _entry(c[1:], n, width) for c, n in zip(host, wanted)],
        )
