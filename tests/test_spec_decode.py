"""Speculative decoding end to end on the CPU, float32: the engine with
`speculative_config` against the same engine without it.

Greedy outputs (and seeded random ones: verification draws each position's
token from the same counter-based noise) must be the very same tokens, with
the same finish reasons and logprobs, across mixed batches of requests that
do and do not speculate, chunked prefill, n > 1, stops inside an accepted
run and preemption under a too-small pool; the KV pool must be whole at the
end and the scheduler's block invariants must hold after every step. A
chi-square test checks that unseeded sampling keeps the target distribution.
The engine-level checks run for each served proposer (n-gram and suffix); the
suffix method's are skipped, saying why, where arctic-inference is not installed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bench.draft_models import write_draft_model
from inference import LLM, SamplingParams
from inference.spec_decode.config import suffix_decoding_installed

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
SUFFIX = {"method": "suffix", "num_speculative_tokens": 4}
# Its "model" is the target's first layer (`with_draft`): a smaller model with the very same tokenizer.
DRAFT = {"method": "draft_model", "num_speculative_tokens": 4}
NOISE = 0.5
needs_suffix = pytest.mark.skipif(not suffix_decoding_installed(),
                                  reason="arctic-inference is not installed (`make arctic-inference` builds it)")


@pytest.fixture(scope="session")
def draft_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("drafts")


@pytest.fixture(params=[pytest.param(NGRAM, id="ngram"), pytest.param(SUFFIX, id="suffix", marks=needs_suffix),
                        pytest.param(DRAFT, id="draft_model")])
def spec(request, draft_root) -> Callable[[Path], dict]:
    """Each served method's config, for a target folder."""
    return functools.partial(with_draft, request.param, draft_root)


def with_draft(spec: dict, draft_root: Path, folder: Path) -> dict:
    """`spec` for the target in `folder`; a draft model's is the target's first layer (written once), its
    embeddings and final norm blurred by noise so that it guesses wrong now and then (a tiny target's
    scaled-up embeddings decide its next token so much that its first layer alone agrees with it on every
    token)."""
    if spec["method"] != "draft_model":
        return spec
    draft = draft_root / f"{folder.parent.name}-{folder.name}"
    if not draft.exists():
        write_draft_model(folder, draft, layers=[0])
        if folder.name.startswith("tiny"):
            weights = load_file(draft / "model.safetensors")
            gen = torch.Generator().manual_seed(0)
            embed, norm = weights["model.embed_tokens.weight"], weights["model.norm.weight"]
            embed += torch.randn(embed.shape, generator=gen) * embed.std() * NOISE
            norm *= (torch.randn(norm.shape, generator=gen) * NOISE).exp()
            save_file(weights, draft / "model.safetensors", metadata={"format": "pt"})
    return {**spec, "model": str(draft)}


def engines(folder, spec: dict | Callable[[Path], dict] = NGRAM, **kwargs) -> tuple[LLM, LLM]:
    """(without, with) speculation, otherwise alike."""
    config = spec(Path(folder)) if callable(spec) else spec
    kwargs = dict(model=str(folder), dtype="float32", **kwargs)
    return LLM(**kwargs), LLM(**kwargs, speculative_config=config)


def mixed_batch(seed: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """Repetitive prompts (they speculate), random ones (they rarely find a
    match), long ones (chunked prefill at 64 tokens a step), with every
    finishing rule and n=2 among them."""
    gen = torch.Generator().manual_seed(seed)
    prompts, params = [], []
    for i in range(12):
        if i % 3 == 0:
            prompt = torch.randint(0, 256, (6 + i,), generator=gen).tolist() * 5
        elif i % 3 == 1:
            prompt = torch.randint(0, 256, (9 + 2 * i,), generator=gen).tolist()
        else:
            prompt = torch.randint(0, 256, (40,), generator=gen).tolist() * 4  # 160 tokens: three chunks
        prompts.append(prompt)
        params.append(SamplingParams(
            temperature=0.0, max_tokens=20 + i, ignore_eos=i % 4 != 0, n=2 if i == 4 else 1,
            logprobs=3 if i == 5 else None, stop_token_ids=[prompt[3]] if i == 6 else [],
        ))
    return prompts, params


def summary(outputs) -> list[tuple]:
    return [(c.token_ids, c.finish_reason, c.stop_reason) for o in outputs for c in o.outputs]


def check_blocks(llm: LLM) -> None:
    """The scheduler's invariants between two steps: each running request
    holds the blocks of its valid tokens and no more, only blocks of valid
    tokens are cached, and the pool adds up."""
    scheduler = llm.engine.scheduler
    bm = scheduler.block_manager
    for request in scheduler.running:
        assert len(request.block_table) == -(-request.num_computed_tokens // bm.block_size), request.request_id
        num_full = request.num_computed_tokens // bm.block_size
        assert all(bm.blocks[b].block_hash is None for b in request.block_table[num_full:]), request.request_id
    held = sum(b.ref_cnt > 0 for b in bm.blocks)
    assert held + bm.num_free_blocks == bm.num_blocks


def generate_checked(llm: LLM, prompts, params) -> list:
    """`generate`, with `check_blocks` after every step."""
    engine = llm.engine
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), prompt, p)
    done = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                done[output.request_id] = output
        check_blocks(llm)
    stats = llm.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    return [done[str(i)] for i in range(len(prompts))]


