"""Multi-LoRA through the decode graphs.

Every graph is captured with the LoRA kernels in, reading each token's slot
from the step buffers' `lora_slots` and the adapters from the stacked tensors
swaps overwrite in place. On the CPU nothing is captured: the padded decode
batches run eagerly, so the padding of `lora_slots` (0 past the real rows) and
the capture's binding to the buffer are checked here; the CUDA cases (skipped
without a GPU) capture for real, mix adapters in replays, and swap adapters
after capture.
"""

from __future__ import annotations

import pytest
import torch

from inference import LLM, SamplingParams
from inference.lora.config import LoRARequest
from inference.step_buffers import StepBatch
from lora_fixtures import build_adapters, peft_greedy

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
NAMES = [None, "sql", "chat", "code", "sql", None, "code"]


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    return build_adapters(tiny_llama_dir, tmp_path_factory.mktemp("lora-graphs"))


def _prompts() -> list[list[int]]:
    return [[(5 * i + 3 * j) % 250 for j in range(4 + 3 * i)] for i in range(len(NAMES))]


def _max_tokens(i: int) -> int:
    return 6 + 2 * i


def _generate(folder, adapters, *, enforce_eager: bool, device: str = "cpu", max_loras: int = 2):
    llm = LLM(model=str(folder), dtype="float32", device=device, num_kv_blocks=64, max_num_seqs=8,
              max_num_batched_tokens=48, enforce_eager=enforce_eager, enable_lora=True, max_loras=max_loras)
    prompts = _prompts()
    params = [SamplingParams(temperature=0.0, max_tokens=_max_tokens(i), ignore_eos=True) for i in range(len(NAMES))]
    requests = [None if n is None else LoRARequest(n, i + 1, str(adapters[n])) for i, n in enumerate(NAMES)]
    outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=requests)
    return llm, [o.outputs[0].token_ids for o in outputs]


def test_padded_lora_decode_matches_peft(tiny_llama_dir, adapters):
    """Decode batches of 1..7 requests padded to 1, 2, 4, 8 rows, adapters swapping through two slots."""
    llm, padded = _generate(tiny_llama_dir, adapters, enforce_eager=False)
    for i, (name, prompt) in enumerate(zip(NAMES, _prompts())):
        assert padded[i] == peft_greedy(tiny_llama_dir, adapters.get(name), [prompt], _max_tokens(i))[0], i
    assert padded[1] != peft_greedy(tiny_llama_dir, None, [_prompts()[1]], _max_tokens(1))[0]  # adapters matter
    runner = llm.engine.runner
    assert runner.graphs is not None and runner.graphs.lora is runner.lora.batch
    # What a capture binds: the kernels on, reading the buffer the runner writes every step.
    batch = StepBatch(0, 4, 0, 4, 1, runner.config.max_model_len)
    runner.buffers.prepare([], 4)
    runner.graphs.bind_lora(batch)
    slots = runner.lora.batch.token_slots
    assert slots is not None and slots.data_ptr() == runner.buffers.gpu["lora_slots"].data_ptr()
    assert slots.shape == (4,) and not slots.any()


@needs_cuda
def test_lora_graphs_give_the_eager_tokens_on_cuda(tiny_llama_dir, adapters):
    llm, graphed = _generate(tiny_llama_dir, adapters, enforce_eager=False, device="cuda")
    assert llm.engine.runner.graphs.graphs  # captured, with LoRA on
    _, eager = _generate(tiny_llama_dir, adapters, enforce_eager=True, device="cuda")
    assert graphed == eager


@needs_cuda
def test_replays_read_adapters_swapped_in_after_capture(tiny_llama_dir, adapters):
    """One slot, three adapters in turn: every replay must read the weights now in the slot."""
    graphed = _generate(tiny_llama_dir, adapters, enforce_eager=False, device="cuda", max_loras=1)[1]
    eager = _generate(tiny_llama_dir, adapters, enforce_eager=True, device="cuda", max_loras=1)[1]
    assert graphed == eager
