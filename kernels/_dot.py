"""`dot`: `tl.dot` that stays exact for float32 operands.

`tl.dot` rounds float32 operands to TF32 (10 mantissa bits) on the tensor
cores by default, about 1e-3 relative error: a user who picks float32 wants
float32 results, so float32 operands use `input_precision="ieee"` (FMA, no
rounding). 16-bit operands keep the default, which is exact for them. The
choice is made at compile time from the DOT_DTYPE constexpr, so it costs
nothing at run time; the interpreter computes either in NumPy.
"""

import triton
import triton.language as tl


@triton.jit
def dot(a, b, DOT_DTYPE: tl.constexpr):
    if DOT_DTYPE == tl.float32:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out
