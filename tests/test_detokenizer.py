"""Incremental detokenizer: split UTF-8, stop strings across token boundaries."""

from __future__ import annotations

import pytest

from inference.detokenizer import IncrementalDetokenizer
from inference.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


def feed(tokenizer, text: str, **kw) -> tuple[IncrementalDetokenizer, list[str], bool]:
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(**kw))
    visible, stopped = [], False
    for token_id in tokenizer.encode(text, add_special_tokens=False):
        stopped = detok.add_token(token_id)
        visible.append(detok.visible_text(stopped))
        if stopped:
            break
    return detok, visible, stopped


def test_multibyte_characters_split_across_tokens(tokenizer):
    text = "naïve café 你好世界 🙂🚀 Ωmega"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # really split into byte-level pieces
    detok, visible, _ = feed(tokenizer, text)
    assert detok.text == tokenizer.decode(ids) == text
    assert all("\ufffd" not in v for v in visible)
    assert all(a == b[: len(a)] for a, b in zip(visible, visible[1:]))  # only ever grows


def test_stop_string_across_token_boundaries(tokenizer):
    text = "Hello there. The END marker follows here"
    detok, visible, stopped = feed(tokenizer, text, stop=["END mark"])
    assert stopped and detok.text == "Hello there. The " and detok.stop_reason == "END mark"
    assert all("END" not in v for v in visible)  # never streamed, even partly
    detok, _, _ = feed(tokenizer, text, stop=["END mark"], include_stop_str_in_output=True)
    assert detok.text == "Hello there. The END mark"


def test_earliest_of_several_stop_strings_wins(tokenizer):
    detok, _, stopped = feed(tokenizer, "one two three four", stop=["four", "two"])
    assert stopped and detok.text == "one " and detok.stop_reason == "two"


def test_skip_special_tokens(tokenizer):
    ids = tokenizer.encode("hi", add_special_tokens=False) + [tokenizer.eos_token_id]
    for skip, expected in ((True, "hi"), (False, "hi" + tokenizer.eos_token)):
        detok = IncrementalDetokenizer(tokenizer, SamplingParams(skip_special_tokens=skip))
        for t in ids:
            detok.add_token(t)
        assert detok.text == expected
