"""The CPU engine's thread count when it serves: measured, or as the operator says."""

from __future__ import annotations

import pytest
import torch

from inference.cpu_threads import MIN_SPEEDUP, candidate_counts, choose_num_threads, pick_num_threads
from server.cli import build_parser, main


def test_the_last_core_goes_to_the_engine_only_when_it_pays():
    assert candidate_counts(2) == [2, 1] and candidate_counts(16) == [16, 15] and candidate_counts(1) == [1]
    assert pick_num_threads({2: 0.010, 1: 0.010 * MIN_SPEEDUP * 0.99}) == 1  # not enough faster: leave a core
    assert pick_num_threads({2: 0.010, 1: 0.010 * MIN_SPEEDUP * 1.01}) == 2
    assert pick_num_threads({2: 0.010, 1: 0.009}) == 1  # fewer threads faster outright
    assert pick_num_threads({1: 0.5}) == 1


def test_choose_measures_each_count_and_sets_the_pick():
    before = torch.get_num_threads()
    x = torch.randn(256, 256)
    try:
        count, seconds = choose_num_threads(lambda: x @ x, before)
        assert set(seconds) == set(candidate_counts(before)) and all(s > 0 for s in seconds.values())
        assert count == pick_num_threads(seconds) == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_engine_threads_flag():
    parse = build_parser().parse_args
    assert parse(["serve"]).engine_threads == "auto"
    assert parse(["serve", "--engine-threads", "3"]).engine_threads == 3


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_bad_engine_threads_exit_2(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--engine-threads", value])
    assert exit_info.value.code == 2
    assert "argument --engine-threads: 'auto' or a thread count >= 1" in capsys.readouterr().err