def check_counters(stats) -> None:
    spec = stats.spec_decode
    per_pos = spec.num_accepted_tokens_per_pos
    assert sum(per_pos) == spec.num_accepted_tokens <= spec.num_draft_tokens
    assert all(a >= b for a, b in zip([spec.num_drafts, *per_pos], per_pos))


def test_greedy_mixed_batch_is_identical_with_speculation(tiny_model, spec):
    model_type, folder, _ = tiny_model
    off, on = engines(folder, spec, num_kv_blocks=512, max_num_batched_tokens=64)
    prompts, params = mixed_batch(seed=1)
    expected = off.generate(prompts, params, use_tqdm=False)
    outputs = generate_checked(on, prompts, params)
    assert summary(outputs) == summary(expected)
    for got, want in zip(outputs[5].outputs[0].logprobs, expected[5].outputs[0].logprobs):
        assert got.keys() == want.keys()
        for token, entry in got.items():
            assert abs(entry.logprob - want[token].logprob) < 1e-4 and entry.rank == want[token].rank
    stats = on.stats()
    check_counters(stats)
    counts = stats.spec_decode
    # Both outcomes ran: accepted guesses, and rejected ones whose slots were rolled back. But the tiny
    # Qwen2 (tied, scaled-up embeddings) only ever repeats its last token, which any draft of it guesses.
    assert 0 < counts.num_accepted_tokens
    assert counts.num_accepted_tokens < counts.num_draft_tokens or (
        model_type == "qwen2" and on.engine.config.speculative.method == "draft_model")
    assert off.stats().spec_decode is None


def test_preemption_with_a_too_small_pool(tiny_llama_dir, spec):
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (5 + i,), generator=gen).tolist() * 4 for i in range(16)]
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)] * 16
    roomy, _ = engines(tiny_llama_dir, spec, num_kv_blocks=512)
    expected = roomy.generate(prompts, params, use_tqdm=False)
    _, tight = engines(tiny_llama_dir, spec, num_kv_blocks=16)
    outputs = generate_checked(tight, prompts, params)
    assert summary(outputs) == summary(expected)
    stats = tight.stats()
    assert stats.num_preemptions > 0 and stats.spec_decode.num_accepted_tokens > 0
    check_counters(stats)


def test_seeded_sampling_is_identical_with_speculation(tiny_llama_dir, spec):
    """Every sampling transform at once: the drafts see the same history as the
    tokens they stand for, so each position draws the same token."""
    off, on = engines(tiny_llama_dir, spec, num_kv_blocks=256)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (7 + i,), generator=gen).tolist() * 4 for i in range(6)]
    params = SamplingParams(
        temperature=0.5, top_k=40, top_p=0.95, min_p=0.02, repetition_penalty=1.01, presence_penalty=0.02,
        frequency_penalty=0.01, logit_bias={prompts[0][0]: 2.0}, min_tokens=4, seed=7, n=2, max_tokens=24,
    )
    expected = off.generate(prompts, params, use_tqdm=False)
    alone = on.generate(prompts[:1], params, use_tqdm=False)
    outputs = on.generate(prompts, params, use_tqdm=False)
    assert summary(outputs) == summary(expected)
    assert summary(alone) == summary(expected[:1])
    assert on.stats().spec_decode.num_accepted_tokens > 0


