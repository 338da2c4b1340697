"""The GPU start-up path, run on the CPU: the profile forward that sizes the
KV cache, and the prefill autotuning that must finish before it.

On a GPU, `ModelRunner` measures the KV budget with one forward of the
largest step and autotunes the prefill kernel's tiles once per length
bucket. Neither runs on the CPU by default (the CPU is given its KV memory,
and its kernels have one config), so these tests drive the same methods on
CPU tensors: the rotary table bound holds on the CPU kernels as on the GPU
ones, and the GPU's memory counters and the autotuner's first-run scratch
buffer are simulated (`SimulatedCudaMemory`, `SimulatedAutotuner`).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

import kernels
from inference.config import EngineConfig
from inference.memory_plan import kv_block_bytes
from inference.model_runner import ModelRunner
from kernels._checks import len_bucket

MAX_POSITIONS = 1024  # the tiny models' max_position_embeddings
GIB = 1024**3


def _config(folder, **kwargs) -> EngineConfig:
    fields = dict(model=str(folder), dtype="float32", device="cpu", block_size=16, max_num_seqs=4,
                  max_num_batched_tokens=4 * MAX_POSITIONS, max_model_len=MAX_POSITIONS, num_kv_blocks=64,
                  enforce_eager=True)
    return EngineConfig(**(fields | kwargs))


def test_start_up_profile_stays_inside_the_rotary_table(tiny_llama_dir) -> None:
    """The largest step (4x the model's positions) is profiled as requests of at most
    max_model_len tokens, as the scheduler builds it; one request of all its tokens
    would read rotary rows past the table, which the CPU kernels refuse as the GPU's
    would read garbage or fault."""
    hf_config = AutoConfig.from_pretrained(tiny_llama_dir)
    assert hf_config.max_position_embeddings == MAX_POSITIONS
    runner = ModelRunner(_config(tiny_llama_dir), hf_config)
    cos_sin_cache = runner.model.rotary.cos_sin_cache
    past_table = torch.arange(MAX_POSITIONS - 2, MAX_POSITIONS + 2)
    q = torch.zeros(len(past_table), 4, 16)
    with pytest.raises((IndexError, RuntimeError)):
        kernels.apply_rotary_embedding(q, q[:, :2].clone(), past_table, cos_sin_cache)

    logits = runner.profile_forward()
    assert logits.shape == (1, hf_config.vocab_size) and torch.isfinite(logits).all()


class SimulatedCudaMemory:
    """torch.cuda's memory counters over a caching allocator that only the simulated
    autotuner allocates from (the CPU forwards use host memory)."""

    def __init__(self, total: int) -> None:
        self.total, self.allocated, self.peak, self.reserved = total, 0, 0, 0

    def allocate_and_free(self, size: int) -> None:
        self.peak = max(self.peak, self.allocated + size)
        self.reserved = max(self.reserved, self.allocated + size)  # cached for reuse after the free

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: setattr(self, "peak", self.allocated))
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: self.peak)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: self.allocated)
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: self.reserved)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (self.total - self.reserved, self.total))
        monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)


class SimulatedAutotuner:
    """Triton's prefill autotuner: the first call in a length bucket, with no
    result in the on-disk cache, times its configs with a 256 MB scratch
    buffer (`do_bench`); later starts read the result from the cache."""

    SCRATCH = 256 * 1024**2

    def __init__(self, memory: SimulatedCudaMemory, disk_cache: set[int]) -> None:
        self.memory, self.disk_cache, self.tuned = memory, disk_cache, set()
        self.real = kernels.paged_attention

    def paged_attention(self, *args, **kwargs):
        max_query_len = args[6]
        if max_query_len > 1 and len_bucket(max_query_len) not in self.tuned:
            bucket = len_bucket(max_query_len)
            self.tuned.add(bucket)
            if bucket not in self.disk_cache:
                self.memory.allocate_and_free(self.SCRATCH)
                self.disk_cache.add(bucket)
        return self.real(*args, **kwargs)


def _simulated_gpu_start(folder, hf_config, disk_cache: set[int], monkeypatch) -> tuple[int, set[int]]:
    """One start with the KV cache sized from (simulated) GPU memory: (blocks, buckets tuned)."""
    memory = SimulatedCudaMemory(total=4 * GIB)
    tuner = SimulatedAutotuner(memory, disk_cache)
    with monkeypatch.context() as patch:
        memory.install(patch)
        patch.setattr(kernels, "paged_attention", tuner.paged_attention)
        patch.setattr(kernels, "prefill_autotunes", lambda device: True)
        config = _config(folder, num_kv_blocks=None, gpu_memory_utilization=0.9, max_num_batched_tokens=1536)
        runner = ModelRunner(config, hf_config)
    return runner.num_blocks, tuner.tuned


def test_first_and_later_starts_get_the_same_blocks_and_tune_every_bucket(tiny_llama_dir, monkeypatch) -> None:
    hf_config = AutoConfig.from_pretrained(tiny_llama_dir)
    disk_cache: set[int] = set()
    first_blocks, first_tuned = _simulated_gpu_start(tiny_llama_dir, hf_config, disk_cache, monkeypatch)
    later_blocks, later_tuned = _simulated_gpu_start(tiny_llama_dir, hf_config, disk_cache, monkeypatch)
    # Steps hold up to 1536 tokens, in requests of up to 1024: every bucket is reachable.
    assert first_blocks == later_blocks
    assert first_tuned == later_tuned == {64, 512, 4096}
    # All of the 0.9 target is left for the KV cache (the CPU forwards take no simulated device
    # memory), less the scratch block.
    assert first_blocks == int(4 * GIB * 0.9) // kv_block_bytes(hf_config, 16, torch.float32) - 1


def test_tuning_lengths_cover_each_reachable_bucket() -> None:
    assert kernels.prefill_tuning_lengths(8192) == [64, 512, 8192]
    assert [len_bucket(n) for n in kernels.prefill_tuning_lengths(8192)] == [64, 512, 4096]
    assert kernels.prefill_tuning_lengths(512) == [64, 512]
    assert kernels.prefill_tuning_lengths(100) == [64, 100]
    assert kernels.prefill_tuning_lengths(20) == [20]
    assert kernels.prefill_tuning_lengths(1) == []  # decode only: the prefill kernel never runs
