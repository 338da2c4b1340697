"""Sampler against direct definitions of each transform, the seeded hash
sampler's reproducibility and distribution, and its one read-back per step."""

from __future__ import annotations

import math

import pytest
import torch

from inference.sampler import (
    Sampler, SamplingRow, _mix32, apply_min_p, apply_penalties, apply_top_k_top_p, gather_logprobs, seed_key,
)
from inference.sampling_params import SamplingParams

VOCAB = 50
# Upper 0.1% points of the chi-square distribution (no scipy here): df -> x.
CHI2_999 = {7: 24.32, 15: 37.70}


def row(rid="r", output=(), prompt=(1, 2), stop_ids=(0,), index=0, **kw) -> SamplingRow:
    return SamplingRow(rid, SamplingParams(**kw), list(prompt), list(output), stop_ids, index)


def support(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


def every_feature_rows() -> list[SamplingRow]:
    return [
        row("g", output=[3], temperature=0.0, logprobs=3, logit_bias={7: 2.5}),
        row("s", output=[4, 4], temperature=0.7, top_k=5, seed=1, repetition_penalty=1.3),
        row("m", output=[5], top_p=0.8, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.3,
            min_tokens=3, stop_ids=(0, 9), logprobs=0),
        row("u", temperature=1.2, top_p=0.9, seed=None, logprobs=5),
    ]


def chi_square(counts: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((counts - expected) ** 2 / expected).sum())


def test_top_k_top_p_min_p_supports_match_reference():
    torch.manual_seed(0)
    logits = torch.randn(1, VOCAB) * 3
    probs = logits.softmax(-1)[0]
    order = probs.argsort(descending=True).tolist()
    for k in (1, 5, 20, VOCAB + 3):
        got = apply_top_k_top_p(logits, torch.tensor([k]), torch.tensor([1.0]))
        assert support(got[0]) == set(order[:k])
    for p in (0.1, 0.5, 0.9):
        # smallest prefix of the sorted distribution whose mass reaches p
        mass, keep = 0.0, []
        for t in order:
            keep.append(t)
            mass += probs[t].item()
            if mass >= p:
                break
        got = apply_top_k_top_p(logits, torch.tensor([0]), torch.tensor([p]))
        assert support(got[0]) == set(keep)
        got = apply_top_k_top_p(logits, torch.tensor([3]), torch.tensor([p]))
        assert support(got[0]) == set(keep) & set(order[:3])
    for m in (0.0, 0.05, 0.3):
        got = apply_min_p(logits, torch.tensor([m]))
        assert support(got[0]) == {t for t in range(VOCAB) if probs[t] >= m * probs.max()}


def test_top_k_top_p_min_p_are_per_row_in_a_batch():
    torch.manual_seed(5)
    logits = torch.randn(4, VOCAB) * 2
    top_k, top_p = torch.tensor([0, 4, 0, 10]), torch.tensor([1.0, 1.0, 0.6, 0.7])
    min_p = torch.tensor([0.1, 0, 0, 0.2])
    batched = apply_top_k_top_p(apply_min_p(logits, min_p), top_k, top_p)
    for i in range(4):
        one = slice(i, i + 1)
        alone = apply_top_k_top_p(apply_min_p(logits[one], min_p[one]), top_k[one], top_p[one])
        torch.testing.assert_close(batched[one], alone)


def test_penalties_follow_definitions():
    logits = torch.linspace(-2, 2, VOCAB)[None].repeat(2, 1)
    # Padded with VOCAB, the spare column.
    seen_ids = torch.tensor([[10, 40, 40, 3], [VOCAB] * 4])
    output_ids = torch.tensor([[VOCAB] * 3, [40, 40, 3]])
    expected = logits.clone()
    for t in (10, 40, 3):  # repetition: prompt and output tokens, divide positives, multiply negatives
        v = expected[0, t]
        expected[0, t] = v / 2.0 if v > 0 else v * 2.0
    expected[1, 40] -= 0.25 * 2 + 0.5  # frequency * count + presence
    expected[1, 3] -= 0.25 * 1 + 0.5
    got = apply_penalties(
        logits, seen_ids, output_ids, torch.tensor([2.0, 1.0]), torch.tensor([0.0, 0.5]), torch.tensor([0.0, 0.25])
    )
    torch.testing.assert_close(got, expected)


def test_sampler_applies_penalties_per_row():
    logits = torch.zeros(4, VOCAB)
    logits[:, 5], logits[:, 6] = 2.0, 1.0  # 5 wins unless penalised
    rows = [row(temperature=0.0, prompt=[5], repetition_penalty=3.0),
            row(temperature=0.0, output=[5], frequency_penalty=0.6),  # count 1: 2 - 0.6 > 1, stays
            row(temperature=0.0, output=[5, 5], frequency_penalty=0.6),  # count 2: 2 - 1.2 < 1
            row(temperature=0.0, output=[5, VOCAB + 7], presence_penalty=1.5)]  # ids outside the logits are ignored
    assert Sampler("cpu")(logits, rows).token_ids == [6, 5, 6, 6]


def test_hash_is_the_same_on_host_and_device():
    words = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1]
    assert _mix32(torch.tensor(words)).tolist() == [_mix32(w) for w in words]
    assert all(0 <= _mix32(w) < 2**32 for w in words)
    keys = {seed_key(seed, index, step) for seed in (0, 1, -1, 2**40) for index in (0, 1) for step in (0, 1, 2)}
    assert len(keys) == 24


