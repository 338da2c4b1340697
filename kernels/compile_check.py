"""Compile the kernels for a CUDA target on a machine without a GPU.

    python -m kernels.compile_check                # sm_90 (H100/H200)
    python -m kernels.compile_check --arch 80 90
    # every edge geometry and float32 too, two compiles at a time, with the GPU image's Triton
    PYTHONPATH=.venv/triton-gpu-image:. python -m kernels.compile_check --arch 80 90 --edges --jobs 2

The interpreter runs the kernels' arithmetic but not Triton's compiler, so it
misses front-end errors (types, constexprs, early returns), layouts that do
not lower, and register spills. This script calls the real wrappers on small
CPU tensors with their CUDA choices forced (16-bit `tl.dot` operands, CUDA
tile sizes, split-K heuristic on a 132-SM device), captures each launch
instead of running it, and compiles it with `triton.compile` for the target,
through ptxas, with the specialisation (16-byte divisibility of pointers and
ints) the CUDA launcher would apply. It prints registers and stack (spill)
bytes per kernel when cuobjdump is at hand, and exits non-zero on a failure:
a compile error, more shared memory than the target has, or a float32
`tl.dot` left in plain TF32 (its TTIR says `inputPrecision = tf32`, not
`tf32x3`).

Invariant: run in a process where TRITON_INTERPRET is unset (interpreted
kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import triton
from triton.backends.compiler import GPUTarget

import kernels._launch as launch_mod
import kernels.activation as activation_mod
import kernels.decode_attention as decode_mod
import kernels.kv_store as store_mod
import kernels.lora as lora_mod
import kernels.moe as moe_mod
import kernels.prefill_attention as prefill_mod
import kernels.rmsnorm as rmsnorm_mod
import kernels.rotary as rotary_mod
from kernels._checks import next_power_of_2

_PTR_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int32: "*i32",
              torch.int64: "*i64"}
_CUDA = torch.device("cuda")
# Opt-in shared memory per block (CUDA programming guide, compute capabilities table).
_MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


@contextmanager
def _captured_launches(launches: list[tuple[Any, tuple, dict]]) -> Iterator[None]:
    """Make the wrappers believe they launch on CUDA, and record the launches."""
    saved = {
        (launch_mod, "dot_dtype"): launch_mod.dot_dtype,
        (decode_mod, "_num_programs_wanted"): decode_mod._num_programs_wanted,
        (moe_mod, "dot_dtype"): moe_mod.dot_dtype,
        (moe_mod, "_tile_config"): moe_mod._tile_config,
    }
    kernels = (store_mod._store_kv_kernel, decode_mod._decode_attention_kernel,
               decode_mod._combine_splits_kernel, prefill_mod._prefill_attention_kernel,
               rmsnorm_mod._rms_norm_kernel, rotary_mod._rotary_embedding_kernel,
               activation_mod._silu_and_mul_kernel, moe_mod._moe_gate_up_kernel, moe_mod._moe_down_kernel,
               lora_mod._lora_shrink_kernel, lora_mod._lora_expand_kernel)
    launch_mod.dot_dtype = lambda dtype, device: saved[(launch_mod, "dot_dtype")](dtype, _CUDA)
    launch_mod.GEOMETRIES.clear()  # their dot dtypes were the CPU's
    moe_mod.dot_dtype = lambda dtype, device: saved[(moe_mod, "dot_dtype")](dtype, _CUDA)
    moe_mod._tile_config = lambda num_pairs, num_experts, device: saved[(moe_mod, "_tile_config")](
        num_pairs, num_experts, _CUDA)
    decode_mod._num_programs_wanted = lambda device: 4 * 132
    for kernel in kernels:
        kernel.run = lambda *args, _kernel=kernel, grid, warmup, **kwargs: launches.append((_kernel, args, kwargs))
    try:
        yield
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)
        for kernel in kernels:
            del kernel.run
        launch_mod.GEOMETRIES.clear()


# (dtype, head_dim, GQA group, block_size) of the models the engine serves: Llama-3-8B-like, a
# 64-wide fp16 head, a GQA-8 model.
_MODEL_GEOMETRIES = (
    (torch.bfloat16, 128, 4, 16),
    (torch.float16, 64, 1, 32),
    (torch.bfloat16, 128, 8, 16),
)
_EDGE_HEAD_DIMS = (8, 64, 80, 96, 128, 256)
_EDGE_BLOCK_SIZES = (8, 16, 32, 64)
_EDGE_GROUPS = (1, 4, 8, 32)


def edge_geometries() -> list[tuple[torch.dtype, int, int, int]]:
    """Every edge value of each axis (head_dim, block size, GQA group), one axis at a time from a
    Llama-like base: constexprs and tile shapes change along one axis at a time, so this covers every
    tile the kernels derive without the full product's thousands of compiles. bf16 and float32 (its
    own tile limits and 3xTF32 dots) sweep every axis; fp16, whose code differs from bf16's only in
    the element type, sweeps head_dim, the axis that changes tiles most."""
    geometries = []
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        axes = [(dtype, d, 4, 16) for d in _EDGE_HEAD_DIMS]
        if dtype != torch.float16:
            axes += [(dtype, 128, 4, b) for b in _EDGE_BLOCK_SIZES] + [(dtype, 128, g, 16) for g in _EDGE_GROUPS]
        geometries += [g for i, g in enumerate(axes) if g not in axes[:i]]
    return geometries


def _launch_all_configs(launches: list[tuple[Any, tuple, dict]], edges: bool) -> None:
    """One call per distinct configuration the engine is expected to hit; with `edges`, also every
    edge geometry and float32 (`edge_geometries`)."""
    geometries = list(_MODEL_GEOMETRIES) + (edge_geometries() if edges else [])
    with _captured_launches(launches):
        for dtype, head_dim, group, block_size in geometries:
            kv_heads = 2
            cache = torch.zeros(4, block_size, kv_heads, head_dim, dtype=dtype)
            key = torch.zeros(8, kv_heads, head_dim, dtype=dtype)
            store_mod.store_kv(key, key, cache, cache, torch.zeros(8, dtype=torch.int64))
            # Split-K, direct decode, and a CUDA-graph bucket: max_seq_len = max_model_len (the 64-split
            # maximum) with the partials in a preallocated workspace.
            for num_reqs, max_seq_len, graph in ((1, 8192, False), (64, 200, False), (1, 40960, True)):
                query = torch.zeros(num_reqs, kv_heads * group, head_dim, dtype=dtype)
                tables = torch.zeros(num_reqs, triton.cdiv(max_seq_len, block_size), dtype=torch.int32)
                seq_lens = torch.full((num_reqs,), max_seq_len, dtype=torch.int32)
                start_loc = torch.arange(num_reqs + 1, dtype=torch.int32)
                numel = decode_mod.workspace_numel(num_reqs, kv_heads * group, head_dim, max_seq_len, _CUDA)
                workspace = torch.zeros(numel) if graph else None
                decode_mod.decode_attention(query, cache, cache, tables, seq_lens, start_loc, max_seq_len, 0.1,
                                            workspace=workspace)
            _launch_prefill_configs(cache, kv_heads * group, head_dim, dtype)
        _launch_prefill_configs(torch.zeros(4, 16, 2, 256, dtype=torch.bfloat16), 8, 256, torch.bfloat16)
        _launch_layer_kernels()
        _launch_lora_kernels((torch.bfloat16, torch.float16, torch.float32) if edges else (torch.bfloat16,))
        _launch_moe_kernels((torch.bfloat16, torch.float16, torch.float32) if edges else (torch.bfloat16,
                                                                                           torch.float16))


def _launch_prefill_configs(cache: torch.Tensor, num_heads: int, head_dim: int, dtype: torch.dtype) -> None:
    """Every tile config the autotuner may pick for this shape: it compiles them all on a real GPU."""
    query = torch.zeros(512, num_heads, head_dim, dtype=dtype)
    tables = torch.zeros(1, 64, dtype=torch.int32)
    block_g = next_power_of_2(num_heads // cache.shape[2])
    for config in prefill_mod.PREFILL_CONFIGS:
        if config.fits(block_g, head_dim, dtype.itemsize):
            prefill_mod.prefill_attention(
                query, cache, cache, tables, torch.tensor([1024], dtype=torch.int32),
                torch.tensor([0, 512], dtype=torch.int32), 512, 0.1, config=config,
            )


def _launch_moe_kernels(dtypes: tuple[torch.dtype, ...]) -> None:
    """Qwen3-30B-A3B's experts (128 of 2048 -> 768, top-8) at decode (batch 1 and 64: 16-row tiles) and
    prefill (4096 tokens: 64-row tiles): every MoE tile. Tile shapes depend on the dtype and the regime,
    not on the sizes, so one expert's weights are expanded over all 128 instead of allocated."""
    hidden, intermediate, num_experts, top_k = 2048, 768, 128, 8
    for dtype in dtypes:
        w13 = torch.zeros(1, 2 * intermediate, hidden, dtype=dtype).expand(num_experts, -1, -1)
        w2 = torch.zeros(1, hidden, intermediate, dtype=dtype).expand(num_experts, -1, -1)
        for num_tokens in (1, 64, 4096):
            ids = torch.arange(num_tokens * top_k).view(num_tokens, top_k) % num_experts
            moe_mod.fused_moe(torch.zeros(num_tokens, hidden, dtype=dtype), w13, w2,
                              torch.zeros(num_tokens, top_k), ids)


