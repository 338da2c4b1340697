"""Attention kernels over the paged KV cache, and the fused per-layer kernels around them.

Layout (fixed; the engine, the Triton kernels and the references all share it):
- Each layer has `key_cache` and `value_cache` of shape
  `[num_blocks, block_size, num_kv_heads, head_dim]`.
- `slot = block_id * block_size + offset`. `slot_mapping` is int64
  `[num_tokens]`, with -1 for padding tokens, which are never stored.
- `block_tables` is int32 `[num_reqs, max_blocks_per_req]`, padded with -1.
  Positions at or past `seq_lens[r]` are never read.
- `query_start_loc` is int32 `[num_reqs + 1]`, the cumulative query lengths:
  request r's new tokens are rows `query_start_loc[r]:query_start_loc[r+1]`.
- `seq_lens` is int32 `[num_reqs]`: context length including the new tokens.
- `query`/`out` are `[num_tokens, num_heads, head_dim]`; `key`/`value` are
  `[num_tokens, num_kv_heads, head_dim]`; `num_heads % num_kv_heads == 0` (GQA).
- `max_query_len` and `max_seq_len` are host ints, so no kernel launch has to
  read a device tensor back to size its grid.

Signatures:
    store_kv(key, value, key_cache, value_cache, slot_mapping) -> None
    paged_attention(query, key_cache, value_cache, block_tables, seq_lens,
                    query_start_loc, max_query_len, max_seq_len, scale,
                    out=None, workspace=None) -> out
    decode_workspace_numel(max_num_reqs, num_heads, head_dim, max_seq_len,
                           device) -> int

One `paged_attention` call covers prefill, chunked prefill (a chunk may start
mid-block) and decode, in any mix.

`workspace` is an optional flat float32 tensor on the query's device,
allocated once by the caller with `decode_workspace_numel(...)` elements
(bounds: the most requests and the largest `max_seq_len` it will pass; 0
where the torch reference runs, which ignores it). The decode kernel carves
its split-softmax partials from it instead of allocating them, so a decode
call with `out` and `workspace` allocates nothing and, given a constant
`max_seq_len`, launches the same grid every step: what a CUDA graph needs.
The prefill kernel needs no scratch and ignores it.

Layer kernels (each replaces a chain of small torch ops in a decoder layer):
    rms_norm(x, weight, eps, out=None) -> out
    fused_add_rms_norm(x, residual, weight, eps) -> (out, residual_out)
    apply_rotary_embedding(query, key, positions, cos_sin_cache) -> None
    silu_and_mul(x) -> out

- The norms take `[num_rows, hidden]` or `[num_tokens, num_heads, head_dim]`
  (per-head q/k norm on slices of the qkv output); `residual_out = x +
  residual` and `out` is its RMSNorm. `rms_norm(..., out=x)` works in place;
  `fused_add_rms_norm` returns new tensors.
- `apply_rotary_embedding` rotates q `[num_tokens, num_heads, head_dim]` and
  k `[num_tokens, num_kv_heads, head_dim]` in place (rotate-half, as HF
  Llama), one launch for both. `positions` is int64 `[num_tokens]`, each below
  the row count of `cos_sin_cache`, float32 `[max_positions, head_dim]`: row p
  is `[cos(p * inv_freq), sin(p * inv_freq)] * attention_scaling`.
- `silu_and_mul` takes `[num_tokens, 2 * intermediate]` (gate, then up).
- Only last dims must be contiguous. The references do transformers' float
  ops in its order (bit-exact in float32); the kernels round at the same
  points but compute in float32 in between.

Mixture of experts (`moe.py` states its layout and invariants):
    fused_moe(hidden_states, w13, w2, topk_weights, topk_ids) -> out

- `w13` `[num_experts, 2 * intermediate, hidden]` (gate, then up), `w2`
  `[num_experts, hidden, intermediate]`; `topk_weights`/`topk_ids` (int64)
  `[num_tokens, top_k]` come from the router. The reference is transformers'
  loop over experts.

Multi-LoRA (`lora.py` states its layout and invariants):
    lora_shrink(x, lora_a, token_slots, out=None) -> out (float32)
    lora_expand(y, lora_b, token_slots, out) -> None (adds into out)

- Stacked adapters `lora_a` `[num_loras, width, in]`, `lora_b` `[num_loras,
  width, out]` (B transposed); `token_slots` int32 `[num_tokens]`, slot 0 =
  no adapter, slot s >= 1 = row s - 1. The references gather each token's A
  and B and bmm; the engine's own CPU path is masked matmuls over all slots
  (`inference/lora/layers.py`).

Dispatch: CUDA tensors run the Triton kernels (`kv_store.py`,
`decode_attention.py` when `max_query_len == 1`, `prefill_attention.py`
otherwise, which also takes decode rows in a mixed batch; `rmsnorm.py`,
`rotary.py`, `activation.py` for the layer kernels; `moe.py`; `lora.py`). CPU tensors run
the C++ CPU kernels (`cpu_ops.py`, `cpu/*.cpp`: store, attention, norms,
rotary, SiLU-mul; `cpu_linear.py` runs the float32 linear layers on them,
and bf16 ones where the CPU has AVX512-BF16) where they build, and the torch
references in `reference.py` otherwise, for `fused_moe`, or with
`PAGEDINFER_CPU_KERNELS=0` (the choice is made once per process); with
`PAGEDINFER_TRITON_INTERPRET=1` they run the same Triton kernels as CUDA in
Triton's interpreter. The interpreter
must be chosen before Triton is first imported in the process (Triton decides
at `@triton.jit` time, for its own library functions too), so with that
variable set this package sets `TRITON_INTERPRET=1` when it imports Triton
itself; if something imported Triton earlier without it, the CPU call raises
and says so. Triton is imported lazily, on the first Triton call, so `import
kernels` works where Triton is not installed (the references need only torch).
The store kernel lives in `kv_store.py`, not `store_kv.py`: importing a
submodule binds it on the package, which would replace the `store_kv` function
(so the norm kernels live in `rmsnorm.py`, not `rms_norm.py`, and
`fused_moe` in `moe.py`).
`python -m kernels.compile_check` compiles every launch configuration for a
CUDA target without a GPU (the interpreter does not exercise Triton's compiler).

Launch cost (the attention wrappers): a wrapper checks its arguments once
per tensor geometry (shape past the leading dim, strides, dtype, device,
pointer alignment) and only the leading-dim counts on every call; the first
launch of a configuration goes through Triton's JIT and later ones call the
`CompiledKernel` it returned (`kernels/_launch.py`). Prefill tile configs are
autotuned on CUDA once per (head_dim, padded GQA group, dtypes, length bucket
of `max_query_len`), in memory and in Triton's disk cache; the interpreter
runs one fixed config, and the tests and the compile check run all of them.
The decode split plan (`decode_attention.split_plan`) stays a function of
(num_reqs, num_kv_heads, head_dim, max_seq_len, device): one split writes
`out` in a single pass (short contexts, full batches), more add the combine
pass, and a constant `max_seq_len` keeps the grid fixed for graph replay.

Kernel invariants (the three attention kernels; the layer kernels state
theirs in their modules):
- Every `tl.load` is masked or in bounds by grid construction; -1 block ids and
  slots are clamped to 0 before they become addresses, then masked off.
- Loads are upcast to float32 at once and accumulation is float32; results
  are cast to the output dtype at the store. The one exception is a `tl.dot`
  operand on CUDA, loaded in its 16-bit dtype for the tensor cores (the
  interpreter, which gets 16-bit arithmetic wrong, upcasts those too).
  `tl.dot` tiles are >= 16 on every dim (the GQA group is padded to 16 in
  decode, head_dim to 16 in both).
- Any head_dim works, on a GPU too: it is padded to a power of two of at
  least 16 (the GPU's `tl.dot` minimum) and masked. head_dim and block_size
  are constexprs (one compile per model), the lengths are not.
- float32 inputs keep float32 accuracy on a GPU too: their `tl.dot`s use
  3xTF32 (`tf32x3`), not the TF32 default (`_dot.py`); 16-bit inputs use
  the tensor cores directly.
- `max_query_len`/`max_seq_len` bound `query_start_loc` diffs and `seq_lens`:
  grids are sized from them, so a larger actual value would be cut off.
- Only the last dim of query/out/key/value/caches must be contiguous; the
  other strides are passed to the kernels. Index tensors are contiguous.
- Output rows that belong to no request (past `query_start_loc[-1]`) are never
  written.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from types import ModuleType

import torch

from kernels import reference
from kernels._checks import prefill_tuning_lengths

__all__ = [
    "apply_rotary_embedding", "decode_workspace_numel", "fused_add_rms_norm", "paged_attention", "rms_norm",
    "fused_moe", "lora_expand", "lora_shrink", "prefill_autotunes", "prefill_tuning_lengths", "silu_and_mul",
    "store_kv",
]

INTERPRET_ENV = "PAGEDINFER_TRITON_INTERPRET"


@functools.cache
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _use_triton(device: torch.device) -> bool:
    if device.type == "cuda":
        return _triton_available()
    return os.environ.get(INTERPRET_ENV) == "1"


def prefill_autotunes(device: torch.device) -> bool:
    """Whether prefill attention on `device` autotunes its tiles on first use of a length bucket
    (compiled Triton; the interpreter and the CPU kernels have one config)."""
    return device.type == "cuda" and _use_triton(device)


def cpu_kernels() -> str:
    """Which CPU ops this process runs (building the C++ ones on first use): "C++" or "torch reference"."""
    return "C++" if _cpu() is not reference else "torch reference"


@functools.cache
def _cpu() -> ModuleType:
    """The C++ CPU kernels where they build, else the torch references (same signatures)."""
    from kernels import cpu_ops

    return cpu_ops if cpu_ops.available() else reference


def interpreter_active() -> bool:
    """True when Triton is (or will be) imported in interpreter mode in this process."""
    if "triton" not in sys.modules:
        return os.environ.get("TRITON_INTERPRET") == "1"
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    # `tl.sum` & co. are @triton.jit functions, interpreted only if the mode was on at import.
    return isinstance(standard.sum, InterpretedFunction)


def _import_kernel(name: str, device: torch.device) -> ModuleType:
    if device.type != "cuda":
        if "triton" not in sys.modules:
            os.environ["TRITON_INTERPRET"] = "1"
        elif not interpreter_active():
            raise RuntimeError(
                f"{INTERPRET_ENV}=1 runs CPU tensors in Triton's interpreter, but Triton was imported "
                "without TRITON_INTERPRET=1. Set TRITON_INTERPRET=1 before anything imports triton."
            )
    return importlib.import_module(f"kernels.{name}")


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    if not _use_triton(key_cache.device):
        return _cpu().store_kv(key, value, key_cache, value_cache, slot_mapping)
    _import_kernel("kv_store", key_cache.device).store_kv(key, value, key_cache, value_cache, slot_mapping)


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    if not _use_triton(query.device):
        return _cpu().paged_attention(
            query, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
            max_query_len, max_seq_len, scale, out, workspace,
        )
    if max_query_len == 1:
        decode = _import_kernel("decode_attention", query.device)
        return decode.decode_attention(
            query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, max_seq_len, scale, out,
            workspace=workspace,
        )
    prefill = _import_kernel("prefill_attention", query.device)
    return prefill.prefill_attention(
        query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, max_query_len, scale, out
    )


def decode_workspace_numel(
    max_num_reqs: int, num_heads: int, head_dim: int, max_seq_len: int, device: torch.device | str
) -> int:
    """float32 elements of a `paged_attention` workspace for every decode call with at most
    `max_num_reqs` requests and `max_seq_len` context on `device`, whatever its KV head count."""
    device = torch.device(device)
    if not _use_triton(device):
        return 0
    return _import_kernel("decode_attention", device).workspace_numel(
        max_num_reqs, num_heads, head_dim, max_seq_len, device
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    if not _use_triton(x.device):
        return _cpu().rms_norm(x, weight, eps, out)
    return _import_kernel("rmsnorm", x.device).rms_norm(x, weight, eps, out)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if not _use_triton(x.device):
        return _cpu().fused_add_rms_norm(x, residual, weight, eps)
    return _import_kernel("rmsnorm", x.device).fused_add_rms_norm(x, residual, weight, eps)


def apply_rotary_embedding(
    query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> None:
    if not _use_triton(query.device):
        return _cpu().apply_rotary_embedding(query, key, positions, cos_sin_cache)
    _import_kernel("rotary", query.device).apply_rotary_embedding(query, key, positions, cos_sin_cache)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if not _use_triton(x.device):
        return _cpu().silu_and_mul(x)
    return _import_kernel("activation", x.device).silu_and_mul(x)


def fused_moe(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    if not _use_triton(hidden_states.device):
        return reference.fused_moe(hidden_states, w13, w2, topk_weights, topk_ids)
    return _import_kernel("moe", hidden_states.device).fused_moe(hidden_states, w13, w2, topk_weights, topk_ids)


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
    if not _use_triton(x.device):
        return reference.lora_shrink(x, lora_a, token_slots, out)
    return _import_kernel("lora", x.device).lora_shrink(x, lora_a, token_slots, out)


def lora_expand(y: torch.Tensor, lora_b: torch.Tensor, token_slots: torch.Tensor, out: torch.Tensor) -> None:
    if not _use_triton(y.device):
        return reference.lora_expand(y, lora_b, token_slots, out)
    _import_kernel("lora", y.device).lora_expand(y, lora_b, token_slots, out)
