"""RMSNorm, optionally fused with the residual add before it.

Reference: `reference_fused.rms_norm_ref`. One program per row holds the whole row (hidden
sizes up to 16k): with a residual it loads x and residual, writes residual + x (rounded to the
activation dtype, as the model's `x = x + o` does) back into residual, and normalizes that sum
in float32; the output is weight * normed rounded like the model's `weight * x.to(dtype)`.
Replaces the model's ~8 elementwise kernels (add, cast, pow, mean, rsqrt, mul, cast, mul) by one.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._pdl import launch_kwargs, pdl_trigger, pdl_wait
from ._rounding import round_to
from ._common import ACT_DTYPES, check, check_device, check_dim, check_dtype, check_last_contiguous, next_pow2

MAX_HIDDEN = 16384


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, n_cols, eps,
                     BLOCK: tl.constexpr, HAS_RES: tl.constexpr, PDL: tl.constexpr = 0):
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    dt = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = round_to(r.to(tl.float32) + x.to(tl.float32), dt)
        tl.store(res_ptr + row * stride_r + offs, x, mask=mask)
    xf = x.to(tl.float32)
    mean_sq = tl.sum(xf * xf, axis=0) / n_cols
    pdl_trigger(PDL)
    y = round_to(xf * tl.math.rsqrt(mean_sq + eps), dt)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + offs, round_to(w.to(tl.float32) * y.to(tl.float32), dt),
             mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of `rms_norm_ref`; returns out [T, H].

    x:        [T, H] fp16/bf16, last dim contiguous
    weight:   [H], x's dtype, contiguous
    residual: optional [T, H], x's dtype, last dim contiguous; updated in place to residual + x,
              and that sum is normed (the fused residual add)
    No host sync: capturable in a CUDA graph.
    """
    check_dim("x", x, 2, "[num_tokens, hidden]")
    check_dtype("x", x, ACT_DTYPES)
    check_last_contiguous("x", x)
    n_rows, hidden = x.shape
    check(hidden <= MAX_HIDDEN, lambda: f"hidden size {hidden} exceeds {MAX_HIDDEN} (one row per program)")
    check(weight.dim() == 1 and weight.shape[0] == hidden and weight.stride(0) == 1,
          lambda: f"weight must be contiguous [{hidden}], got shape {tuple(weight.shape)}")
    check(weight.dtype == x.dtype, lambda: f"weight is {weight.dtype} but x is {x.dtype}")
    if residual is not None:
        check(residual.shape == x.shape,
              lambda: f"residual {tuple(residual.shape)} and x {tuple(x.shape)} differ in shape")
        check(residual.dtype == x.dtype, lambda: f"residual is {residual.dtype} but x is {x.dtype}")
        check_last_contiguous("residual", residual)
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    check(out.shape == x.shape and out.dtype == x.dtype,
          lambda: f"out must be {x.dtype} {tuple(x.shape)}, got {out.dtype} {tuple(out.shape)}")
    check_last_contiguous("out", out)
    check_device("x", x, weight=weight, residual=residual, out=out)
    if n_rows == 0:
        return out
    block = next_pow2(hidden)
    _rms_norm_kernel[(n_rows,)](
        x, residual if residual is not None else x, weight, out,
        x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), hidden, eps,
        BLOCK=block, HAS_RES=residual is not None, num_warps=min(16, max(1, block // 512)),
        **launch_kwargs(x.device, n_rows),
    )
    return out
