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

The wrappers have the references' signatures. Each op checks its arguments
in C++ on every call (shapes, dtypes, strides, and the lengths, block ids,
slots and positions it indexes with): a wrong one raises a RuntimeError, also
under `python -O` and when an op is called through torch.ops directly. In a
batch with prompt chunks, requests of up to SHORT_QUERY_LEN query tokens
(decodes, speculative verify rows) run here and longer ones go to the
reference's SDPA path, which computes a whole chunk with matrix products.
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

logger = logging.getLogger(__name__)

CPU_KERNELS_ENV = "PAGEDINFER_CPU_KERNELS"
# Requests of up to this many query tokens (decodes, and speculative decoding's verify rows: the last
# token and up to 16 drafts) attend in the C++ kernel; longer ones (prompt chunks) through SDPA. With
# one thread, SmolLM2's heads, the kernel took 0.25-0.55x the time of gather + SDPA for 5-17 tokens
# over 150-1000 positions, and 0.8x still at 33 over 1000.
SHORT_QUERY_LEN = 17
SOURCE_DIR = Path(__file__).with_name("cpu")
# 512-bit vectors: gcc prefers 256 on recent Intel cores unless told.
CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp"]


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
    torch.ops.pagedinfer_cpu.paged_attention(
        query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, max_seq_len, scale,
        SHORT_QUERY_LEN, out,
    )
    if max_query_len > SHORT_QUERY_LEN:
        reference.attend_prompt_rows(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale, out,
                                     min_query_len=SHORT_QUERY_LEN + 1)
    return out


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    torch.ops.pagedinfer_cpu.store_kv(key, value, key_cache, value_cache, slot_mapping)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    if out is None:
        out = torch.empty_like(x)
    torch.ops.pagedinfer_cpu.rms_norm(x, weight, eps, out)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    out, residual_out = torch.empty_like(x), torch.empty_like(x)
    torch.ops.pagedinfer_cpu.fused_add_rms_norm(x, residual, weight, eps, out, residual_out)
    return out, residual_out


def apply_rotary_embedding(
    query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> None:
    torch.ops.pagedinfer_cpu.rotary_embedding(query, key, positions, cos_sin_cache)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    # The op checks x, this shape included: [tokens, 2 * intermediate].
    out = x.new_empty((*x.shape[:-1], x.shape[-1] // 2))
    torch.ops.pagedinfer_cpu.silu_and_mul(x, out)
    return out


if __name__ == "__main__":  # `make cpu-kernels`: build now, not on the first request
    import time

    logging.basicConfig(level=logging.INFO)
    start = time.perf_counter()
    ok = available()
    print(f"CPU kernels {build_name()}: {'ready' if ok else 'unavailable'} in {time.perf_counter() - start:.1f} s")
    sys.exit(0 if ok else 1)
