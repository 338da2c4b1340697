"""A bad --speculative-config stops `serve` before anything loads: exit code 2
and one line saying what is wrong; the parser fills in vLLM's defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from server_fixtures import REPO

from inference.config import EngineConfig
from inference.spec_decode.config import SpeculativeConfig


def serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", "serve", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("config, words", [
    ({"method": "medusa", "num_speculative_tokens": 2}, "unknown method 'medusa'"),
    ({"method": "ngram", "num_speculative_tokens": 17}, "bad num_speculative_tokens: 17"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     "prompt_lookup_min: 4 is over prompt_lookup_max 2"),
    ({"method": "draft_model", "model": "/nowhere", "num_speculative_tokens": 2}, "/nowhere has no config.json"),
    ({"method": "suffix", "suffix_decoding_max_tree_depth": 0}, "bad suffix_decoding_max_tree_depth: 0"),
    ({"method": "suffix", "suffix_decoding_max_cached_requests": -1}, "bad suffix_decoding_max_cached_requests: -1"),
    ({"method": "suffix", "suffix_decoding_max_spec_factor": -0.5}, "bad suffix_decoding_max_spec_factor: -0.5"),
    ({"method": "suffix", "suffix_decoding_min_token_prob": 1.5}, "bad suffix_decoding_min_token_prob: 1.5"),
])
def test_bad_config_exits_2_with_one_line(config, words):
    done = serve("--speculative-config", json.dumps(config))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pagedinfer serve: error: argument --speculative-config: "), lines
    assert words in lines[0], lines[0]


@pytest.mark.parametrize("text, words", [
    ("{not json", "not valid JSON"),
    ("[1]", "must be a JSON object"),
    ('{"method": "ngram"}', "needs num_speculative_tokens"),
    ('{"method": "ngram", "num_speculative_tokens": 0}', "bad num_speculative_tokens: 0"),
    ('{"method": "ngram", "num_speculative_tokens": true}', "bad num_speculative_tokens: True"),
    ('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 0}', "bad prompt_lookup_max: 0"),
    ('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1.5}', "bad prompt_lookup_min"),
    ('{"method": "ngram", "num_speculative_tokens": 2, "model": "x"}', "do not apply to method 'ngram'"),
    ('{"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}', "unknown field(s) ['lookahead']"),
    ('{"method": "suffix", "suffix_decoding_min_token_prob": 2}', "bad suffix_decoding_min_token_prob"),
    ('{"method": "suffix", "suffix_decoding_max_cached_requests": 1.5}', "bad suffix_decoding_max_cached_requests"),
    ('{"method": "suffix", "suffix_decoding_max_spec_factor": "1"}', "bad suffix_decoding_max_spec_factor"),
    ('{"method": "draft_model", "num_speculative_tokens": 2}', "needs model"),
    ('{"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 1}', "bad disable_by_batch_size: 1"),
    ('{"method": "suffix", "disable_by_batch_size": "8"}', "bad disable_by_batch_size"),
])
def test_parser_names_what_is_wrong(text, words):
    with pytest.raises(ValueError) as info:
        SpeculativeConfig.from_json(text)
    assert words in str(info.value)


def copy_config(source, folder, **changes):
    """A model folder holding `source`'s tokenizer and config.json with `changes` (no weights: only they are read)."""
    folder.mkdir()
    for path in source.iterdir():
        if path.name != "model.safetensors":
            (folder / path.name).write_bytes(path.read_bytes())
    config = json.loads((source / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def test_draft_model_is_checked_against_the_target(tiny_llama_dir, tmp_path):
    from inference.spec_decode.draft_check import check_draft_model

    target = str(tiny_llama_dir)
    with pytest.raises(ValueError, match="draft model vocab_size 512 differs from the target's 384"):
        check_draft_model(str(copy_config(tiny_llama_dir, tmp_path / "vocab", vocab_size=512)), target)
    other_tokenizer = copy_config(tiny_llama_dir, tmp_path / "tokenizer")
    tokenizer = json.loads((other_tokenizer / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = list(vocab)[:2]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other_tokenizer / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ValueError, match="tokenizer differs"):
        check_draft_model(str(other_tokenizer), target)
    with pytest.raises(ValueError, match="not smaller than the target"):
        check_draft_model(target, target)
    small = str(copy_config(tiny_llama_dir, tmp_path / "small", num_hidden_layers=1))
    check_draft_model(small, target)
    config = EngineConfig.create(model=target, speculative_config={"model": small, "num_speculative_tokens": 2})
    assert (config.speculative.method, config.speculative.model) == ("draft_model", small)


def test_defaults_are_vllms():
    ngram = SpeculativeConfig.from_json('{"method": "ngram", "num_speculative_tokens": 3}')
    assert (ngram.prompt_lookup_min, ngram.prompt_lookup_max) == (5, 5)
    one_sided = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4})
    assert (one_sided.prompt_lookup_min, one_sided.prompt_lookup_max) == (4, 4)
    suffix = SpeculativeConfig.from_dict({"method": "suffix"})
    assert (suffix.num_speculative_tokens, suffix.suffix_decoding_max_tree_depth) == (16, 24)
    assert (suffix.suffix_decoding_max_cached_requests, suffix.suffix_decoding_max_spec_factor,
            suffix.suffix_decoding_min_token_prob) == (10000, 1.0, 0.1)
    assert SpeculativeConfig.from_dict({"model": "/draft", "num_speculative_tokens": 2}).method == "draft_model"


def test_suffix_without_arctic_inference_exits_2_with_one_line(tmp_path):
    """arctic-inference is built by `make`, not a dependency: where it is
    missing (here shadowed by a package that fails to import) the method is refused."""
    (tmp_path / "arctic_inference").mkdir()
    (tmp_path / "arctic_inference" / "__init__.py").write_text('raise ImportError("not built")\n')
    done = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--speculative-config", '{"method": "suffix"}'],
                          cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "method 'suffix' needs arctic-inference, which is not installed" in lines[0], lines
