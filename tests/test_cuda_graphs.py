"""The decode fast path: padded graph buckets, persistent step buffers, no host syncs.

On the CPU, `enforce_eager=False` runs decode batches padded to their graph
bucket eagerly (nothing is captured), so the padding itself is checked here
against the unpadded path. The CUDA cases (skipped without a GPU) capture the
graphs for real and compare them with eager execution.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from inference import LLM, SamplingParams
from inference.cuda_graphs import decode_buckets
from server.cli import build_parser, engine_config_from_args, main

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
SYNC_OPS = {"aten::item", "aten::_local_scalar_dense", "aten::nonzero"}


def prompts(count: int) -> list[list[int]]:
    # lengths 3..58: decode batches of every size 1..count appear as requests finish
    return [[(7 * i + 3 * j) % 250 for j in range(3 + 5 * i)] for i in range(count)]


def generate(folder, *, enforce_eager: bool, device: str = "cpu", count: int = 11, **kwargs) -> list[list[int]]:
    llm = LLM(model=str(folder), dtype="float32", device=device, num_kv_blocks=96, max_num_seqs=16,
              max_num_batched_tokens=48, enforce_eager=enforce_eager, **kwargs)
    params = [SamplingParams(temperature=0.0, max_tokens=8 + 2 * i, ignore_eos=True) for i in range(count)]
    outputs = llm.generate(prompts(count), params, use_tqdm=False)
    stats = llm.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    return [o.outputs[0].token_ids for o in outputs]


def test_buckets_cover_every_batch_size():
    assert decode_buckets(1) == [1]
    assert decode_buckets(16) == [1, 2, 4, 8, 16]
    assert decode_buckets(256)[:6] == [1, 2, 4, 8, 16, 32] and decode_buckets(256)[-1] == 256
    assert decode_buckets(40) == [1, 2, 4, 8, 16, 32, 40]


def test_capture_sizes_bound_the_buckets():
    assert decode_buckets(256, max_capture_size=32) == [1, 2, 4, 8, 16, 32]
    assert decode_buckets(256, max_capture_size=40) == [1, 2, 4, 8, 16, 32, 40]
    assert decode_buckets(8, max_capture_size=64) == [1, 2, 4, 8]  # never past max_num_seqs
    assert decode_buckets(16, capture_sizes=(4, 1, 64, 4)) == [1, 4]
    assert decode_buckets(64, 8, (1, 2, 3, 16)) == [1, 2, 3]


def test_capture_flags_reach_the_engine_config_as_vllms_do(tiny_llama_dir):
    args = build_parser().parse_args(["serve", "--model", str(tiny_llama_dir), "--max-cudagraph-capture-size", "8",
                                      "--cudagraph-capture-sizes", "1", "2", "8", "32"])
    config = engine_config_from_args(args)
    assert (config.max_cudagraph_capture_size, config.cudagraph_capture_sizes) == (8, (1, 2, 8, 32))


@pytest.mark.parametrize("args", [("--max-cudagraph-capture-size", "0"), ("--cudagraph-capture-sizes", "4", "-1"),
                                  ("--cudagraph-capture-sizes", "x")])
def test_bad_capture_sizes_exit_2(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", *args])
    assert exit_info.value.code == 2
    assert "a decode batch size must be a whole number >= 1" in capsys.readouterr().err


def test_decode_batches_over_the_largest_capture_size_run_unpadded(tiny_llama_dir):
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=96, max_num_seqs=16,
              max_num_batched_tokens=48, enforce_eager=False, max_cudagraph_capture_size=4)
    assert llm.engine.runner.graphs.buckets == [1, 2, 4]
    params = [SamplingParams(temperature=0.0, max_tokens=8 + 2 * i, ignore_eos=True) for i in range(11)]
    outputs = llm.generate(prompts(11), params, use_tqdm=False)  # decode batches of 1..11 requests
    assert [o.outputs[0].token_ids for o in outputs] == generate(tiny_llama_dir, enforce_eager=True)


def test_padded_buckets_give_the_unpadded_tokens(tiny_model):
    _, folder, _ = tiny_model
    assert generate(folder, enforce_eager=False) == generate(folder, enforce_eager=True)


def test_padded_buckets_give_the_unpadded_tokens_on_smollm2(smollm2_dir):
    eager = generate(smollm2_dir, enforce_eager=True, count=6, max_model_len=512)
    padded = generate(smollm2_dir, enforce_eager=False, count=6, max_model_len=512)
    assert padded == eager


def test_padding_rows_never_touch_request_blocks(tiny_llama_dir):
    """Padding writes only the scratch block past the block manager's range."""
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=32, max_num_seqs=8, enforce_eager=False)
    runner = llm.engine.runner
    assert runner.buffers.scratch_block_id == runner.num_blocks == llm.stats().num_total_blocks
    assert runner.kv_caches[0][0].shape[0] == runner.num_blocks + 1
    llm.generate(prompts(3), GREEDY, use_tqdm=False)  # 3 requests run padded to 4
    before = [k[: runner.num_blocks].clone() for k, _ in runner.kv_caches]
    engine = llm.engine
    engine.add_request("x", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    written = [(k[: runner.num_blocks] != b).any(dim=(1, 2, 3)).nonzero().flatten().tolist()
               for (k, _), b in zip(runner.kv_caches, before)]
    assert all(len(blocks) == 1 for blocks in written)  # the one block of request "x"


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "padded"])
def test_decode_steps_issue_no_host_syncs(tiny_llama_dir, enforce_eager):
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=64, max_num_seqs=8,
              enforce_eager=enforce_eager)
    engine = llm.engine
    for i in range(5):
        engine.add_request(str(i), prompts(5)[i], SamplingParams(max_tokens=12, ignore_eos=True))
    engine.step()  # the prefill; what follows is decode only
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            assert engine.step()
    names = {event.name for event in prof.events()}
    assert not names & SYNC_OPS, f"decode step synchronises: {names & SYNC_OPS}"


