"""A model's memory plan, without loading it: weights, KV cache, and how many sequences fit.

Operators ask before they deploy whether a model fits and how many sequences
it holds. `plan()` answers from config.json alone: the engine's own model
classes are built on the meta device (shapes, no storage, no weight read),
sharded as tensor-parallel rank 0 shards them, in the serving dtype, so the
weight bytes are the ones the engine then holds, by construction; on the CPU
in float32 the C++ linear kernel's packed copies are added, as the runner
adds them. The KV cache is sized as the runner sizes it: one block of every
layer's keys and values per `block_size` tokens, the budget divided into
blocks, one of them the scratch block.

Invariants: with `kv_cache_memory` or `num_kv_blocks` (the CPU's way), the
plan's weight bytes, KV blocks and KV bytes equal the engine's `stats()`
after loading; with a GPU's memory and utilization the blocks are an
estimate, as the activation and graph reserve is (the engine measures it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from inference.parallel import group
from inference.parallel.layers import PackableLinear, shard_heads

GIB = 1024**3
TYPICAL_LENGTHS = (512, 2048, 8192, 32768)


def kv_block_bytes(hf_config, block_size: int, dtype: torch.dtype, tensor_parallel_size: int = 1) -> int:
    """Bytes of one KV block on one rank."""
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    num_heads = hf_config.num_attention_heads
    num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
    num_kv_heads = shard_heads(num_heads, num_kv_heads, 0, tensor_parallel_size).num_kv_heads
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * hf_config.num_hidden_layers * block_size * num_kv_heads * head_dim * element


def weight_bytes(hf_config, dtype: torch.dtype, device: str, tensor_parallel_size: int = 1) -> int:
    """Rank 0's weight bytes as the engine loads them, from the model built on the meta device."""
    from inference.models import model_class
    from kernels import cpu_linear

    with group.acting_as(0, tensor_parallel_size), torch.device("meta"):
        model = model_class(hf_config)(hf_config).to(dtype)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    # The C++ kernel's packed copies and, for bf16 on AMX CPUs, oneDNN's (kernels/cpu_linear.py).
    copies = cpu_linear.packs(dtype) + (dtype == torch.bfloat16 and cpu_linear.packs_onednn())
    if device == "cpu" and copies:
        packed = [m.weight for m in model.modules() if isinstance(m, PackableLinear)]
        packed.append(model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight)
        total += copies * sum(w.numel() * w.element_size() for w in packed)
    return total


def activation_reserve_bytes(hf_config, max_num_batched_tokens: int, max_num_seqs: int,
                             tensor_parallel_size: int = 1) -> int:
    """An estimate of a GPU's peak activations for the largest step (float32
    logits of every sequence, and the widest layer's intermediates of every
    token, twice for the decode graphs' pool); the engine measures the real one."""
    width = (hf_config.intermediate_size * 2 + hf_config.hidden_size * 4) // tensor_parallel_size
    return 2 * (max_num_seqs * hf_config.vocab_size * 4 + max_num_batched_tokens * width * 4)


@dataclass(slots=True)
class MemoryPlan:
    dtype: str
    tensor_parallel_size: int
    block_size: int
    weight_bytes: int  # per rank
    block_bytes: int  # one KV block, per rank
    reserve_bytes: int  # activations and graphs (GPU); 0 on the CPU
    kv_budget_bytes: int  # per rank, scratch block included
    num_blocks: int  # usable; the scratch block comes on top
    max_model_len: int

    @property
    def kv_bytes_per_token(self) -> int:
        return self.block_bytes // self.block_size

    @property
    def kv_cache_bytes(self) -> int:
        return (self.num_blocks + 1) * self.block_bytes

    def num_sequences(self, length: int) -> int:
        """Sequences of `length` tokens the KV cache holds at once."""
        return self.num_blocks // math.ceil(length / self.block_size)

    def describe(self) -> list[str]:
        lines = [
            f"dtype {self.dtype}, tensor parallel {self.tensor_parallel_size}, block size {self.block_size}",
            f"weights: {self.weight_bytes / GIB:.3f} GiB per rank ({self.weight_bytes} bytes)",
            f"KV cache: {self.kv_bytes_per_token} bytes per token per rank, {self.block_bytes} per block",
        ]
        if self.reserve_bytes:
            lines.append(f"activation and graph reserve (estimate): {self.reserve_bytes / GIB:.3f} GiB per rank")
        lines.append(f"KV blocks: {self.num_blocks} ({self.kv_cache_bytes / GIB:.3f} GiB per rank with the scratch "
                     f"block), {self.num_blocks * self.block_size} tokens")
        lengths = sorted({self.max_model_len, *(n for n in TYPICAL_LENGTHS if n < self.max_model_len)})
        lines.append("sequences at once: " + ", ".join(
            f"{self.num_sequences(n)} of {n} tokens" + (" (max_model_len)" if n == self.max_model_len else "")
            for n in lengths))
        return lines


def plan(hf_config, *, dtype: str, device: str, block_size: int, max_model_len: int, max_num_seqs: int,
         max_num_batched_tokens: int, tensor_parallel_size: int = 1, num_kv_blocks: int | None = None,
         kv_cache_memory: int | None = None, device_memory: int | None = None,
         gpu_memory_utilization: float = 0.9) -> MemoryPlan:
    """The plan; ValueError naming the shortfall when the model or one block does not fit."""
    torch_dtype = getattr(torch, dtype)
    weights = weight_bytes(hf_config, torch_dtype, device, tensor_parallel_size)
    per_block = kv_block_bytes(hf_config, block_size, torch_dtype, tensor_parallel_size)
    reserve = 0
    if num_kv_blocks is not None:
        budget, num_blocks = (num_kv_blocks + 1) * per_block, num_kv_blocks
    else:
        if kv_cache_memory is not None:
            budget = kv_cache_memory
        else:
            assert device_memory is not None, "give num_kv_blocks, kv_cache_memory or device_memory"
            reserve = activation_reserve_bytes(hf_config, max_num_batched_tokens, max_num_seqs, tensor_parallel_size)
            budget = int(device_memory * gpu_memory_utilization) - weights - reserve
            if budget <= 0:
                raise ValueError(
                    f"the model does not fit: {gpu_memory_utilization:.0%} of {device_memory / GIB:.2f} GiB is "
                    f"{device_memory * gpu_memory_utilization / GIB:.2f} GiB per rank, the weights take "
                    f"{weights / GIB:.2f} GiB and the activations about {reserve / GIB:.2f} GiB: "
                    f"{-budget / GIB:.2f} GiB short before any KV cache")
        num_blocks = budget // per_block - 1
        if num_blocks < 1:
            raise ValueError(f"the KV cache budget of {budget} bytes per rank holds no {per_block}-byte block "
                             "besides the scratch one")
    return MemoryPlan(dtype, tensor_parallel_size, block_size, weights, per_block, reserve, budget, num_blocks,
                      max_model_len)
