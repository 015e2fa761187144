"""Rounding float32 to the activation dtype inside Triton kernels, the same on GPU and in the
CPU interpreter.

Triton 3.9's interpreter converts float32 -> bfloat16 by truncation (seen 2026-11-29:
1 + 2^-8 + 2^-10 -> 1.0, torch gives 1.0078125), while GPUs and torch round to nearest-even.
The fused glue kernels must round exactly where the model's torch code rounds, so bf16 is
rounded here in integer arithmetic (RNE on the bit pattern) and the final cast is exact.
fp16 conversions are right in both. Finite inputs only (NaN / inf are not activations).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to(x, dt: tl.constexpr):
    """float32 x -> dt (fp16 / bf16), round to nearest-even."""
    if dt.is_bf16():
        bits = x.to(tl.int32, bitcast=True)
        # add half an ulp (minus one when the kept lsb is even: ties to even), drop 16 bits
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dt)