# ---- CUDA only ---------------------------------------------------------------


@needs_cuda
def test_graphs_give_the_eager_tokens_on_cuda(tiny_model):
    _, folder, _ = tiny_model
    assert generate(folder, enforce_eager=False, device="cuda") == generate(folder, enforce_eager=True, device="cuda")


@needs_cuda
def test_graph_replay_equals_eager_for_every_bucket(tiny_llama_dir):
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", device="cuda", num_kv_blocks=256, max_num_seqs=40,
              enforce_eager=False)
    runner = llm.engine.runner
    graphs = runner.graphs
    assert sorted(graphs.graphs) == graphs.buckets == [1, 2, 4, 8, 16, 32, 40]
    engine = llm.engine
    for i in range(40):
        engine.add_request(str(i), [1 + i, 2, 3 + i % 7], SamplingParams(max_tokens=4, ignore_eos=True))
    engine.step()  # prefill every request: the cache holds real context
    requests = list(engine.scheduler.running)
    for size in graphs.buckets:
        scheduled = [(r, 1) for r in requests[: max(size - 1, 1)]]  # one short of the bucket: padded
        batch = runner.buffers.prepare(scheduled, graphs.bucket_for(len(scheduled)))
        replayed = graphs.run(batch)[: batch.num_tokens].clone()
        eager = graphs._forward(batch)[: batch.num_tokens]
        torch.testing.assert_close(replayed, eager, atol=1e-5, rtol=1e-5)


@needs_cuda
def test_decode_step_is_sync_free_on_cuda(tiny_llama_dir):
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", device="cuda", num_kv_blocks=64, max_num_seqs=8,
              enforce_eager=False)
    runner = llm.engine.runner
    engine = llm.engine
    for i in range(5):
        engine.add_request(str(i), prompts(5)[i], SamplingParams(max_tokens=12, ignore_eos=True))
    engine.step()
    sched = engine.scheduler.schedule()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch = runner.buffers.prepare(sched.scheduled, runner.graphs.bucket_for(len(sched.scheduled)))
        runner.graphs.run(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
def test_capture_failure_names_the_bucket(tiny_llama_dir, monkeypatch):
    from inference.models.llama import LlamaForCausalLM

    real_forward = LlamaForCausalLM.forward

    def syncing_forward(self, input_ids, positions, meta):
        if input_ids.shape[0] == 8 and torch.cuda.is_current_stream_capturing():
            input_ids.sum().item()  # a host sync: illegal during capture
        return real_forward(self, input_ids, positions, meta)

    monkeypatch.setattr(LlamaForCausalLM, "forward", syncing_forward)
    with pytest.raises(RuntimeError, match="decode batch size 8"):
        LLM(model=str(tiny_llama_dir), dtype="float32", device="cuda", num_kv_blocks=16, max_num_seqs=8,
            enforce_eager=False)
