"""Multi-LoRA with tensor parallelism (TP=2, CPU, gloo) against transformers + peft.

Two ranks each hold their shard of every adapter: column-parallel layers
(qkv, gate_up) their output rows of B, row-parallel ones (o, down) their
input columns of A, whose partial delta joins the layer's all-reduce. The
tiny Llama splits its two KV heads; the tiny Qwen2 has one, which both ranks
keep whole, and so its k/v adapters too (its adapters' lora_B x20: see
tests/test_lora_engine.py's Qwen2 test). Three adapters of different ranks and
targets share one batch with the base model through two device slots, so
rank 0's swaps must reach rank 1 mid-run; then an adapter is unloaded and
another folder loaded under its name, which rank 1 must read anew.
"""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_model
from inference import LLM, SamplingParams
from inference.lora.config import LoRARequest
from lora_fixtures import build_adapter, build_adapters, peft_greedy

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.mark.parametrize("model_type,b_scale", [("llama", 1.0), ("qwen2", 20.0)])
def test_tp2_mixed_adapters_match_peft(model_type, b_scale, tmp_path):
    base = tmp_path / "base"
    build_tiny_model(model_type, base)
    adapters = build_adapters(base, tmp_path, b_scale)
    names = [None, "sql", "chat", "code"] * 2
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 256, (6 + 3 * i,), generator=gen).tolist() for i in range(len(names))]
    want = [peft_greedy(base, adapters.get(name), [prompt], MAX_TOKENS)[0] for name, prompt in zip(names, prompts)]
    plain = peft_greedy(base, None, prompts, MAX_TOKENS)
    for name in adapters:  # every adapter changes some prompt's output, so the comparison can fail
        assert any(want[i] != plain[i] for i, n in enumerate(names) if n == name), name

    llm = LLM(str(base), dtype="float32", max_model_len=128, num_kv_blocks=64, tensor_parallel_size=2,
              enable_lora=True, max_loras=2, max_lora_rank=16)
    other = build_adapter(base, tmp_path / "other", 16, ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], seed=11,
                          b_scale=b_scale)
    want_other = peft_greedy(base, other, prompts, MAX_TOKENS)
    changed = next(i for i, tokens in enumerate(want_other) if tokens != want[i] and tokens != plain[i])
    try:
        requests = [None if n is None else LoRARequest(n, i + 1, str(adapters[n])) for i, n in enumerate(names)]
        outputs = llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=requests)
        assert [o.outputs[0].token_ids for o in outputs] == want
        assert llm.engine.runner.lora.num_swaps_in > 2  # three adapters through two slots

        # The same name, another folder: rank 1 must not keep serving the old weights.
        llm.engine.remove_lora("sql")
        llm.engine.add_lora("sql", str(other))
        [again] = llm.generate([prompts[changed]], GREEDY, use_tqdm=False,
                               lora_request=LoRARequest("sql", 9, str(other)))
        assert again.outputs[0].token_ids == want_other[changed]
    finally:
        llm.shutdown()
