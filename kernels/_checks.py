"""Argument checks and tile-size helpers shared by the Triton kernel wrappers.

Plain torch and Python only, so this module imports where Triton is missing.
The wrappers check on the host what the kernels silently assume: a kernel
that reads a wrong stride or dtype does not fail, it returns garbage.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (and >= 1): `tl.arange` needs power-of-two extents."""
    return 1 << max(0, (n - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    """Ceiling division for host ints; `triton.cdiv` is a jit function, about 10 µs a call on the host."""
    return -(-a // b)


# Upper bounds of the prefill kernel's autotuning length buckets (of `max_query_len`); longer is one more.
_LEN_BUCKETS = (64, 512)


def len_bucket(max_query_len: int) -> int:
    """Length bucket of the prefill autotuning key: mostly-decode batches, mid-size chunks, long prompts."""
    for bucket in _LEN_BUCKETS:
        if max_query_len <= bucket:
            return bucket
    return 4096


def prefill_tuning_lengths(max_query_len: int) -> list[int]:
    """One query length (>= 2: one is decode) in each length bucket up to `max_query_len`, the longest
    a step can hold; a prefill at each meets every autotuning key a model's steps can reach."""
    lengths = [bucket for bucket in _LEN_BUCKETS if bucket < max_query_len] + [max_query_len]
    return [n for n in lengths if n >= 2]


def check_rank(name: str, tensor: torch.Tensor, rank: int) -> None:
    assert tensor.dim() == rank, f"{name} must be {rank}-D, got shape {tuple(tensor.shape)}"


def check_float(name: str, tensor: torch.Tensor) -> None:
    assert tensor.dtype in FLOAT_DTYPES, f"{name} must be float32/float16/bfloat16, got {tensor.dtype}"


def check_last_dim_contiguous(name: str, tensor: torch.Tensor) -> None:
    # The kernels address the last dim as `base + d`, without a stride.
    assert tensor.shape[-1] <= 1 or tensor.stride(-1) == 1, (
        f"{name} must be contiguous in its last dim, got strides {tensor.stride()}"
    )


def check_index(name: str, tensor: torch.Tensor, dtype: torch.dtype, rank: int, device: torch.device) -> None:
    check_rank(name, tensor, rank)
    assert tensor.dtype == dtype, f"{name} must be {dtype}, got {tensor.dtype}"
    assert tensor.device == device, f"{name} is on {tensor.device}, expected {device}"
    check_last_dim_contiguous(name, tensor)


def check_same_device(device: torch.device, **tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        assert tensor.device == device, f"{name} is on {tensor.device}, expected {device}"


def dot_dtype(dtype: torch.dtype, device: torch.device):  # -> tl.dtype; the caller has imported Triton
    """Operand dtype for `tl.dot` in a kernel reading tensors of `dtype` on `device`.

    On CUDA, 16-bit operands run on the tensor cores (fp32 accumulation); fp32
    operands stay fp32 and `kernels._dot.dot` keeps their accuracy (3xTF32,
    not TF32). The interpreter (CPU) computes 16-bit arithmetic wrongly, so there
    everything stays float32.
    """
    import triton.language as tl

    if device.type != "cuda" or dtype == torch.float32:
        return tl.float32
    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16


def check_attention_args(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """Check a paged attention call against the layout in `kernels/__init__.py`.

    Nothing here reads tensor values, so a wrapper runs it once per geometry (`kernels/_launch.py`)
    and `check_batch_sizes`, which it includes, on every call.
    """
    check_rank("query", query, 3)
    check_float("query", query)
    check_last_dim_contiguous("query", query)
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache)):
        check_rank(name, t, 4)
        check_float(name, t)
        check_last_dim_contiguous(name, t)
        assert t.device == query.device, f"{name} is on {t.device}, query on {query.device}"
    _, num_heads, head_dim = query.shape
    _, _, num_kv_heads, cache_head_dim = key_cache.shape
    assert value_cache.shape == key_cache.shape, "key_cache and value_cache shapes differ"
    assert cache_head_dim == head_dim, f"cache head_dim {cache_head_dim} != query head_dim {head_dim}"
    assert num_heads % num_kv_heads == 0, f"{num_heads} heads do not split into {num_kv_heads} KV heads"
    check_index("block_tables", block_tables, torch.int32, 2, query.device)
    check_index("seq_lens", seq_lens, torch.int32, 1, query.device)
    check_index("query_start_loc", query_start_loc, torch.int32, 1, query.device)
    assert out.shape[1:] == query.shape[1:] and out.device == query.device, "out must match query"
    check_float("out", out)
    check_last_dim_contiguous("out", out)
    check_batch_sizes(query, block_tables, seq_lens, query_start_loc, out)


def check_batch_sizes(
    query: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """The checks on leading (token and request) dims: these change from call to call, so they run every time."""
    num_reqs = seq_lens.shape[0]
    assert block_tables.shape[0] == num_reqs, "block_tables needs one row per request"
    assert query_start_loc.shape[0] == num_reqs + 1, "query_start_loc needs num_reqs + 1 entries"
    assert out.shape[0] == query.shape[0], "out must match query"