def _launch_lora_kernels(dtypes: tuple[torch.dtype, ...]) -> None:
    """LoRA shrink and expand as the engine calls them, one pair a fused part, each part's shrink into
    its columns of one float32 buffer: Llama-3-8B's qkv (4096 -> 4096 + 1024 + 1024) at ranks 64 and
    256 (the expand's widest tile), and its down (14336 -> 4096) at rank 8; 3 adapter slots."""
    for dtype in dtypes:
        for in_features, part_rows, rank in ((4096, (4096, 1024, 1024), 64), (14336, (4096,), 8),
                                             (4096, (4096, 1024, 1024), 256)):
            x = torch.zeros(4, in_features, dtype=dtype)
            slots = torch.zeros(4, dtype=torch.int32)
            y = torch.zeros(4, len(part_rows) * rank)
            out = torch.zeros(4, sum(part_rows), dtype=dtype)
            first = 0
            for p, num_rows in enumerate(part_rows):
                y_part = lora_mod.lora_shrink(x, torch.zeros(3, rank, in_features, dtype=dtype), slots,
                                              y[:, p * rank : (p + 1) * rank])
                lora_b = torch.zeros(num_rows, 3, rank, dtype=dtype).permute(1, 2, 0)
                lora_mod.lora_expand(y_part, lora_b, slots, out[:, first : first + num_rows])
                first += num_rows


