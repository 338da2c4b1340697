"""Speculative verify steps through CUDA graphs: one verify shape per decode bucket.

On the CPU, `enforce_eager=False` runs a verify step padded to its graph
shape (b rows, b * (k + 1) tokens, `max_query_len` k + 1) eagerly, so the
padded layout is checked here against the unpadded path: the same greedy
tokens as enforce_eager and as speculation off (test_spec_decode's mixed
batch and LoRA adapters included), the same sampled rows, padding that
writes only the scratch block, and a plan that another tensor-parallel rank
decodes to the same graph shape (tests/test_tensor_parallel.py runs two). The
CUDA cases (skipped without a GPU) capture the verify graphs and compare
their replay with eager execution.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from lora_fixtures import build_adapters
from test_spec_decode import DRAFT, generate_checked, mixed_batch, summary, with_draft

from inference import LLM, SamplingParams
from inference.lora.config import LoRARequest
from inference.parallel.step_message import StepPlan, decode_step, encode_step
from inference.sampling_plan import plan_logits
from inference.step_buffers import StepBatch, StepBuffers

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
K = 4
NGRAM = {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


def engine(folder, *, enforce_eager: bool, speculative: bool = True, device: str = "cpu", **kwargs) -> LLM:
    return LLM(model=str(folder), dtype="float32", device=device, num_kv_blocks=128, max_num_seqs=8,
               max_num_batched_tokens=64, enforce_eager=enforce_eager,
               speculative_config=NGRAM if speculative else None, **kwargs)


def workload(count: int = 7) -> tuple[list[list[int]], list[SamplingParams]]:
    """Copy-heavy prompts (the n-gram proposer finds drafts, some accepted, some
    not) beside random ones (few or no drafts), finishing at different steps
    so the batch shrinks through every bucket."""
    gen = torch.Generator().manual_seed(3)
    prompts = []
    for i in range(count):
        if i % 3 == 2:
            prompts.append(torch.randint(0, 256, (11 + i,), generator=gen).tolist())
        else:
            prompts.append(torch.randint(0, 256, (3 + i,), generator=gen).tolist() * 4)
    params = [SamplingParams(temperature=0.0, max_tokens=10 + 3 * i, ignore_eos=True) for i in range(count)]
    return prompts, params


def record_verify_steps(llm: LLM) -> list[tuple[list[int], StepBatch]]:
    """Spy on the runner: per graph run of a verify shape, each request's draft
    count and the batch (copied) it ran."""
    runner = llm.engine.runner
    steps: list[tuple[list[int], StepBatch]] = []
    drafts: list[int] = []
    execute, run = runner.execute, runner.graphs.run

    def recording_execute(output):
        drafts[:] = [len(output.spec_token_ids.get(r.request_id, [])) for r, _ in output.scheduled]
        return execute(output)

    def recording_run(batch: StepBatch) -> torch.Tensor:
        if batch.max_query_len > 1:
            steps.append((list(drafts), replace(batch)))
        return run(batch)

    runner.execute, runner.graphs.run = recording_execute, recording_run
    return steps


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_verify_steps_replay_padded_and_give_the_eager_tokens(tiny_model):
    _, folder, _ = tiny_model
    prompts, params = workload()
    padded = engine(folder, enforce_eager=False)
    assert padded.engine.runner.graphs.verify_len == K + 1
    steps = record_verify_steps(padded)
    got = tokens(padded.generate(prompts, params, use_tqdm=False))
    eager = tokens(engine(folder, enforce_eager=True).generate(prompts, params, use_tqdm=False))
    plain = tokens(engine(folder, enforce_eager=False, speculative=False).generate(prompts, params, use_tqdm=False))
    assert got == eager == plain
    spec = padded.stats().spec_decode
    assert 0 < spec.num_accepted_tokens < spec.num_draft_tokens  # drafts both kept and rolled back
    assert steps, "no verify step ran padded"
    for drafts, batch in steps:
        assert batch.num_padded_tokens == batch.num_padded_reqs * (K + 1) and batch.max_query_len == K + 1
        assert batch.num_tokens == len(drafts) + sum(drafts) and max(drafts) > 0
    # What the padding covers: padding rows, requests short of k drafts, requests with none.
    assert any(b.num_padded_reqs > b.num_reqs for _, b in steps)
    assert any(0 < d < K for drafts, _ in steps for d in drafts)
    assert any(0 in drafts for drafts, _ in steps)


def test_mixed_batch_with_verify_shapes_matches_speculation_off(tiny_llama_dir):
    """test_spec_decode's mixed batch (chunked prefill, n=2, logprobs, stops) with
    graph shapes on: the same tokens, finish reasons and logprobs as without
    speculation, the pool whole and the block invariants kept after every step."""
    prompts, params = mixed_batch(seed=1)
    kwargs = dict(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=512, max_num_batched_tokens=64)
    expected = LLM(**kwargs).generate(prompts, params, use_tqdm=False)
    padded = LLM(**kwargs, enforce_eager=False, speculative_config=NGRAM)
    steps = record_verify_steps(padded)
    outputs = generate_checked(padded, prompts, params)
    assert summary(outputs) == summary(expected)
    for got, want in zip(outputs[5].outputs[0].logprobs, expected[5].outputs[0].logprobs):
        assert got.keys() == want.keys()
        assert all(abs(entry.logprob - want[token].logprob) < 1e-4 for token, entry in got.items())
    assert steps, "no verify step ran padded"


def test_lora_verify_steps_replay_padded_and_give_the_eager_tokens(tiny_llama_dir, tmp_path_factory):
    """Speculation with adapters: verify steps padded to their graph shape (the
    padding tokens' `lora_slots` 0) give the eager tokens."""
    adapters = build_adapters(tiny_llama_dir, tmp_path_factory.mktemp("lora-verify"))
    names = [None, "sql", "chat", "code", None]
    prompts, params = workload(len(names))
    requests = [None if n is None else LoRARequest(n, i + 1, str(adapters[n])) for i, n in enumerate(names)]

    def generate(enforce_eager: bool) -> list[list[int]]:
        llm = engine(tiny_llama_dir, enforce_eager=enforce_eager, enable_lora=True, max_loras=2)
        steps = record_verify_steps(llm) if not enforce_eager else []
        outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=requests)
        assert steps or enforce_eager, "no verify step ran padded"
        return tokens(outputs)

    assert generate(enforce_eager=False) == generate(enforce_eager=True)


