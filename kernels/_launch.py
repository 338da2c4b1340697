"""Cheap kernel launches: checks once per geometry, compiled kernels called through their handle.

An attention wrapper's argument checks depend only on the geometry of its
tensors (shape, strides, dtype, device), never on their values, so a wrapper
runs them once per `geometry_key` and remembers the key. Triton's JIT, on
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

Plain Python; Triton is imported lazily by the kernel modules that use this.
"""

from __future__ import annotations

from typing import Any, Hashable

import torch

# geometry keys whose checks passed, per wrapper
CHECKED: set[Hashable] = set()
# configuration key -> CompiledKernel of its first launch
HANDLES: dict[Hashable, Any] = {}


def tensor_key(tensor: torch.Tensor | None) -> Hashable:
    """What a geometry check or Triton's specialisation can see of a tensor, without its values.

    The leading dim (tokens or requests) is left out: it changes every step, no
    kernel is specialised on it, and the wrappers check it on every call
    (`check_batch_sizes`), so the caches stay as small as the set of models.
    """
    if tensor is None:
        return None
    return tensor.shape[1:], tensor.stride(), tensor.dtype, tensor.device, tensor.data_ptr() % 16 == 0


def geometry_key(*tensors: torch.Tensor | None) -> tuple:
    return tuple(tensor_key(t) for t in tensors)


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
