"""`dot`: `tl.dot` that keeps float32 accuracy for float32 operands.

`tl.dot` rounds float32 operands to TF32 (10 mantissa bits) on the tensor
cores by default, about 1e-3 relative error: a user who picks float32 wants
float32 results. Float32 operands therefore use `input_precision="tf32x3"`:
each operand is split into a TF32 high part and a TF32 remainder and three
tensor-core products are summed, which leaves only the product of the two
remainders out (about 2^-22 relative, float32's own rounding). IEEE
precision would be exact too, but it lowers to one FMA per multiply-add:
a 128x64x128 tile is a million scalar instructions, which takes minutes to
compile and runs far slower. 16-bit operands keep the default, exact for
them. The choice is made at compile time from the DOT_DTYPE constexpr; the
interpreter computes every precision in NumPy float32.
"""

import triton
import triton.language as tl


@triton.jit
def dot(a, b, DOT_DTYPE: tl.constexpr):
    if DOT_DTYPE == tl.float32:
        out = tl.dot(a, b, input_precision="tf32x3")
    else:
        out = tl.dot(a, b)
    return out
