"""The engine in bfloat16 against transformers in bfloat16 on the same weights.

bfloat16 is what `dtype auto` runs on GPUs and on CPUs with native bf16, so
what users run; the other parity tests pin float32. Here the tiny Llama,
Qwen2, Qwen3, Qwen3-MoE and Mixtral run in bf16 on the C++ CPU kernels, the
tiny Llama and Qwen3-MoE also on the Triton kernels in Triton's interpreter
(`PAGEDINFER_TRITON_INTERPRET=1`; with CUDA, all of them on the compiled
kernels), and SmolLM2 on the C++ kernels, offline and through `pagedinfer
serve --dtype bfloat16`. transformers' bf16 model is the float32 one cast with
`.to(bfloat16)` (SmolLM2: loaded in bf16), so it holds the same rounded
weights as the engine's loader.

Tolerance, from transformers' own bf16 error. bf16 keeps 8 significant bits,
and both implementations round the float32 model to bf16 at the same points
(each matmul, norm, rotary and attention output, the residual adds) but
compute in a different order in between (fused kernels, float32
accumulation). So each lands about as far from the float32 logits as the
other: transformers at most `delta` (its largest logit error against
float32 over the compared rows and the whole vocabulary), the engine
measured within 1.33 * delta on every sequence here. The largest error of a
sequence rather than each position's, because where transformers rounds
luckily at one position, that position's error is no bound for the engine's
(measured: up to 3x). Before each side rounds its logits to bf16 they then
differ by at most 2 * delta (triangle inequality), and the two roundings can
land one bf16 step apart however close the values were: TOLERANCE = 2 *
delta + one bf16 step at the size of the largest logit. Triton's interpreter
casts float32 to bf16 by truncation (a whole step instead of half of one: its
`_convert_float` gets no rounding mode for plain casts), which doubles its own
error: 3 * delta + one step there. The same triangle inequality in the
root-mean-square norm over all of a sequence's logits bounds a systematic
error that stays under the largest one's bound: RMS(engine - transformers)
<= 2 * RMS(transformers' bf16 - float32) (3 * in the interpreter); measured
at most 1.05 * on SmolLM2 and 0.51 * on the tiny models. A log-softmax moves
at most twice as far as the largest logit under it, so the engine's logprobs
must lie within 2 * TOLERANCE of transformers'.

Greedy tokens are checked on transformers' logits for the engine's own
prefix (one forward over prompt + the engine's continuation): at every
position where transformers' top two logits are more than TOLERANCE apart
the engine must pick its argmax, and elsewhere a token within TOLERANCE of
the top. That is "equal until the first position whose top two are within
the tolerance", and every decisive position after it.
"""

from __future__ import annotations

import copy
import math
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
from conftest import TINY_CONFIGS, TINY_MOE_CONFIGS, build_tiny_model
from server_fixtures import start_server
from test_models import PROMPTS, _prefill_logits
from transformers import AutoConfig

CUDA = torch.cuda.is_available()
# The interpreter must be chosen before Triton is first imported (see tests/test_kernels.py).
if "triton" not in sys.modules and not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import kernels  # noqa: E402
from inference import LLM, SamplingParams  # noqa: E402
from inference.models import load_model  # noqa: E402

NUM_TOKENS = 16
# path -> (device, whether Triton kernels run, factor on delta): see the module docstring.
PATHS = {"cpp": ("cpu", False, 2.0), "triton-interpreter": ("cpu", True, 3.0), "cuda": ("cuda", True, 2.0)}
TINY_MODELS = sorted(TINY_CONFIGS) + sorted(TINY_MOE_CONFIGS)


def cases(interpreted: tuple[str, ...]) -> list:
    """(model type, path) pairs: every tiny model on the C++ kernels (on CUDA:
    the compiled Triton kernels), and `interpreted` in Triton's interpreter,
    which takes seconds a model."""
    if CUDA:
        return [pytest.param(m, "cuda", id=f"{m}-cuda") for m in TINY_MODELS]
    return [pytest.param(m, "cpp", id=f"{m}-cpp") for m in TINY_MODELS] + [
        pytest.param(m, "triton-interpreter", id=f"{m}-triton-interpreter", marks=pytest.mark.slow)
        for m in interpreted
    ]


SMOLLM2_PROMPTS = ["1, 2, 3, 4, 5, 6, 7, 8,", "The capital of France is", "def fibonacci(n):\n",
                   "Les mathématiques sont"]


