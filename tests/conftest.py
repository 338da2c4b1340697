"""Shared fixtures: tiny random-weight models saved by transformers, and the
prepared default SmolLM2 folder, with its tokenizer and transformers model
loaded once per session."""

from __future__ import annotations

import os
import threading

import go_tools
import pytest

# Keep torch from spinning OpenMP threads against the server processes that
# some tests start on the same two cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")



def pytest_collection_finish(session: pytest.Session) -> None:
    """Start building the Go peers (go_tools) in the background when a collected test uses one."""
    if any(getattr(item.module, "go_tool", None) is go_tools.go_tool for item in session.items
           if isinstance(item, pytest.Function)):
        threading.Thread(target=go_tools.prebuild, name="go-peers-prebuild", daemon=True).start()


TINY_CONFIGS = {
    "llama": dict(
        model_type="llama", vocab_size=384, hidden_size=64, intermediate_size=112,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 128},
    ),
    "qwen2": dict(
        model_type="qwen2", vocab_size=384, hidden_size=64, intermediate_size=112,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        max_position_embeddings=1024, tie_word_embeddings=True,
    ),
    "qwen3": dict(
        model_type="qwen3", vocab_size=384, hidden_size=64, intermediate_size=112,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=1024, tie_word_embeddings=False,
    ),
}
# Mixture-of-experts models, kept apart from TINY_CONFIGS (whose error tests
# edit dense-MLP tensors). Qwen3-MoE's middle layer is dense (mlp_only_layers).
TINY_MOE_CONFIGS = {
    "qwen3_moe": dict(
        model_type="qwen3_moe", vocab_size=384, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1],
        max_position_embeddings=1024, tie_word_embeddings=True,
    ),
    "mixtral": dict(
        model_type="mixtral", vocab_size=384, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=1024, tie_word_embeddings=False,
    ),
}


def build_tiny_tokenizer(folder) -> None:
    """A byte-level tokenizer with no merges: 256 byte tokens plus <eos> (256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    vocab["<eos>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    tokenizer.save_pretrained(folder)


def build_tiny_model(model_type: str, folder, seed: int = 0):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict({**TINY_CONFIGS, **TINY_MOE_CONFIGS}[model_type])
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init gives near-uniform logits; scale the embeddings up so
    # greedy continuations are decisive rather than decided by rounding
    # (and the MoE routers, so no top-k choice is a near tie).
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(20.0)
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.mul_(20.0)
    model.config.architectures = [type(model).__name__]
    model.config.eos_token_id = 256
    model.generation_config.eos_token_id = 256
    model.save_pretrained(folder)
    build_tiny_tokenizer(folder)
    return model.eval()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a tensor-parallel module: ranks take their thread count from rank 0, and
    two ranks share two cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", params=sorted(TINY_CONFIGS))
def tiny_model(request, tmp_path_factory):
    """(model_type, folder, transformers model) for each tiny architecture."""
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model = build_tiny_model(request.param, folder)
    return request.param, folder, model


@pytest.fixture(scope="session", params=sorted(TINY_MOE_CONFIGS))
def tiny_moe_model(request, tmp_path_factory):
    """(model_type, folder, transformers model) for each tiny mixture-of-experts architecture."""
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model = build_tiny_model(request.param, folder)
    return request.param, folder, model


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama-engine")
    build_tiny_model("llama", folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_chat_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama with a plain chat template (the byte-level tokenizer has
    none), so chat requests run on it."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-llama-chat")
    for path in tiny_llama_dir.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2_dir():
    from inference.prepare import check_model_dir, default_model_dir

    folder = default_model_dir()
    problems = check_model_dir(folder) if folder.exists() else ["not prepared"]
    if problems:
        pytest.fail(f"default model not prepared ({problems}); run `pagedinfer prepare-model`")
    return folder


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    """SmolLM2's tokenizer, loaded once; tests only encode, decode and render chats with it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_dir):
    """transformers' SmolLM2 in float32, loaded once per session as the reference
    for the engine. Shared, so it must not change: gradients are off, and the
    session fails if a test changed a weight."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval().requires_grad_(False)
    before = _fingerprint(model)
    yield model
    assert _fingerprint(model) == before, "a test changed the shared transformers SmolLM2"


def _fingerprint(model) -> list[float]:
    return [float(p.double().sum()) for p in model.parameters()]
