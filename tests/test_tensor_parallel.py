"""Tensor parallelism offline, on the CPU (gloo): the split model against the whole one.

TP=2 gives the same greedy tokens as TP=1 on the tiny Llama, Qwen2 (one KV
head: replicated, not split) and Qwen3 models, and every logits row computed
agrees to 1e-4 (the all-reduces sum in another order), with two samples of
one prompt (copy-on-write block copies) and prompt logprobs in the mix.
SmolLM2 split three ways (9 query heads, 3 KV heads) gives TP=1's tokens on
8 prompts. Speculative decoding with graph shapes on (verify steps padded,
rank 0's plan naming the shape every rank runs) gives TP=1's eager tokens.
A rank that cannot load its shard fails the start-up with its
rank and error, and leaves no process behind. Each rank uses one torch thread.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from server_fixtures import spawned_children

from inference import LLM, SamplingParams
from inference.parallel.layers import shard_heads

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

PROMPTS = ["hello world", "the quick brown fox", "abc", "zzzz top", "0123456789"]
SMOL_PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "Once upon a time", "The three primary colors are",
    "In 1969, astronauts", "import numpy as np\n", "My favourite food is", "Water boils at",
]


def _run(folder, prompts, max_tokens: int, tensor_parallel_size: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens of each sample, and every logits tensor rank 0 computed."""
    llm = LLM(str(folder), dtype="float32", max_model_len=256, num_kv_blocks=96,
              tensor_parallel_size=tensor_parallel_size)
    memory = llm.stats().rank_memory_bytes
    assert len(memory) == tensor_parallel_size and len(set(memory)) == 1  # equal shards, equal caches
    model = llm.engine.runner.model
    logits: list[torch.Tensor] = []
    compute_logits = model.compute_logits

    def recording(hidden: torch.Tensor) -> torch.Tensor:
        out = compute_logits(hidden)
        logits.append(out.clone())
        return out

    model.compute_logits = recording
    try:
        # Two samples of the first prompt share its blocks until they copy
        # one; prompt logprobs add logits rows of their own.
        params = [
            SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, n=2 if i == 0 else 1,
                           prompt_logprobs=1)
            for i in range(len(prompts))
        ]
        outputs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.shutdown()
    return [[c.token_ids for c in o.outputs] for o in outputs], logits


def test_head_sharding_splits_or_replicates_kv_heads():
    assert shard_heads(9, 3, 2, 3) == type(shard_heads(9, 3, 2, 3))(3, 1, 6, 2)
    assert shard_heads(4, 1, 1, 2).num_kv_heads == 1  # one KV head: each rank keeps a copy
    assert shard_heads(8, 2, 3, 4).first_kv_head == 1  # query heads 6, 7 read KV head 1
    with pytest.raises(ValueError, match="num_attention_heads 9"):
        shard_heads(9, 3, 0, 2)
    with pytest.raises(ValueError, match="more than one KV head"):
        shard_heads(12, 3, 0, 2)


def _assert_tp2_matches_tp1(model_type: str, folder) -> None:
    tokens_1, logits_1 = _run(folder, PROMPTS, 12, 1)
    tokens_2, logits_2 = _run(folder, PROMPTS, 12, 2)
    assert tokens_2 == tokens_1, model_type
    assert len(logits_2) == len(logits_1)
    for a, b in zip(logits_1, logits_2):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4)


def test_tp2_matches_tp1(tiny_model):
    _assert_tp2_matches_tp1(*tiny_model[:2])


def test_moe_tp2_matches_tp1(tiny_moe_model):
    """The experts are not split: every rank holds them all and computes the
    whole MoE block, so only attention and the dense layers are sharded."""
    _assert_tp2_matches_tp1(*tiny_moe_model[:2])


def test_smollm2_tp3_matches_tp1(smollm2_dir):
    tokens_1, _ = _run(smollm2_dir, SMOL_PROMPTS, 8, 1)
    tokens_3, _ = _run(smollm2_dir, SMOL_PROMPTS, 8, 3)
    assert tokens_3 == tokens_1


def test_rank_that_cannot_load_names_itself_and_leaves_nothing(tiny_llama_dir, tmp_path):
    # A vocabulary shorter in the checkpoint than in config.json: rank 0's
    # half of the embedding is there, rank 1's is not.
    for path in tiny_llama_dir.iterdir():
        if path.suffix != ".safetensors":
            (tmp_path / path.name).write_bytes(path.read_bytes())
    tensors = load_file(tiny_llama_dir / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = tensors[name][:300].contiguous()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    children_before = set(spawned_children(os.getpid()))
    failure = r"tensor-parallel rank 1 exited with code 1: ValueError\(.*shape \(108, 64\)"
    with pytest.raises(RuntimeError, match=failure):
        LLM(str(tmp_path), max_model_len=256, num_kv_blocks=16, tensor_parallel_size=2)
    assert set(spawned_children(os.getpid())) <= children_before


def test_tp2_speculative_verify_shapes_match_tp1(tiny_llama_dir):
    """With speculative decoding and graph shapes on (the CPU runs them padded,
    eagerly), rank 1 runs the verify shape rank 0's plan names: TP=2 gives
    TP=1's eager tokens, and rank 0 did run padded verify batches."""
    ngram = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    prompts = [[5, 6, 7, 8] * 4, [9, 3] * 6, [1, 2, 3, 4, 5, 6, 7], [40, 41, 42] * 5, [7, 7, 8] * 4]
    params = [SamplingParams(temperature=0.0, max_tokens=10 + 3 * i, ignore_eos=True) for i in range(len(prompts))]

    def run(tensor_parallel_size: int, enforce_eager: bool) -> tuple[list[list[int]], list[tuple[int, int]]]:
        llm = LLM(str(tiny_llama_dir), dtype="float32", max_model_len=256, num_kv_blocks=96, max_num_seqs=8,
                  tensor_parallel_size=tensor_parallel_size, enforce_eager=enforce_eager,
                  speculative_config=ngram)
        shapes: list[tuple[int, int]] = []
        graphs = llm.engine.runner.graphs
        if graphs is not None:
            graph_run = graphs.run

            def recording_run(batch):
                shapes.append((batch.num_padded_reqs, batch.max_query_len))
                return graph_run(batch)

            graphs.run = recording_run
        try:
            outputs = llm.generate(prompts, params, use_tqdm=False)
        finally:
            llm.shutdown()
        return [o.outputs[0].token_ids for o in outputs], shapes

    tokens_1, _ = run(1, enforce_eager=True)
    tokens_2, shapes = run(2, enforce_eager=False)
    assert tokens_2 == tokens_1
    assert any(query_len == 5 for _, query_len in shapes), shapes  # k + 1: verify shapes ran