def _launch_layer_kernels() -> None:
    """Norms, rotary and SiLU-mul at real model sizes: the norm tile (and its warp count) grows with hidden."""
    num_tokens = 4
    for hidden, num_heads, num_kv_heads, head_dim, intermediate in (
        (4096, 32, 8, 128, 14336),  # Llama-3-8B
        (8192, 64, 8, 128, 28672),  # Llama-3-70B: the widest norm row
        (2048, 16, 8, 128, 6144),  # Qwen3-1.7B, with per-head q/k norm
        (576, 9, 3, 64, 1536),  # SmolLM2-135M: head counts off a power of two
    ):
        x = torch.zeros(num_tokens, hidden, dtype=torch.bfloat16)
        weight = torch.zeros(hidden, dtype=torch.bfloat16)
        rmsnorm_mod.rms_norm(x, weight, 1e-6)
        rmsnorm_mod.fused_add_rms_norm(x, x, weight, 1e-6)
        qkv = torch.zeros(num_tokens, num_heads + 2 * num_kv_heads, head_dim, dtype=torch.bfloat16)
        q, k = qkv[:, :num_heads], qkv[:, num_heads : num_heads + num_kv_heads]
        for heads in (q, k):
            rmsnorm_mod.rms_norm(heads, weight[:head_dim], 1e-6, out=heads)
        rotary_mod.apply_rotary_embedding(q, k, torch.zeros(num_tokens, dtype=torch.int64),
                                          torch.zeros(16, head_dim))
        activation_mod.silu_and_mul(torch.zeros(num_tokens, 2 * intermediate, dtype=torch.bfloat16))


