"""Sampler against direct definitions of each transform."""

from __future__ import annotations

import torch

from inference.sampler import Sampler, SamplingRow, apply_penalties, top_k_top_p_min_p
from inference.sampling_params import SamplingParams

VOCAB = 50


def row(rid="r", output=(), prompt=(1, 2), stop_ids=(0,), index=0, **kw) -> SamplingRow:
    return SamplingRow(rid, SamplingParams(**kw), list(prompt), list(output), stop_ids, index)


def support(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


def test_top_k_top_p_min_p_supports_match_reference():
    torch.manual_seed(0)
    logits = torch.randn(1, VOCAB) * 3
    probs = logits.softmax(-1)[0]
    order = probs.argsort(descending=True).tolist()
    for k in (1, 5, 20):
        got = top_k_top_p_min_p(logits, torch.tensor([k]), torch.tensor([1.0]), torch.tensor([0.0]))
        assert support(got[0]) == set(order[:k])
    for p in (0.1, 0.5, 0.9):
        # smallest prefix of the sorted distribution whose mass reaches p
        mass, keep = 0.0, []
        for t in order:
            keep.append(t)
            mass += probs[t].item()
            if mass >= p:
                break
        got = top_k_top_p_min_p(logits, torch.tensor([0]), torch.tensor([p]), torch.tensor([0.0]))
        assert support(got[0]) == set(keep)
    for m in (0.05, 0.3):
        got = top_k_top_p_min_p(logits, torch.tensor([0]), torch.tensor([1.0]), torch.tensor([m]))
        assert support(got[0]) == {t for t in range(VOCAB) if probs[t] >= m * probs.max()}


def test_penalties_follow_definitions():
    logits = torch.linspace(-2, 2, VOCAB)[None].repeat(2, 1)
    rows = [row(output=[40, 40, 3], prompt=[10], repetition_penalty=2.0),
            row(output=[40, 40, 3], presence_penalty=0.5, frequency_penalty=0.25)]
    expected = logits.clone()
    for t in (10, 40, 3):  # repetition: prompt and output tokens, divide positives, multiply negatives
        v = expected[0, t]
        expected[0, t] = v / 2.0 if v > 0 else v * 2.0
    expected[1, 40] -= 0.25 * 2 + 0.5  # frequency * count + presence
    expected[1, 3] -= 0.25 * 1 + 0.5
    apply_penalties(logits, rows)
    torch.testing.assert_close(logits, expected)


def test_seeded_sampling_is_identical_alone_and_in_a_batch():
    torch.manual_seed(1)
    logits = torch.randn(6, VOCAB)
    sampler = Sampler("cpu")
    seq_alone, seq_batch = [], []
    solo = Sampler("cpu")
    for _ in range(10):
        seq_alone.append(solo(logits[3:4].clone(), [row("s", seed=42)]).token_ids[0])
        batch = [row(f"o{i}", temperature=1.0) for i in range(6)]
        batch[3] = row("s", seed=42)
        seq_batch.append(sampler(logits.clone(), batch).token_ids[3])
    assert seq_alone == seq_batch
    assert len(set(seq_alone)) > 1  # really random, not argmax


def test_seeded_samples_of_one_request_differ():
    logits = torch.zeros(2, VOCAB)
    out = Sampler("cpu")(logits, [row("a", seed=7, index=0), row("a#1", seed=7, index=1)])
    out2 = Sampler("cpu")(logits, [row("a", seed=7, index=0), row("a#1", seed=7, index=1)])
    assert out.token_ids == out2.token_ids and out.token_ids[0] != out.token_ids[1]


def test_greedy_logit_bias_and_min_tokens():
    logits = torch.zeros(3, VOCAB)
    logits[:, 0] = 5.0  # eos would win
    rows = [row(temperature=0.0), row(temperature=0.0, logit_bias={7: 10.0}),
            row(temperature=0.0, min_tokens=2, output=[4])]
    out = Sampler("cpu")(logits, rows)
    assert out.token_ids[0] == 0 and out.token_ids[1] == 7 and out.token_ids[2] != 0


def test_logprobs_are_raw_log_softmax_with_ranks():
    torch.manual_seed(2)
    logits = torch.randn(2, VOCAB)
    rows = [row(temperature=0.0, logprobs=5), row(temperature=0.0, logprobs=0, logit_bias={9: 100.0})]
    out = Sampler("cpu")(logits, rows)
    ref = logits.log_softmax(-1)
    chosen_lp, rank, top_ids, top_lps = out.logprobs[0]
    assert rank == 1 and abs(chosen_lp - ref[0].max().item()) < 1e-6
    assert top_ids == ref[0].topk(5).indices.tolist()
    torch.testing.assert_close(torch.tensor(top_lps), ref[0].topk(5).values)
    chosen_lp, rank, top_ids, _ = out.logprobs[1]
    assert out.token_ids[1] == 9 and top_ids == []
    assert abs(chosen_lp - ref[1, 9].item()) < 1e-6 and rank == int((ref[1] > ref[1, 9]).sum()) + 1