def test_unseeded_sampling_keeps_the_target_distribution(tiny_llama_dir):
    """Chi-square: the second output token of many unseeded samples against
    its exact distribution from transformers. The prompt is the model's own
    greedy loop and the temperature low (the tiny model's logits lie within
    about 0.5 of each other), so most samples draft that token and about half
    of the drafts are accepted: both branches of the rejection sampler count."""
    from transformers import AutoModelForCausalLM

    _, on = engines(tiny_llama_dir, num_kv_blocks=2048, max_num_seqs=256, max_num_batched_tokens=2048)
    [loop] = on.generate([[100, 5, 77]], SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True),
                         use_tqdm=False)
    prompt = [100, 5, 77, *loop.outputs[0].token_ids]
    num_samples, temperature = 3000, 0.01
    torch.manual_seed(0)  # unseeded requests draw from the global generator: the same draws each run, no flakes
    params = SamplingParams(temperature=temperature, max_tokens=3, ignore_eos=True, n=100)  # one draft: token 2
    before = on.stats().spec_decode
    outputs = on.generate([prompt] * (num_samples // 100), params, use_tqdm=False)
    seconds = torch.tensor([c.token_ids[1] for o in outputs for c in o.outputs])
    spec = on.stats().spec_decode
    num_drafts = spec.num_drafts - before.num_drafts
    num_accepted = spec.num_accepted_tokens - before.num_accepted_tokens
    assert num_drafts > num_samples / 2 and 0.2 < num_accepted / num_drafts < 0.8, (num_drafts, num_accepted)

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        first = (hf(torch.tensor([prompt])).logits[0, -1] / temperature).softmax(-1)
        vocab = first.shape[0]
        second = (hf(torch.tensor([prompt + [t] for t in range(vocab)])).logits[:, -1] / temperature).softmax(-1)
    expected = (first[:, None] * second).sum(0).double() * num_samples  # over (first token, second token)
    observed = torch.bincount(seconds, minlength=vocab).double()
    # Pool the rare tokens into one bin so every bin expects at least 5.
    common = expected >= 5
    observed = torch.cat([observed[common], observed[~common].sum()[None]])
    expected = torch.cat([expected[common], expected[~common].sum()[None]])
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = len(expected) - 1
    p_value = torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), statistic / 2)
    assert dof >= 3 and p_value > 1e-3, (statistic.item(), dof)


def test_default_model_greedy_is_identical_with_speculation(smollm2_dir, spec):
    off, on = engines(smollm2_dir, spec, kv_cache_memory=128 * 1024**2, max_num_batched_tokens=64)
    tokenizer = on.tokenizer
    text = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n"
    copy = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Repeat this code exactly:\n{text}"}], add_generation_prompt=True,
        tokenize=True, return_dict=False)
    prompts = [copy, tokenizer.encode("The three primary colours are")]
    params = SamplingParams(temperature=0.0, max_tokens=24)
    expected = off.generate(prompts, params, use_tqdm=False)
    assert summary(generate_checked(on, prompts, [params] * 2)) == summary(expected)
    counts = on.stats().spec_decode
    # SmolLM2's first layer alone, as a draft, guesses almost nothing right: it checks exactness only.
    assert counts.num_draft_tokens > 0 if on.engine.config.speculative.method == "draft_model" else \
        counts.num_accepted_tokens > 0

    # A stop string met inside an accepted run ends the text where it does without speculation.
    text = expected[0].outputs[0].text
    stop = SamplingParams(temperature=0.0, max_tokens=24, stop=[text[12:16]])
    [want], [got] = off.generate(prompts[:1], stop, use_tqdm=False), on.generate(prompts[:1], stop, use_tqdm=False)
    assert (got.outputs[0].text, got.outputs[0].finish_reason) == (want.outputs[0].text, "stop")
    assert got.outputs[0].token_ids == want.outputs[0].token_ids and len(want.outputs[0].text) <= 12


def test_structured_outputs_are_refused_while_speculating(tiny_llama_dir):
    from inference.sampling_params import StructuredOutputsParams

    _, on = engines(tiny_llama_dir, num_kv_blocks=16)
    with pytest.raises(ValueError, match="structured_outputs cannot be combined with speculative decoding"):
        on.generate([[1, 2, 3]], SamplingParams(structured_outputs=StructuredOutputsParams(regex="a+")),
                    use_tqdm=False)