def test_seeded_sampling_is_identical_alone_and_in_batches_of_any_composition():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 12, VOCAB, generator=gen)  # [step, batch row, vocab]
    solo, mixed, reordered = Sampler("cpu"), Sampler("cpu"), Sampler("cpu")
    alone, in_mixed, in_reordered = [], [], []
    for step in range(8):
        seeded = row("s", output=alone, seed=42, top_k=20)
        alone.append(solo(logits[step, 3:4].clone(), [seeded]).token_ids[0])
        batch = [row(f"o{i}") for i in range(6)]
        batch[3] = row("s", output=in_mixed, seed=42, top_k=20)
        in_mixed.append(mixed(logits[step, :6].clone(), batch).token_ids[3])
        others = [row("t", seed=7), row("g", temperature=0.0, logprobs=2), row("p", repetition_penalty=1.2, min_p=0.1)]
        batch = [others[0], row("s", output=in_reordered, seed=42, top_k=20)] + others[1:]
        step_logits = torch.stack([logits[step, 0], logits[step, 3], logits[step, 5], logits[step, 9]])
        in_reordered.append(reordered(step_logits, batch).token_ids[1])
    assert alone == in_mixed == in_reordered
    assert len(set(alone)) > 1  # really random, not argmax


def test_seeded_samples_of_one_request_differ():
    logits = torch.zeros(2, VOCAB)
    out = Sampler("cpu")(logits, [row("a", seed=7, index=0), row("a#1", seed=7, index=1)])
    out2 = Sampler("cpu")(logits, [row("a", seed=7, index=0), row("a#1", seed=7, index=1)])
    assert out.token_ids == out2.token_ids and out.token_ids[0] != out.token_ids[1]


def test_seeded_draws_stay_in_the_support():
    torch.manual_seed(3)
    logits = torch.randn(64, VOCAB) * 2
    rows = [row(seed=s, top_k=3) for s in range(64)]
    top3 = logits.topk(3).indices.tolist()
    assert all(t in top3[i] for i, t in enumerate(Sampler("cpu")(logits, rows).token_ids))


def test_seeded_hash_sampler_draws_from_the_distribution():
    probs = torch.tensor([0.3, 0.2, 0.15, 0.1, 0.1, 0.08, 0.05, 0.02])
    # 4000 draws over seeds and steps, one batched call.
    rows = [row(seed=seed, output=[1] * step) for seed in range(1000) for step in range(4)]
    out = Sampler("cpu")(probs.log().repeat(len(rows), 1), rows)
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=8).double()
    assert chi_square(counts, probs.double() * len(rows)) < CHI2_999[7]


@pytest.mark.parametrize("pair", ["steps", "samples"])
def test_seeded_hash_draws_are_independent_across_steps_and_samples(pair):
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    firsts = [row(seed=seed) for seed in range(4000)]
    if pair == "steps":
        seconds = [row(seed=seed, output=[2]) for seed in range(4000)]
    else:
        seconds = [row(seed=seed, index=1) for seed in range(4000)]
    rows = firsts + seconds
    ids = torch.tensor(Sampler("cpu")(probs.log().repeat(len(rows), 1), rows).token_ids)
    joint = torch.bincount(ids[:4000] * 4 + ids[4000:], minlength=16).double()
    expected = torch.outer(probs, probs).flatten().double() * 4000
    assert chi_square(joint, expected) < CHI2_999[15]


