"""Torch references of the fused layer-glue kernels (rmsnorm.py, rope.py, silu_mul.py, gemv.py).

They spell out, op by op, what engine/model.py's plain torch path computes, including where it
rounds to the activation dtype, so a kernel that rounds at the same points matches bit for bit
(up to the order of the RMS sum and the last bits of rsqrt / exp):

  rms_norm:      x32 = x.float(); y = (x32 * rsqrt(mean(x32^2) + eps)).to(dtype); out = weight * y
                 (the product rounded to dtype); with a residual, x = residual + x is rounded to
                 dtype first and written back into residual (what `x = x + o` does in the model)
  rope:          rotate-half (neox) form: out = x * cos + rotate_half(x) * sin, every product and
                 the sum rounded to dtype; cos/sin in dtype from positions * inv_freq in float32
  silu_and_mul:  silu(gate) rounded to dtype, times up, rounded to dtype
  gemv_linear / norm_linear (gemv.py): x @ W.T accumulated in float32 and rounded once, after
                 rms_norm (and before silu_and_mul) as above
"""
from __future__ import annotations

import torch

from .reference import write_kv_ref


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, H]; returns the normed [T, H]; with residual, residual <- residual + x in place
    and the sum is what gets normed."""
    if residual is not None:
        residual.copy_(residual + x)
        x = residual
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_cos_sin_cache(inv_freq: torch.Tensor, max_positions: int, dtype: torch.dtype) -> torch.Tensor:
    """[max_positions, head_dim]: cos of positions * inv_freq in the first half, sin in the second,
    rounded to dtype exactly as the model's per-step `rope()` rounds them."""
    freqs = torch.arange(max_positions, device=inv_freq.device).float()[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype)


def rope_ref(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D] -> rotated copy, rounding like `x * cos + rotate_half(x) * sin` in dtype."""
    half = x.shape[-1] // 2
    cs = cos_sin[positions]                                          # [T, D]
    cos = torch.cat((cs[:, :half], cs[:, :half]), -1)[:, None, :]
    sin = torch.cat((cs[:, half:], cs[:, half:]), -1)[:, None, :]
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


def rope_write_kv_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, positions: torch.Tensor,
                      cos_sin: torch.Tensor, k_cache: torch.Tensor | None = None,
                      v_cache: torch.Tensor | None = None, slot_mapping: torch.Tensor | None = None,
                      k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
    """RoPE on q and k in place; with a cache, rotated k and v into their slots (`write_kv_ref`)."""
    q.copy_(rope_ref(q, positions, cos_sin))
    k.copy_(rope_ref(k, positions, cos_sin))
    if k_cache is not None:
        write_kv_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2 * I] (gate first) -> silu(gate) * up: [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def gemv_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T (+ bias) accumulated in float32, rounded once to x's dtype."""
    y = x.float() @ weight.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def norm_linear_ref(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                    residual: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                    silu: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """rms_norm_ref then gemv_linear_ref (then silu_and_mul_ref with silu: weight is [gate; up]);
    returns (out, residual + x rounded to the dtype, or None). residual is not modified."""
    res_sum = None
    if residual is not None:
        res_sum = residual.clone()
    h = rms_norm_ref(x, norm_weight, eps, res_sum)
    y = gemv_linear_ref(h, weight, bias)
    return (silu_and_mul_ref(y) if silu else y), res_sum