def _source(kernel: Any, args: tuple, kwargs: dict) -> tuple[Any, dict, str]:
    """ASTSource, compile options and a readable key for one captured launch."""
    names = kernel.arg_names
    bound = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
    options = {k: v for k, v in kwargs.items() if k not in names}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        value = bound[name]
        if i in kernel.constexprs:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = _PTR_TYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i64" if abs(value) >= 2**31 else "i32"
            if value % 16 == 0 and not kernel.params[i].do_not_specialize:  # as the launcher specialises
                attrs[(i,)] = [["tt.divisibility", 16]]
    key = kernel.fn.__name__ + str(sorted((k, str(v)) for k, v in constexprs.items())) + str(options)
    return triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs), options, key


def _resource_usage(cubin: bytes) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        lines = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    fields = lines.strip().splitlines()[-1].split() if lines.strip() else []
    return " ".join(x for x in fields if x.startswith(("REG:", "STACK:")))


# (kernel, args, kwargs, arch) of each distinct compile; module-level so forked workers inherit it.
_JOBS: list[tuple[Any, tuple, dict, int]] = []


def _compile(index: int) -> tuple[bool, str]:
    """(ok, report line) of one compile."""
    kernel, args_, kwargs, arch = _JOBS[index]
    source, options, _ = _source(kernel, args_, kwargs)
    constants = {kernel.arg_names[k[0]]: str(v) for k, v in source.constants.items()}
    label = f"sm_{arch} {kernel.fn.__name__} {constants}"
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as exc:  # report every failing configuration, not just the first
        return False, f"FAIL {label}: {type(exc).__name__}: {str(exc)[:2000]}"
    if compiled.metadata.shared > _MAX_SHARED[arch]:  # would fail to load on the device
        return False, f"FAIL {label}: {compiled.metadata.shared} bytes of shared memory, sm_{arch} has {_MAX_SHARED[arch]}"
    # float32 operands must not be rounded to TF32 by the tensor cores (kernels/_dot.py).
    if constants.get("DOT_DTYPE") == "fp32" and re.search(r"inputPrecision = tf32\b(?!x3)", compiled.asm["ttir"]):
        return False, f"FAIL {label}: a float32 tl.dot compiles to TF32"
    return True, f"ok   {label} smem={compiled.metadata.shared} {_resource_usage(compiled.asm['cubin'])}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities, e.g. 80 90")
    parser.add_argument("--edges", action="store_true",
                        help="also every edge geometry (head_dim, block size, GQA group) and float32")
    parser.add_argument("--jobs", type=int, default=1, help="compiles at once (forked workers)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")

    launches: list[tuple[Any, tuple, dict]] = []
    _launch_all_configs(launches, args.edges)
    seen = set()
    for kernel, args_, kwargs in launches:
        key = _source(kernel, args_, kwargs)[2]
        for arch in args.arch:
            if (key, arch) not in seen:
                seen.add((key, arch))
                _JOBS.append((kernel, args_, kwargs, arch))
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_compile, range(len(_JOBS))))
    else:
        results = [_compile(i) for i in range(len(_JOBS))]
    for _, line in results:
        print(line)
    failures = sum(not ok for ok, _ in results)
    print(f"triton {triton.__version__}: {len(results) - failures} compiled, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