def test_greedy_logit_bias_and_min_tokens():
    logits = torch.zeros(4, VOCAB)
    logits[:, 0] = 5.0  # eos would win
    rows = [row(temperature=0.0), row(temperature=0.0, logit_bias={7: 10.0}),
            row(temperature=0.0, min_tokens=2, output=[4]), row(temperature=0.0, min_tokens=2, output=[4, 4])]
    out = Sampler("cpu")(logits, rows)
    assert out.token_ids[0] == 0 and out.token_ids[1] == 7 and out.token_ids[2] != 0 and out.token_ids[3] == 0


def test_greedy_rows_take_the_argmax_in_a_random_batch():
    torch.manual_seed(4)
    logits = torch.randn(6, VOCAB)
    rows = [row(temperature=0.0) if i % 2 else row(temperature=1.5, top_p=0.5, seed=i) for i in range(6)]
    out = Sampler("cpu")(logits, rows)
    assert out.token_ids[1::2] == logits[1::2].argmax(-1).tolist()


def test_logprobs_are_raw_log_softmax_with_ranks():
    torch.manual_seed(2)
    logits = torch.randn(3, VOCAB)
    rows = [row(temperature=0.0, logprobs=5), row(temperature=0.0, logprobs=0, logit_bias={9: 100.0}), row()]
    out = Sampler("cpu")(logits, rows)
    ref = logits.log_softmax(-1)
    chosen_lp, rank, top_ids, top_lps = out.logprobs[0]
    assert rank == 1 and abs(chosen_lp - ref[0].max().item()) < 1e-6
    assert top_ids == ref[0].topk(5).indices.tolist()
    torch.testing.assert_close(torch.tensor(top_lps), ref[0].topk(5).values)
    chosen_lp, rank, top_ids, _ = out.logprobs[1]
    assert out.token_ids[1] == 9 and top_ids == []
    assert abs(chosen_lp - ref[1, 9].item()) < 1e-6 and rank == int((ref[1] > ref[1, 9]).sum()) + 1
    assert out.logprobs[2] is None


def test_gather_logprobs_matches_log_softmax():
    torch.manual_seed(6)
    logprobs = torch.randn(4, VOCAB).log_softmax(-1)
    chosen = torch.tensor([3, 0, 49, 17])
    entries = gather_logprobs(logprobs, chosen, [2, 0, 4, 1])
    for i, (lp, rank, top_ids, top_lps) in enumerate(entries):
        assert lp == logprobs[i, chosen[i]].item() and rank == int((logprobs[i] > lp).sum()) + 1
        n = [2, 0, 4, 1][i]
        assert top_ids == logprobs[i].topk(n).indices.tolist() and top_lps == logprobs[i].topk(n).values.tolist()


def test_a_call_with_every_feature_reads_nothing_back_early():
    torch.manual_seed(7)
    logits, rows = torch.randn(4, VOCAB), every_feature_rows()
    sampler = Sampler("cpu")
    forbidden = {"aten::item", "aten::_local_scalar_dense", "aten::nonzero"}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as control:
        torch.tensor([1.0]).item()
    assert {e.key for e in control.key_averages()} & forbidden  # the profiler does see a read-back
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = sampler(logits, rows)
        gather_logprobs(logits.log_softmax(-1), torch.tensor(out.token_ids), [2, 0, 1, 3])
    names = {e.key for e in prof.key_averages()}
    assert "aten::topk" in names and "aten::sort" in names and "aten::scatter_add_" in names
    assert not names & forbidden
    biased = logits[0].clone()
    biased[7] += 2.5
    assert out.token_ids[0] == biased.argmax().item()
    assert out.token_ids[2] not in (0, 9) and out.token_ids[1] in logits[1].topk(5).indices.tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sampler_syncs_only_on_its_final_event():
    """Sync debug mode flags stream/device syncs and blocking copies
    (`memcpy_and_sync`), not event syncs nor non-blocking copies to or from
    pinned memory: so the whole call runs in "error" mode, and any read-back
    besides the final event-synced copy raises."""
    torch.manual_seed(8)
    logits = torch.randn(4, 32000, device="cuda")
    rows, sampler = every_feature_rows(), Sampler("cuda")
    expected = sampler(logits, rows)  # warm-up: lazy initialisation outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):
            logits.sum().item()  # the mode is live
        out = sampler(logits, rows)
        entries = gather_logprobs(logits.log_softmax(-1), logits.argmax(-1), [2, 0, 1, 3])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    biased = logits[0].clone()
    biased[7] += 2.5
    assert out.token_ids[0] == expected.token_ids[0] == biased.argmax().item()
    assert out.token_ids[1] == expected.token_ids[1]  # seeded, same step: same draw
    assert [e[1] for e in entries] == [1, 1, 1, 1] and math.isfinite(out.logprobs[3][0])