def test_verify_layout_keeps_the_eager_rows(tiny_llama_dir):
    """A verify batch padded to its graph shape: the real rows as eager, the
    same sampled rows, padding rows and the tokens in no row on the scratch
    block; encoded for another rank, it decodes to the same graph shape."""
    llm = engine(tiny_llama_dir, enforce_eager=False)
    runner, engine_ = llm.engine.runner, llm.engine
    for i, prompt in enumerate(([5, 6, 7] * 4, [9, 8] * 5, [1, 2, 3, 4, 5])):
        engine_.add_request(str(i), prompt, SamplingParams(max_tokens=12, ignore_eos=True))
    engine_.step()  # the prefills
    requests = list(engine_.scheduler.running)
    drafts = {requests[0].request_id: [11, 12, 13], requests[1].request_id: [14]}  # k - 1, 1 and no drafts
    scheduled = [(r, 1 + len(drafts.get(r.request_id, []))) for r in requests]
    assert runner.graphs.shape_for(scheduled, drafts) == (4, K + 1)
    assert runner.graphs.shape_for([(requests[0], 5)], {}) is None  # a prompt chunk: eager
    assert runner.graphs.shape_for(scheduled, {}) is None  # tokens past the drafts

    buffers = runner.buffers
    eager = buffers.prepare(scheduled, len(scheduled), drafts)
    eager_arrays = {name: buffers.np[name][: eager.num_tokens].copy() for name in ("input_ids", "positions",
                                                                                  "slot_mapping")}
    eager_plan = StepPlan(eager, [])
    eager_rows, _, _ = plan_logits(scheduled, drafts, buffers.np["query_start_loc"], eager_plan)
    eager_qsl = buffers.np["query_start_loc"][: len(scheduled) + 1].copy()

    batch = buffers.prepare(scheduled, 4, drafts, K + 1)
    h = buffers.np
    n, t, scratch = batch.num_tokens, batch.num_padded_tokens, runner.num_blocks
    assert (batch.num_reqs, batch.num_padded_reqs, n, t, batch.max_query_len) == (3, 4, 7, 20, K + 1)
    assert (h["query_start_loc"][:4] == eager_qsl).all() and h["query_start_loc"][4] == n + 1
    for name, values in eager_arrays.items():
        assert (h[name][:n] == values).all(), name
    assert (h["slot_mapping"][n:t] == scratch * runner.block_size).all()
    assert (h["positions"][n:t] == 0).all() and h["seq_lens"][3] == 1 and h["block_tables"][3, 0] == scratch
    plan = StepPlan(batch, [], use_graph=True)
    rows, _, _ = plan_logits(scheduled, drafts, h["query_start_loc"], plan)
    assert plan.sample_rows == eager_plan.sample_rows == list(range(n))  # every real token verifies
    assert rows == eager_rows

    other = StepBuffers(t, runner.config.max_num_seqs, h["block_tables"].shape[1], runner.block_size, scratch,
                        torch.device("cpu"))
    received = decode_step(other, encode_step(buffers, plan))
    assert received == plan and received.batch.max_query_len == K + 1
    for name in ("input_ids", "positions", "slot_mapping"):
        assert (other.np[name][:t] == h[name][:t]).all(), name