@dataclass
class ModelPair:
    folder: str
    fp32: torch.nn.Module
    bf16: torch.nn.Module


@dataclass
class Reference:
    """transformers' bf16 logits of some rows of a sequence, and the tolerance they give."""

    logits: torch.Tensor  # [rows, vocab], float32 copies
    tolerance: float
    rms_delta: float  # root mean square of transformers' bf16 error over the rows


def rms(x: torch.Tensor) -> float:
    return x.pow(2).mean().sqrt().item()


def reference(models: ModelPair, ids: list[int], factor: float, first_row: int = 0) -> Reference:
    """Rows `first_row:` of transformers' logits of `ids` (row i predicts token i + 1)."""
    with torch.inference_mode():
        bf16 = models.bf16(torch.tensor([ids])).logits[0, first_row:].float()
        fp32 = models.fp32(torch.tensor([ids])).logits[0, first_row:].float()
    delta = (bf16 - fp32).abs().max().item()
    step = 2.0 ** math.floor(math.log2(bf16.abs().max().item())) * torch.finfo(torch.bfloat16).eps
    return Reference(bf16, factor * delta + step, rms(bf16 - fp32))


def check_continuation(ref: Reference, tokens: list[int], logprobs: list[float]) -> int:
    """Check a greedy continuation and its logprobs against transformers'
    logits on the same prefix (`ref` starts at the last prompt row); return
    how many positions were decisive."""
    tol = ref.tolerance
    hf_logprobs = ref.logits.log_softmax(-1)
    num_decisive = 0
    for i, (token, row) in enumerate(zip(tokens, ref.logits)):
        top2 = row.topk(2)
        if top2.values[0] - top2.values[1] > tol:
            assert token == top2.indices[0].item(), f"position {i}: {token}, transformers {top2.indices[0].item()}"
            num_decisive += 1
        else:
            assert row[token] >= top2.values[0] - tol, f"position {i}: {token} is not among the near-tied top"
        hf = hf_logprobs[i, token].item()
        assert abs(logprobs[i] - hf) <= 2 * tol, f"position {i}: logprob {logprobs[i]}, transformers {hf}"
    return num_decisive


@contextmanager
def on_path(path: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, float]]:
    """(device, factor) of a path; checks that its kernels are the ones that ran."""
    device, triton_kernels, factor = PATHS[path]
    if path == "triton-interpreter":
        if not kernels.interpreter_active():
            pytest.fail("Triton was imported before TRITON_INTERPRET=1 was set: run this module in a fresh process")
        monkeypatch.setenv(kernels.INTERPRET_ENV, "1")
    else:
        monkeypatch.delenv(kernels.INTERPRET_ENV, raising=False)
    if path == "cpp":
        assert kernels.cpu_kernels() == "C++", "the C++ CPU kernels did not build: this would test the references"
    calls: list[str] = []
    real_import = kernels._import_kernel
    monkeypatch.setattr(kernels, "_import_kernel", lambda name, dev: calls.append(name) or real_import(name, dev))
    yield device, factor
    assert triton_kernels == bool(calls), f"Triton kernels run: {sorted(set(calls))}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Callable[[str], ModelPair]:
    """The tiny model of a type, built once for the module."""
    pairs: dict[str, ModelPair] = {}

    def get(model_type: str) -> ModelPair:
        if model_type not in pairs:
            folder = tmp_path_factory.mktemp(f"bf16-{model_type}")
            fp32 = build_tiny_model(model_type, folder)
            pairs[model_type] = ModelPair(str(folder), fp32, copy.deepcopy(fp32).to(torch.bfloat16))
        return pairs[model_type]

    return get


def check_logits(models: ModelPair, prompts: list[list[int]], device: str, factor: float) -> None:
    ours = load_model(models.folder, AutoConfig.from_pretrained(models.folder), torch.bfloat16, device)
    for prompt in prompts:
        ref = reference(models, prompt, factor)
        logits = _prefill_logits(ours, prompt).float().cpu()
        torch.testing.assert_close(logits, ref.logits, atol=ref.tolerance, rtol=0)
        error = rms(logits - ref.logits)
        assert error <= factor * ref.rms_delta, f"RMS error {error:.3g}, transformers' own {ref.rms_delta:.3g}"


