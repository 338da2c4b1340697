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
    inputs use Triton's default tf32. The interpreter (CPU) computes 16-bit
    arithmetic wrongly, so there everything stays float32.
    """
    import triton.language as tl

    if device.type != "cuda" or dtype == torch.float32:
        return tl.float32
    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16