def test_verify_padding_never_touches_request_blocks(tiny_llama_dir):
    """Padding rows and the tokens in no row write only the scratch block."""
    llm = engine(tiny_llama_dir, enforce_eager=False)
    runner = llm.engine.runner
    steps = record_verify_steps(llm)
    owned: set[int] = set()
    execute = runner.execute

    def recording_execute(output):
        owned.update(b for r, _ in output.scheduled for b in r.block_table)
        return execute(output)

    runner.execute = recording_execute
    for k, v in runner.kv_caches:
        # A value no store gives: a padding write must change the scratch block, whatever it held.
        k[runner.num_blocks].fill_(12345.0)
        v[runner.num_blocks].fill_(12345.0)
    before = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    prompts, params = workload(3)  # 3 requests: bucket 4, one padding row
    llm.generate(prompts, params, use_tqdm=False)
    assert any(b.num_padded_reqs > b.num_reqs for _, b in steps)
    assert any(b.num_padded_tokens > b.num_tokens + b.num_padded_reqs - b.num_reqs for _, b in steps)
    for (k, v), (k0, v0) in zip(runner.kv_caches, before):
        for cache, old in ((k, k0), (v, v0)):
            written = set((cache != old).any(dim=(1, 2, 3)).nonzero().flatten().tolist())
            assert runner.num_blocks in written  # the scratch block
            assert written - {runner.num_blocks} <= owned


# ---- CUDA only ---------------------------------------------------------------


@needs_cuda
def test_verify_graphs_give_the_eager_tokens_on_cuda(tiny_model):
    _, folder, _ = tiny_model
    prompts, params = workload()
    graphs = engine(folder, enforce_eager=False, device="cuda")
    assert sorted(graphs.engine.runner.graphs.verify_graphs) == graphs.engine.runner.graphs.buckets
    steps = record_verify_steps(graphs)
    got = tokens(graphs.generate(prompts, params, use_tqdm=False))
    assert steps, "no verify graph replayed"
    assert got == tokens(engine(folder, enforce_eager=True, device="cuda").generate(prompts, params, use_tqdm=False))


@needs_cuda
def test_draft_model_on_cuda_gives_the_targets_tokens(tiny_llama_dir, tmp_path):
    """The draft model on the GPU (its prefill tuned at start-up, its own cache), verify graphs on."""
    prompts, params = workload()
    on = LLM(model=str(tiny_llama_dir), dtype="float32", device="cuda", num_kv_blocks=128, max_num_seqs=8,
             max_num_batched_tokens=64, speculative_config=with_draft(DRAFT, tmp_path, tiny_llama_dir))
    steps = record_verify_steps(on)
    got = tokens(on.generate(prompts, params, use_tqdm=False))
    assert steps and on.stats().spec_decode.num_accepted_tokens > 0
    assert got == tokens(engine(tiny_llama_dir, enforce_eager=True, speculative=False, device="cuda").generate(
        prompts, params, use_tqdm=False))


@needs_cuda
def test_verify_graph_replay_equals_eager_for_every_bucket_on_cuda(tiny_llama_dir):
    llm = engine(tiny_llama_dir, enforce_eager=False, device="cuda")
    runner = llm.engine.runner
    graphs = runner.graphs
    engine_ = llm.engine
    for i in range(8):
        engine_.add_request(str(i), [1 + i, 2, 3 + i % 7], SamplingParams(max_tokens=4, ignore_eos=True))
    engine_.step()  # prefill every request: the cache holds real context
    requests = list(engine_.scheduler.running)
    for size in graphs.buckets:
        chosen = requests[: max(size - 1, 1)]  # one short of the bucket: a padding row
        drafts = {r.request_id: [7 + j for j in range(i % (K + 1))] for i, r in enumerate(chosen)}
        drafts[chosen[0].request_id] = [7]  # at least one request verifies
        scheduled = [(r, 1 + len(drafts[r.request_id])) for r in chosen]
        batch = runner.buffers.prepare(scheduled, len(scheduled), drafts)
        with torch.inference_mode():
            eager = runner.model(*runner.buffers.inputs(batch), runner.buffers.metadata(batch)).clone()
        bucket, query_len = graphs.shape_for(scheduled, drafts)
        padded = runner.buffers.prepare(scheduled, bucket, drafts, query_len)
        replayed = graphs.run(padded)[: padded.num_tokens]
        torch.testing.assert_close(replayed, eager, atol=1e-5, rtol=1e-5)


@needs_cuda
def test_verify_step_is_sync_free_on_cuda(tiny_llama_dir):
    llm = engine(tiny_llama_dir, enforce_eager=False, device="cuda")
    runner, engine_ = llm.engine.runner, llm.engine
    for i in range(3):
        engine_.add_request(str(i), [5 + i, 6, 7] * 4, SamplingParams(max_tokens=12, ignore_eos=True))
    engine_.step()  # the prefills
    requests = list(engine_.scheduler.running)
    drafts = {requests[0].request_id: [5, 6], requests[1].request_id: [7]}
    scheduled = [(r, 1 + len(drafts.get(r.request_id, []))) for r in requests]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        bucket, query_len = runner.graphs.shape_for(scheduled, drafts)
        runner.graphs.run(runner.buffers.prepare(scheduled, bucket, drafts, query_len))
    finally:
        torch.cuda.set_sync_debug_mode("default")
