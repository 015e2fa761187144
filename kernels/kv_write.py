"""KV-cache write: new K/V rows into their paged-cache slots, FP8 quantization on write.

Reference: `reference.write_kv_ref`. One program per new token writes all of its kv heads
(K and V); a token whose slot is negative is padding and writes nothing.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (ACT_DTYPES, check, check_device, check_dim, check_dtype,
                      check_kv_cache, check_last_contiguous, next_pow2)
from .reference import FP8_MAX


@triton.jit
def round_to_e4m3_grid(x):
    """Round float32 x (|x| <= 448) to the nearest e4m3 value, ties to even.

    Done in float32 arithmetic so the final cast is exact: the Triton 3.9 interpreter's own
    fp32->fp8 conversion mis-rounds ties and carries (e.g. 126 -> 64), while hardware uses
    round-to-nearest-even, as torch's `.to(float8_e4m3fn)` does. This makes both bit-exact.
    """
    bits = x.to(tl.int32, bitcast=True)
    exp = ((bits >> 23) & 0xFF) - 127
    # e4m3: 3 mantissa bits, smallest normal exponent -6 (below it the spacing is 2^-9)
    ulp_exp = tl.maximum(exp, -6) - 3
    # adding 1.5 * 2^23 * ulp rounds to a multiple of ulp with the fp32 adder's RNE
    magic = ((ulp_exp + 23 + 127) << 23).to(tl.float32, bitcast=True) * 1.5
    mag = (tl.abs(x) + magic) - magic
    # on |x| so that tiny negatives round to -0 like torch (a GPU compiler may still emit +0,
    # equal in value)
    return tl.where(x < 0, -mag, mag)


@triton.jit
def quantize_e4m3(x, scale, FP8_MAX: tl.constexpr):
    """float32 x / scale (IEEE division like the reference; Triton's `/` is approximate in
    fp32), saturated at +-FP8_MAX and rounded to the e4m3 grid: what an FP8 cache stores."""
    return round_to_e4m3_grid(tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -FP8_MAX), FP8_MAX))


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_scale_ptr, v_scale_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kc_blk, stride_kc_off, stride_kc_h,
    stride_vc_blk, stride_vc_off, stride_vc_h, stride_vc_d,
    num_kv_heads, block_size,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, FP8: tl.constexpr, FP8_MAX: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    # padding tokens (slot < 0) store nothing: fold it into the mask, no early exit
    valid = tl.full([BLOCK_H, HEAD_DIM], 0, tl.int64) + slot >= 0
    mask = (offs_h[:, None] < num_kv_heads) & valid
    blk = slot // block_size
    off = slot % block_size
    k = tl.load(k_ptr + tok * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + tok * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    if FP8:
        ks = tl.load(k_scale_ptr + offs_h, mask=offs_h < num_kv_heads, other=1.0)
        vs = tl.load(v_scale_ptr + offs_h, mask=offs_h < num_kv_heads, other=1.0)
        k = quantize_e4m3(k, ks[:, None], FP8_MAX)
        v = quantize_e4m3(v, vs[:, None], FP8_MAX)
    kc = k_cache_ptr + blk * stride_kc_blk + off * stride_kc_off
    vc = v_cache_ptr + blk * stride_vc_blk + off * stride_vc_off
    tl.store(kc + offs_h[:, None] * stride_kc_h + offs_d[None, :],
             k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(vc + offs_h[:, None] * stride_vc_h + offs_d[None, :] * stride_vc_d,
             v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None) -> None:
    """Write new K/V into the paged cache in place (Triton version of `write_kv_ref`).

    k, v:          [num_tokens, num_kv_heads, head_dim], fp16/bf16, last dim contiguous
                   (token and head strides are free, so views of a fused QKV output work)
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], fp16/bf16/fp8-e4m3
                   (v_cache may be token-minor, `reference.token_minor_v`)
    slot_mapping:  int64 [num_tokens]; slot = block_id * block_size + offset; -1 = skip
    k_scale, v_scale: float32 [num_kv_heads], required for (and only for) an FP8 cache;
                   stored = saturate(value / scale) rounded to nearest-even e4m3.
    No host sync: capturable in a CUDA graph.
    """
    fp8 = check_kv_cache(k_cache, v_cache, k_scale, v_scale)
    layout = "[num_tokens, num_kv_heads, head_dim]"
    check_dim("k", k, 3, layout)
    check_dim("v", v, 3, layout)
    _, _, num_kv_heads, head_dim = k_cache.shape
    check(k.shape == v.shape, lambda: f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
    check(tuple(k.shape[1:]) == (num_kv_heads, head_dim),
          lambda: f"k has shape {tuple(k.shape)}, expected "
          f"[num_tokens, {num_kv_heads}, {head_dim}] "
          "to match the cache")
    check_dtype("k", k, ACT_DTYPES)
    check(v.dtype == k.dtype, lambda: f"k is {k.dtype} but v is {v.dtype}")
    check(fp8 or k_cache.dtype == k.dtype,
          lambda: f"k is {k.dtype} but the cache is {k_cache.dtype}; a non-FP8 cache must match k")
    check_last_contiguous("k", k)
    check_last_contiguous("v", v)
    check_dim("slot_mapping", slot_mapping, 1, "[num_tokens]")
    check(slot_mapping.dtype == torch.int64,
          lambda: f"slot_mapping must be int64, got {slot_mapping.dtype}")
    check(slot_mapping.shape[0] == k.shape[0],
          lambda: f"slot_mapping has {slot_mapping.shape[0]} entries but k has {k.shape[0]} tokens")
    check(slot_mapping.stride(0) == 1, lambda: "slot_mapping must be contiguous")
    check_device("k", k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping,
                 k_scale=k_scale, v_scale=v_scale)
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k_scale if fp8 else k_cache, v_scale if fp8 else v_cache,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        num_kv_heads, k_cache.shape[1],
        HEAD_DIM=head_dim, BLOCK_H=next_pow2(num_kv_heads), FP8=fp8, FP8_MAX=FP8_MAX,
        num_warps=4,
    )
