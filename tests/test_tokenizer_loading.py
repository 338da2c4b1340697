"""The front end's tokenizer: the same tokenizer AutoTokenizer gives, loaded
without the model config (and torch) where that is the same thing."""

import subprocess
import sys

import pytest
from transformers import AutoConfig, AutoTokenizer

from inference.core_spawn import load_tokenizer
from tests.conftest import TINY_CONFIGS, TINY_MOE_CONFIGS, build_tiny_tokenizer

TEXTS = ["Hello, world!", "  two  spaces\tand a tab\n", "naïve café ☕ 東京", "<eos> inside"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


def _same_tokenizer(folder) -> tuple:
    ours, reference = load_tokenizer(str(folder)), AutoTokenizer.from_pretrained(folder)
    assert type(ours) is type(reference)
    assert len(ours) == len(reference)
    assert ours.all_special_tokens == reference.all_special_tokens
    assert ours.eos_token_id == reference.eos_token_id
    for text in TEXTS:
        ids = reference.encode(text)
        assert ours.encode(text) == ids
        assert ours.decode(ids) == reference.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
    return ours, reference


@pytest.mark.parametrize("model_type", sorted({**TINY_CONFIGS, **TINY_MOE_CONFIGS}) + ["mistral"])
def test_tiny_folders_load_as_autotokenizer_does(model_type, tmp_path):
    kwargs = dict({**TINY_CONFIGS, **TINY_MOE_CONFIGS}.get(model_type, {"model_type": model_type}))
    AutoConfig.for_model(kwargs.pop("model_type"), **kwargs).save_pretrained(tmp_path)
    build_tiny_tokenizer(tmp_path)
    ours, _ = _same_tokenizer(tmp_path)
    # qwen2 is the case AutoTokenizer overrides the saved class for: it must not take the shortcut.
    assert (type(ours).__name__ == "TokenizersBackend") == (model_type != "qwen2")


def test_default_model_loads_as_autotokenizer_does(smollm2_dir):
    ours, reference = _same_tokenizer(smollm2_dir)
    rendered = reference.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == rendered


def test_default_model_tokenizer_loads_without_torch(smollm2_dir):
    # The point of the shortcut: the front end's tokenizer is on the start-up's critical path,
    # and torch's import is 1.5-3 s of it.
    code = ("import sys; from inference.core_spawn import load_tokenizer; "
            f"load_tokenizer({str(smollm2_dir)!r}); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
