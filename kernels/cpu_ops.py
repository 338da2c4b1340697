"""The engine's CPU kernels (`kernels/cpu/*.cpp`): build, load and call.

The C++ sources are compiled once per (sources, torch version, CPU flags) with
`torch.utils.cpp_extension` into torch's extension cache
(`$TORCH_EXTENSIONS_DIR`, by default `~/.cache/torch_extensions`), under a
name that carries a hash of all three: a new source, torch or CPU builds anew,
and a later process only loads the shared library (~0.1 s). The build takes
15-30 s on 2 cores; `make serve` and `make test` do it first (`make
cpu-kernels`), and the model runner loads it before the server reports ready.

`available()` is False where nothing can be built (no C++ compiler, no
OpenMP) or when `PAGEDINFER_CPU_KERNELS=0`; `kernels` then runs the torch
references, which stay the oracle these ops are tested against.

The wrappers have the references' signatures. Attention checks its arguments
once per tensor geometry (as the Triton wrappers do) and the batch sizes on
every call; in a batch with prompt chunks, rows of one query token (decode)
run here and longer rows go to the reference's SDPA path, which computes a
whole chunk with matrix products.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
from pathlib import Path

import torch

from kernels import reference
from kernels._checks import check_attention_args, check_batch_sizes, check_float, check_last_dim_contiguous
from kernels._launch import geometry_key

logger = logging.getLogger(__name__)

CPU_KERNELS_ENV = "PAGEDINFER_CPU_KERNELS"
SOURCE_DIR = Path(__file__).with_name("cpu")
# 512-bit vectors: gcc prefers 256 on recent Intel cores unless told.
CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp"]
# Attention geometries already checked (see kernels/_launch.py for the key).
_CHECKED: set[tuple] = set()


def cpu_info(*fields: str) -> str:
    """The value of the first of `fields` in /proc/cpuinfo ("" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() in fields:
                return value.strip()
    except OSError:
        pass
    return ""


def build_name() -> str:
    """The extension's name: -march=native code must not load on another CPU."""
    digest = hashlib.sha256()
    for path in sorted(SOURCE_DIR.glob("*.[ch]*")):  # sources and headers
        digest.update(path.name.encode() + path.read_bytes())
    for part in (torch.__version__.encode(), cpu_info("flags", "Features").encode(), " ".join(CFLAGS).encode()):
        digest.update(part)
    return f"pagedinfer_cpu_{digest.hexdigest()[:16]}"


@functools.cache
def available() -> bool:
    """Build (first time) or load the ops; False, with the reason logged, where that fails."""
    if os.environ.get(CPU_KERNELS_ENV, "1") == "0" or sys.platform != "linux":
        return False
    from torch.utils import cpp_extension

    try:
        cpp_extension.load(
            name=build_name(), sources=[str(p) for p in sorted(SOURCE_DIR.glob("*.cpp"))], extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False,
        )
    except Exception as exc:  # no compiler, headers or OpenMP: the references still work
        logger.warning("CPU kernels unavailable, using the torch reference ops: %s", str(exc).splitlines()[0])
        return False
    return True


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
    workspace: torch.Tensor | None = None,  # the Triton decode kernel's scratch; not needed here
) -> torch.Tensor:
    if out is None:
        out = torch.empty_like(query)
    key = geometry_key(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, out)
    if key in _CHECKED:
        check_batch_sizes(query, block_tables, seq_lens, query_start_loc, out)
    else:
        check_attention_args(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, out)
        # The C++ kernel reads the index tensors densely and one dtype throughout.
        assert seq_lens.is_contiguous() and query_start_loc.is_contiguous(), "index tensors must be contiguous"
        assert query.dtype == key_cache.dtype == value_cache.dtype == out.dtype, "query, caches and out dtypes differ"
        _CHECKED.add(key)
    torch.ops.pagedinfer_cpu.paged_attention(
        query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, max_seq_len, scale, 1, out
    )
    if max_query_len > 1:
        reference.attend_prompt_rows(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale, out)
    return out


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    assert key.dtype == value.dtype == key_cache.dtype == value_cache.dtype, "key, value and caches dtypes differ"
    assert slot_mapping.dtype == torch.int64 and slot_mapping.is_contiguous(), "slot_mapping must be contiguous int64"
    assert key.shape[1:] == value.shape[1:] == key_cache.shape[2:], "key/value rows must match the cache's heads"
    assert key.shape[0] == value.shape[0] == slot_mapping.shape[0], "one slot per token"
    for name, t in (("key", key), ("value", value), ("key_cache", key_cache), ("value_cache", value_cache)):
        check_last_dim_contiguous(name, t)
    torch.ops.pagedinfer_cpu.store_kv(key, value, key_cache, value_cache, slot_mapping)


def _check_norm(x: torch.Tensor, weight: torch.Tensor) -> None:
    check_float("x", x)
    assert x.dim() in (2, 3), f"x must be [rows, hidden] or [tokens, heads, head_dim], got {tuple(x.shape)}"
    assert weight.shape == x.shape[-1:] and weight.dtype == x.dtype, "weight must be [hidden] in x's dtype"
    check_last_dim_contiguous("x", x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    _check_norm(x, weight)
    if out is None:
        out = torch.empty_like(x)
    assert out.shape == x.shape and out.dtype == x.dtype, "out must match x"
    check_last_dim_contiguous("out", out)
    torch.ops.pagedinfer_cpu.rms_norm(x, weight, eps, out)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_norm(x, weight)
    assert residual.shape == x.shape and residual.dtype == x.dtype, "residual must match x"
    check_last_dim_contiguous("residual", residual)
    out, residual_out = torch.empty_like(x), torch.empty_like(x)
    torch.ops.pagedinfer_cpu.fused_add_rms_norm(x, residual, weight, eps, out, residual_out)
    return out, residual_out


def apply_rotary_embedding(
    query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> None:
    check_float("query", query)
    assert query.dim() == 3 and key.dim() == 3 and key.dtype == query.dtype, "query/key: [tokens, heads, head_dim]"
    assert query.shape[0] == key.shape[0] == positions.shape[0], "one position per token"
    assert query.shape[2] == key.shape[2] == cos_sin_cache.shape[1] and query.shape[2] % 2 == 0, "head_dim mismatch"
    assert positions.dtype == torch.int64 and positions.is_contiguous(), "positions must be contiguous int64"
    assert cos_sin_cache.dtype == torch.float32, "cos_sin_cache must be float32"
    for name, t in (("query", query), ("key", key), ("cos_sin_cache", cos_sin_cache)):
        check_last_dim_contiguous(name, t)
    torch.ops.pagedinfer_cpu.rotary_embedding(query, key, positions, cos_sin_cache)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    check_float("x", x)
    assert x.dim() == 2 and x.shape[1] % 2 == 0, f"x must be [tokens, 2 * intermediate], got {tuple(x.shape)}"
    check_last_dim_contiguous("x", x)
    out = torch.empty(x.shape[0], x.shape[1] // 2, dtype=x.dtype)
    torch.ops.pagedinfer_cpu.silu_and_mul(x, out)
    return out


if __name__ == "__main__":  # `make cpu-kernels`: build now, not on the first request
    import time

    logging.basicConfig(level=logging.INFO)
    start = time.perf_counter()
    ok = available()
    print(f"CPU kernels {build_name()}: {'ready' if ok else 'unavailable'} in {time.perf_counter() - start:.1f} s")
    sys.exit(0 if ok else 1)
