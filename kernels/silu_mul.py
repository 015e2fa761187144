"""SiLU-and-mul of the gated MLP: gate_up [T, 2I] (gate first) -> silu(gate) * up [T, I].

Reference: `reference_fused.silu_and_mul_ref`. Rounds silu(gate) to the activation dtype before
the product, as the model's `F.silu(gate) * up` does; one kernel instead of three (chunk views,
silu, mul) and no [T, I] intermediate.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._rounding import round_to
from ._common import ACT_DTYPES, check, check_device, check_dim, check_dtype, check_last_contiguous

BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dt = x_ptr.dtype.element_ty
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    s = round_to(tl.math.div_rn(g, 1.0 + tl.exp(-g)), dt).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, round_to(s * u, dt), mask=mask)


def silu_and_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of `silu_and_mul_ref`.

    gate_up: [T, 2 * I] fp16/bf16, last dim contiguous (gate in [:, :I], up in [:, I:])
    out:     optional [T, I], same dtype, last dim contiguous
    No host sync: capturable in a CUDA graph.
    """
    check_dim("gate_up", gate_up, 2, "[num_tokens, 2 * intermediate]")
    check_dtype("gate_up", gate_up, ACT_DTYPES)
    check_last_contiguous("gate_up", gate_up)
    n_rows, width = gate_up.shape
    check(width % 2 == 0, lambda: f"gate_up's last dim {width} must be even (gate and up halves)")
    n_cols = width // 2
    if out is None:
        out = torch.empty(n_rows, n_cols, dtype=gate_up.dtype, device=gate_up.device)
    check(tuple(out.shape) == (n_rows, n_cols) and out.dtype == gate_up.dtype,
          lambda: f"out must be {gate_up.dtype} [{n_rows}, {n_cols}], got {out.dtype} {tuple(out.shape)}")
    check_last_contiguous("out", out)
    check_device("gate_up", gate_up, out=out)
    if n_rows == 0:
        return out
    _silu_and_mul_kernel[(n_rows, triton.cdiv(n_cols, BLOCK))](
        gate_up, out, gate_up.stride(0), out.stride(0), n_cols, BLOCK=BLOCK, num_warps=4)
    return out
