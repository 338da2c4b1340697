"""Batched sampling with per-request parameters.

Order of operations, as in vLLM: logprobs are taken from the raw model
logits; then logit_bias, the min_tokens ban on stop tokens, repetition /
presence / frequency penalties; then greedy rows take the argmax, and random
rows are scaled by temperature, cut by top-k, top-p and min-p, and sampled.

Sampling uses the exponential race (argmax of p / E with E ~ Exp(1)), which
draws from p exactly. A seeded request draws its E from its own generator,
one draw of vocabulary size per step, so its tokens do not depend on what
else is in the batch. Each step builds its tensors once; work a batch does
not need (penalties, top-k/p, logprobs) is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


LogprobEntry = tuple[float, int, list[int], list[float]]  # chosen lp, its rank, top ids, top lps


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[LogprobEntry | None]  # per row, None where not asked for


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Repetition penalty on prompt and output tokens (vLLM / HF definition);
    presence and frequency penalties on output tokens (OpenAI definition)."""
    vocab = logits.shape[1]
    for i, row in enumerate(rows):
        p = row.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(row.prompt_token_ids) | set(row.output_token_ids)), dtype=torch.long)
            seen = seen[seen < vocab].to(logits.device)
            values = logits[i, seen]
            logits[i, seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and row.output_token_ids:
            out = torch.tensor(row.output_token_ids, dtype=torch.long, device=logits.device)
            counts = torch.zeros(vocab, dtype=logits.dtype, device=logits.device)
            counts.scatter_add_(0, out.clamp(max=vocab - 1), torch.ones_like(out, dtype=logits.dtype))
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's support with -inf. top_k 0 means off."""
    vocab = logits.shape[1]
    if bool((min_p > 0).any()):
        probs = logits.softmax(dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        cut = ranks >= k[:, None]
        probs = sorted_logits.masked_fill(cut, float("-inf")).softmax(dim=-1)
        # Keep a token if the mass before it is < top_p: the top token always stays.
        cut |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
        sorted_logits = sorted_logits.masked_fill(cut, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    return logits


def gather_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, num_top: list[int]) -> list[LogprobEntry]:
    """Per row: the chosen token's logprob and rank (1 = most likely), and the
    row's top-`num_top[row]` tokens with their logprobs."""
    top_values, top_ids = logprobs.topk(max(max(num_top), 1), dim=-1)
    chosen_lp = logprobs.gather(1, chosen[:, None]).squeeze(1)
    ranks = (logprobs > chosen_lp[:, None]).sum(dim=-1) + 1
    top_ids, top_values = top_ids.tolist(), top_values.tolist()
    return [
        (lp, rank, top_ids[j][:n], top_values[j][:n])
        for j, (lp, rank, n) in enumerate(zip(chosen_lp.tolist(), ranks.tolist(), num_top))
    ]


class Sampler:
    def __init__(self, device: str) -> None:
        self.device = device
        self.generators: dict[str, torch.Generator] = {}

    def drop(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.generators.pop(request_id, None)

    def _generator(self, row: SamplingRow) -> torch.Generator:
        gen = self.generators.get(row.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(row.params.seed + row.sample_index)
            self.generators[row.request_id] = gen
        return gen

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        logits = logits.float()
        num_rows = len(rows)
        logprobs = [None] * num_rows
        wants_logprobs = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        raw_logprobs = logits[wants_logprobs].log_softmax(dim=-1) if wants_logprobs else None

        if any(r.params.logit_bias for r in rows) or any(r.params.min_tokens for r in rows):
            logits = logits.clone()
            for i, row in enumerate(rows):
                for token_id, bias in (row.params.logit_bias or {}).items():
                    if token_id < logits.shape[1]:
                        logits[i, token_id] += bias
                if len(row.output_token_ids) < row.params.min_tokens and row.stop_ids:
                    logits[i, list(row.stop_ids)] = float("-inf")
        if any(r.params.repetition_penalty != 1.0 or r.params.presence_penalty or r.params.frequency_penalty for r in rows):
            logits = logits.clone()
            apply_penalties(logits, rows)

        token_ids = logits.argmax(dim=-1)
        random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
        if random_rows:
            index = torch.tensor(random_rows, device=logits.device)
            params = [rows[i].params for i in random_rows]
            temperature = torch.tensor([p.temperature for p in params], device=logits.device)
            scaled = top_k_top_p_min_p(
                logits[index] / temperature[:, None],
                torch.tensor([p.top_k for p in params], device=logits.device),
                torch.tensor([p.top_p for p in params], device=logits.device),
                torch.tensor([p.min_p for p in params], device=logits.device),
            )
            probs = scaled.softmax(dim=-1)
            noise = torch.empty_like(probs).exponential_()
            for j, i in enumerate(random_rows):
                if rows[i].params.seed is not None:
                    noise[j].exponential_(generator=self._generator(rows[i]))
            token_ids[index] = (probs / noise).argmax(dim=-1)

        ids = token_ids.tolist()
        if raw_logprobs is not None:
            chosen = torch.tensor([ids[i] for i in wants_logprobs], device=logits.device)
            entries = gather_logprobs(raw_logprobs, chosen, [rows[i].params.logprobs for i in wants_logprobs])
            for i, entry in zip(wants_logprobs, entries):
                logprobs[i] = entry
        return SamplerOutput(ids, logprobs)