@pytest.mark.slow
@pytest.mark.parametrize("method", [NGRAM, DRAFT], ids=["ngram", "draft_model"])
def test_tensor_parallel_greedy_is_identical_with_speculation(tiny_llama_dir, draft_root, method):
    """Rank 1 runs every verifying step's forward (the drafts' logits rows included) beside rank 0; a draft
    model runs whole on rank 0 alone, with no collective."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # two ranks on two cores
    try:
        prompts, params = mixed_batch(seed=2)
        # First: one group per process, and once the split engine joined it the whole model would reduce over it.
        expected = LLM(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=256).generate(
            prompts, params, use_tqdm=False)
        split = LLM(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=256, tensor_parallel_size=2,
                    speculative_config=with_draft(method, draft_root, tiny_llama_dir))
        assert summary(split.generate(prompts, params, use_tqdm=False)) == summary(expected)
        assert split.stats().spec_decode.num_accepted_tokens > 0
        split.shutdown()
    finally:
        torch.set_num_threads(before)


def test_a_short_draft_pool_drafts_less_never_wrongly(tiny_llama_dir, draft_root):
    """The draft model's own blocks: with room for two requests' KV among six, others' state is dropped
    to make room and a request that still does not fit drafts nothing, and the tokens stay the target's;
    every block comes back once the requests are done."""
    from inference.spec_decode.draft_model import DraftModelProposer

    off, on = engines(tiny_llama_dir, functools.partial(with_draft, DRAFT, draft_root), num_kv_blocks=256)
    runner = on.engine.runner
    config = on.engine.config
    # Six 16-token blocks: a request of 40 to 70 tokens holds three or more.
    runner.proposer = small = DraftModelProposer(runner.draft, config.speculative, 6, config.block_size,
                                                config.max_model_len, config.max_num_batched_tokens, runner.device)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 256, (8 + i,), generator=gen).tolist() * 4 for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    expected = off.generate(prompts, params, use_tqdm=False)
    assert summary(on.generate(prompts, params, use_tqdm=False)) == summary(expected)
    counts = on.stats().spec_decode
    assert 0 < counts.num_accepted_tokens and counts.num_drafts < sum(len(o.outputs[0].token_ids) for o in expected)
    # The last request's state goes when its finish reaches the proposer, in the next step.
    on.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
    assert sum(len(state.block_table) for state in small.states.values()) + len(small.blocks.free) == 6
    assert len(small.states) <= 1


def test_drafts_are_the_draft_models_own_greedy_continuation(tiny_llama_dir, draft_root):
    """The draft model, run by itself as an engine, continues each request's tokens with exactly the drafts
    the proposer made, through prompt catch-up across steps (a 150-token prompt, 64 tokens a step),
    accepted and rejected drafts."""
    config = with_draft(DRAFT, draft_root, tiny_llama_dir)
    on = LLM(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=256, max_num_batched_tokens=64,
             speculative_config=config)
    draft = LLM(model=config["model"], dtype="float32", num_kv_blocks=256)
    gen = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (150, 9)]
    engine = on.engine
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    checked = 0
    while engine.has_unfinished_requests():
        engine.step()
        for request in engine.scheduler.running:
            if request.spec_token_ids:
                [want] = draft.generate([request.token_ids], SamplingParams(temperature=0.0, max_tokens=4,
                                                                           ignore_eos=True), use_tqdm=False)
                assert request.spec_token_ids == want.outputs[0].token_ids, request.request_id
                checked += 1
    counts = on.stats().spec_decode
    assert checked > 10 and 0 < counts.num_accepted_tokens < counts.num_draft_tokens


def test_a_draft_model_never_drafts_past_its_positions(tiny_llama_dir, draft_root, tmp_path):
    """Near the end of the positions (the target's max_model_len 48, and the draft's own table, cut to 44)
    the drafts shrink to what fits, down to none, and the tokens stay the target's."""
    import json
    import shutil

    draft = Path(with_draft(DRAFT, draft_root, tiny_llama_dir)["model"])
    short = tmp_path / "short-draft"
    shutil.copytree(draft, short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 44}))
    off, on = engines(tiny_llama_dir, {**DRAFT, "model": str(short)}, num_kv_blocks=64, max_model_len=48)
    prompt = list(range(30, 70))  # 40 tokens: 8 positions left, 4 of them in the draft's table
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    [want], [got] = off.generate([prompt], params, use_tqdm=False), on.generate([prompt], params, use_tqdm=False)
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    assert 0 < on.stats().spec_decode.num_draft_tokens