def check_greedy(models: ModelPair, prompts: list[list[int]], device: str, factor: float, **engine_args) -> int:
    """Greedy continuations of `prompts` in one batch, prompts chunked 32
    tokens a step next to the decodes; returns the decisive positions."""
    llm = LLM(model=models.folder, dtype="bfloat16", device=device, max_num_batched_tokens=32, **engine_args)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=0)
    num_decisive = 0
    for prompt, output in zip(prompts, llm.generate(prompts, params, use_tqdm=False)):
        tokens = output.outputs[0].token_ids
        logprobs = [lp[t].logprob for t, lp in zip(tokens, output.outputs[0].logprobs)]
        ref = reference(models, prompt + tokens, factor, first_row=len(prompt) - 1)
        num_decisive += check_continuation(ref, tokens, logprobs)
    return num_decisive


# A dense model, and the mixture of experts with q/k norm (the fused MoE kernel).
@pytest.mark.parametrize("model_type,path", cases(interpreted=("llama", "qwen3_moe")))
def test_tiny_logits_match_transformers(tiny, model_type, path, monkeypatch):
    with on_path(path, monkeypatch) as (device, factor):
        check_logits(tiny(model_type), PROMPTS, device, factor)


# The decode kernel's bf16 path needs one model; the logits test covers the MoE kernel.
@pytest.mark.parametrize("model_type,path", cases(interpreted=("llama",)))
def test_tiny_greedy_matches_transformers(tiny, model_type, path, monkeypatch):
    with on_path(path, monkeypatch) as (device, factor):
        num_decisive = check_greedy(tiny(model_type), PROMPTS, device, factor, num_kv_blocks=64)
    assert num_decisive >= len(PROMPTS) * NUM_TOKENS // 2  # random weights, scaled to be decisive


# ---- SmolLM2 ----------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_dir) -> ModelPair:
    from transformers import AutoModelForCausalLM

    load = AutoModelForCausalLM.from_pretrained
    return ModelPair(str(smollm2_dir), load(smollm2_dir, dtype=torch.float32).eval(),
                     load(smollm2_dir, dtype=torch.bfloat16).eval())


@pytest.fixture(scope="module")
def smollm2_prompts(smollm2) -> list[list[int]]:
    from transformers import AutoTokenizer

    return [AutoTokenizer.from_pretrained(smollm2.folder).encode(p) for p in SMOLLM2_PROMPTS]


# bf16 SmolLM2 has many near ties (top two logits a few bf16 steps apart), but not only those.
MIN_SMOLLM2_DECISIVE = len(SMOLLM2_PROMPTS) * NUM_TOKENS // 4


def test_smollm2_logits_and_greedy_match_transformers(smollm2, smollm2_prompts, monkeypatch):
    with on_path("cpp", monkeypatch) as (device, factor):
        check_logits(smollm2, smollm2_prompts, device, factor)
        num_decisive = check_greedy(smollm2, smollm2_prompts, device, factor, kv_cache_memory=64 * 1024**2)
    assert num_decisive >= MIN_SMOLLM2_DECISIVE


@pytest.mark.slow
def test_smollm2_served_in_bf16_matches_transformers(smollm2, smollm2_prompts):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2.folder)
    # The server names each token by its text (the tokenizer's decode of it
    # alone); map the texts that only one token has back to ids.
    texts = tokenizer.batch_decode([[t] for t in range(len(tokenizer))])
    counts = Counter(texts)
    id_of = {text: t for t, text in enumerate(texts) if counts[text] == 1}
    server = start_server("--dtype", "bfloat16", "--max-model-len", "256", "--num-kv-blocks", "64")
    try:
        log = server.log_tail(100_000)
        assert f"dtype bfloat16 on {'cuda' if CUDA else 'cpu'}: asked for" in log
        assert CUDA or "CPU ops: C++" in log
        num_decisive = 0
        with server.client() as client:
            for prompt in smollm2_prompts:
                body = {"prompt": prompt, "max_tokens": NUM_TOKENS, "temperature": 0, "logprobs": 0,
                        "ignore_eos": True}
                reply = client.post("/v1/completions", json=body)
                assert reply.status_code == 200, reply.text
                logprobs = reply.json()["choices"][0]["logprobs"]
                tokens = [id_of[text] for text in logprobs["tokens"]]
                ref = reference(smollm2, prompt + tokens, PATHS["cpp"][2], first_row=len(prompt) - 1)
                num_decisive += check_continuation(ref, tokens, logprobs["token_logprobs"])
        assert num_decisive >= MIN_SMOLLM2_DECISIVE
    finally:
        server.stop()
