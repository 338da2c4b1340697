"""Cheap kernel launches: checks once per geometry, compiled kernels called through their handle.

An attention wrapper's argument checks depend only on the geometry of its
tensors (shape, strides, dtype, device), never on their values, so
`checked_geometry` runs them once per `geometry_key` and keeps what the
launch derives from the geometry (head counts, strides, tile dims) for the
next call with that key; only the leading-dim counts are checked on every
call. Triton's JIT, on
every `kernel[grid](...)`, binds the arguments, specialises them and hashes a
cache key before it launches; `launch` does that once per configuration and
then calls the `CompiledKernel` the JIT returned, through its own launcher
(`compiled[grid](*args)`), which only packs the arguments.

Invariants:
- A handle is reused only under a key that covers everything Triton
  specialises the compiled code on: the key holds each tensor's geometry and
  whether its data pointer is 16-byte aligned, plus the constexprs and launch
  options; integer arguments that vary with lengths (not with geometry) are
  `do_not_specialize` in the kernels, the others derive from the key.
- The interpreter has no compiled kernels: there every launch goes through
  `kernel[grid]` (the JIT returns no handle, so none is cached).
- Caches are per process and grow with the number of distinct geometries the
  caller uses, leading dims aside (a few per model).

Triton is imported by the kernel modules that use this (and by `dot_dtype`), not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable

import torch

from kernels._checks import check_attention_args, check_batch_sizes, check_index, dot_dtype, next_power_of_2


@dataclass(frozen=True, slots=True)
class AttentionGeometry:
    """What a paged attention launch derives from its tensors' geometry alone."""

    key: tuple  # the `geometry_key` it was checked under
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    block_d: int  # head_dim padded to a power of two, at least 16 (the `tl.dot` minimum on the GPU)
    # query (token, head), out (token, head), key cache and value cache (block, offset, head),
    # block table (request): the order both attention kernels take them in
    strides: tuple[int, ...]
    dot_dtype: Any  # tl.dtype of the `tl.dot` operands


# geometry key -> its checked geometry
GEOMETRIES: dict[tuple, AttentionGeometry] = {}
# configuration key -> CompiledKernel of its first launch
HANDLES: dict[Hashable, Any] = {}


def tensor_key(tensor: torch.Tensor) -> Hashable:
    """What a geometry check or Triton's specialisation can see of a tensor, without its values.

    The leading dim (tokens or requests) is left out: it changes every step, no
    kernel is specialised on it, and the wrappers check it on every call
    (`check_batch_sizes`), so the caches stay as small as the set of models.
    """
    return tensor.shape[1:], tensor.stride(), tensor.dtype, tensor.device, not tensor.data_ptr() & 15


def geometry_key(*tensors: torch.Tensor | None) -> tuple:
    # `tensor_key` inlined: this runs on every attention call, and a Python call per tensor shows.
    return tuple(None if t is None else (t.shape[1:], t.stride(), t.dtype, t.device, not t.data_ptr() & 15)
                 for t in tensors)


def checked_geometry(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    out: torch.Tensor,
    workspace: torch.Tensor | None = None,
) -> AttentionGeometry:
    """`check_attention_args` (and the workspace's) once per geometry; `check_batch_sizes` every call."""
    key = geometry_key(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, out, workspace)
    geometry = GEOMETRIES.get(key)
    if geometry is not None:
        check_batch_sizes(query, block_tables, seq_lens, query_start_loc, out)
        return geometry
    check_attention_args(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, out)
    if workspace is not None:
        check_index("workspace", workspace, torch.float32, 1, query.device)
    _, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    strides = (query.stride(0), query.stride(1), out.stride(0), out.stride(1), *key_cache.stride()[:3],
               *value_cache.stride()[:3], block_tables.stride(0))
    # The tile's head dim is the inner dim of QK^T: Triton rejects one below 16 when it compiles for a
    # GPU (the interpreter does not check), so small heads run in a padded, masked tile.
    block_d = max(16, next_power_of_2(head_dim))
    geometry = AttentionGeometry(key, num_heads, num_kv_heads, head_dim, block_size, block_d,
                                 strides, dot_dtype(query.dtype, query.device))
    GEOMETRIES[key] = geometry
    return geometry


def launch(kernel: Any, key: Hashable, grid: tuple[int, int, int], args: tuple, **options: Any) -> Any:
    """`kernel[grid](*args, **options)`, then, for the same `key`, the compiled kernel directly.

    `args` are all of the kernel's parameters in order, constexprs included
    (the launcher skips those); `options` are launch options (num_warps...)
    and must be fixed by `key`. Returns the compiled kernel, or None in the interpreter.
    """
    handle = HANDLES.get(key)
    if handle is not None:
        handle[grid](*args)
        return handle
    handle = kernel[grid](*args, **options)
    if handle is not None:
        HANDLES[key] = handle
    return handle
