"""RoPE (rotate-half / neox form) on q and k in place, fused with the KV-cache write.

Reference: `reference_fused.rope_write_kv_ref`. One program per token: it reads the token's
cos/sin row from a precomputed cache ([max_positions, head_dim]: cos in the first half, sin in
the second) at its position, rotates all q heads and all k heads in place, and, when a cache is
given, stores the rotated k and v into the token's slot with `write_kv`'s semantics (slot -1 is
padding and stores nothing; FP8 caches store saturate(value / scale) rounded to nearest-even
e4m3). Products and sums round to the activation dtype where the model's
`x * cos + rotate_half(x) * sin` rounds, so the result equals the torch path bit for bit.
Replaces ~10 kernels per layer (2 x (mul, slice, neg, cat, mul, add) + the separate KV write).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (ACT_DTYPES, check, check_device, check_dim, check_dtype, check_head_dim,
                      check_kv_cache, check_last_contiguous, next_pow2)
from ._pdl import launch_kwargs, pdl_trigger, pdl_wait
from ._rounding import round_to
from .kv_write import quantize_e4m3
from .reference import FP8_MAX


@triton.jit
def _rotate(x1, x2, c, s, DT: tl.constexpr):
    """(x1, x2) halves in the activation dtype, c/s float32 -> rotated halves, model rounding."""
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    o1 = round_to(round_to(a * c, DT).to(tl.float32) + round_to(-(b * s), DT).to(tl.float32), DT)
    o2 = round_to(round_to(b * c, DT).to(tl.float32) + round_to(a * s, DT).to(tl.float32), DT)
    return o1, o2


@triton.jit
def _store_kv(cache_ptr, scale_ptr, x1, x2, offs_h, offs_d, mask, head_mask, stride_h, stride_d,
              HALF: tl.constexpr, FP8: tl.constexpr, FP8_MAX: tl.constexpr):
    """One token's [H, D] row (as two halves) into its cache slot, quantized when FP8."""
    y1, y2 = x1.to(tl.float32), x2.to(tl.float32)
    if FP8:
        sc = tl.load(scale_ptr + offs_h, mask=head_mask, other=1.0)   # [H, 1]
        y1 = quantize_e4m3(y1, sc, FP8_MAX)
        y2 = quantize_e4m3(y2, sc, FP8_MAX)
    p = cache_ptr + offs_h * stride_h + offs_d * stride_d
    tl.store(p, y1.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(p + HALF * stride_d, y2.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_write_kv_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cs_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_scale_ptr, v_scale_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs,
    stride_kc_blk, stride_kc_off, stride_kc_h, stride_vc_blk, stride_vc_off, stride_vc_h, stride_vc_d,
    num_q_heads, num_kv_heads, block_size,
    HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    WRITE: tl.constexpr, FP8: tl.constexpr, FP8_MAX: tl.constexpr, PDL: tl.constexpr = 0,
):
    pdl_wait(PDL)
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    offs_d = tl.arange(0, HALF)[None, :]
    offs_hk = tl.arange(0, BLOCK_HK)[:, None]
    mk = (offs_hk < num_kv_heads) & (offs_d < HALF)
    if WRITE:
        # the slot and v loads go out here, beside the others, not after the rotation (the PDL
        # trigger between would order them): one dependent round trip less, decode step -14 /
        # -7 / -7 us at batch 8 / 32 / 128 (bench/results/engine-2026-11-30-s12.md, section 5)
        slot = tl.load(slot_ptr + tok).to(tl.int64)
        vp = v_ptr + tok * stride_vt + offs_hk * stride_vh + offs_d
        v1 = tl.load(vp, mask=mk, other=0.0)
        v2 = tl.load(vp + HALF, mask=mk, other=0.0)
    c = tl.load(cs_ptr + pos * stride_cs + offs_d).to(tl.float32)            # [1, HALF]
    s = tl.load(cs_ptr + pos * stride_cs + HALF + offs_d).to(tl.float32)
    # q heads, in place
    offs_hq = tl.arange(0, BLOCK_HQ)[:, None]
    mq = (offs_hq < num_q_heads) & (offs_d < HALF)
    qp = q_ptr + tok * stride_qt + offs_hq * stride_qh + offs_d
    q1, q2 = _rotate(tl.load(qp, mask=mq, other=0.0), tl.load(qp + HALF, mask=mq, other=0.0), c, s,
                     q_ptr.dtype.element_ty)
    tl.store(qp, q1, mask=mq)
    tl.store(qp + HALF, q2, mask=mq)
    # k heads, in place
    kp = k_ptr + tok * stride_kt + offs_hk * stride_kh + offs_d
    k1, k2 = _rotate(tl.load(kp, mask=mk, other=0.0), tl.load(kp + HALF, mask=mk, other=0.0), c, s,
                     q_ptr.dtype.element_ty)
    tl.store(kp, k1, mask=mk)
    tl.store(kp + HALF, k2, mask=mk)
    pdl_trigger(PDL)
    if WRITE:
        # padding tokens (slot < 0) store nothing: fold it into the mask, no early exit
        mw = mk & ((tl.zeros([BLOCK_HK, HALF], tl.int64) + slot) >= 0)
        blk = slot // block_size
        off = slot % block_size
        _store_kv(k_cache_ptr + blk * stride_kc_blk + off * stride_kc_off, k_scale_ptr, k1, k2,
                  offs_hk, offs_d, mw, offs_hk < num_kv_heads, stride_kc_h, 1, HALF, FP8, FP8_MAX)
        _store_kv(v_cache_ptr + blk * stride_vc_blk + off * stride_vc_off, v_scale_ptr, v1, v2,
                  offs_hk, offs_d, mw, offs_hk < num_kv_heads, stride_vc_h, stride_vc_d, HALF, FP8,
                  FP8_MAX)


def _check_qk(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    check_dim("q", q, 3, "[num_tokens, num_q_heads, head_dim]")
    check_dim("k", k, 3, "[num_tokens, num_kv_heads, head_dim]")
    check_dtype("q", q, ACT_DTYPES)
    check(k.dtype == q.dtype, lambda: f"q is {q.dtype} but k is {k.dtype}")
    check(k.shape[0] == q.shape[0] and k.shape[2] == q.shape[2],
          lambda: f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in tokens or head_dim")
    check_head_dim(q.shape[2])
    check_last_contiguous("q", q)
    check_last_contiguous("k", k)
    check(positions.dim() == 1 and positions.shape[0] == q.shape[0] and positions.dtype == torch.int64
          and positions.stride(0) == 1,
          lambda: f"positions must be contiguous int64 [{q.shape[0]}], got {positions.dtype} "
          f"{tuple(positions.shape)}")
    check(cos_sin.dim() == 2 and cos_sin.shape[1] == q.shape[2] and cos_sin.dtype == q.dtype,
          lambda: f"cos_sin must be {q.dtype} [max_positions, {q.shape[2]}] (cos | sin), got "
          f"{cos_sin.dtype} {tuple(cos_sin.shape)}")
    check_last_contiguous("cos_sin", cos_sin)


def _check_write(k: torch.Tensor, v: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor | None, k_scale, v_scale) -> bool:
    fp8 = check_kv_cache(k_cache, v_cache, k_scale, v_scale)
    check(v is not None and v.shape == k.shape and v.dtype == k.dtype,
          lambda: f"v must match k ({k.dtype} {tuple(k.shape)}), got "
          f"{None if v is None else (v.dtype, tuple(v.shape))}")
    assert v is not None
    check_last_contiguous("v", v)
    check(tuple(k.shape[1:]) == tuple(k_cache.shape[2:]),
          lambda: f"k has shape {tuple(k.shape)}, expected [num_tokens, {k_cache.shape[2]}, "
          f"{k_cache.shape[3]}] to match the cache")
    check(fp8 or k_cache.dtype == k.dtype,
          lambda: f"k is {k.dtype} but the cache is {k_cache.dtype}; a non-FP8 cache must match k")
    check(slot_mapping is not None and slot_mapping.dim() == 1 and slot_mapping.dtype == torch.int64
          and slot_mapping.shape[0] == k.shape[0] and slot_mapping.stride(0) == 1,
          lambda: f"slot_mapping must be contiguous int64 [{k.shape[0]}]")
    return fp8


def rope_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, positions: torch.Tensor,
                  cos_sin: torch.Tensor, k_cache: torch.Tensor | None = None,
                  v_cache: torch.Tensor | None = None, slot_mapping: torch.Tensor | None = None,
                  k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
    """Triton version of `rope_write_kv_ref`: rotate q and k in place; with a cache, write k, v.

    q: [T, Hq, D], k/v: [T, Hkv, D], fp16/bf16, last dim contiguous (views of a fused QKV output
       are fine: token and head strides are free)
    positions: int64 [T]; every position must be < cos_sin.shape[0] (not checked: no host reads)
    cos_sin:   [max_positions, D] in q's dtype (`rope_cos_sin_cache`)
    k_cache, v_cache, slot_mapping, k_scale, v_scale: as for `write_kv`, or all None (RoPE only)
    No host sync: capturable in a CUDA graph.
    """
    _check_qk(q, k, positions, cos_sin)
    write = k_cache is not None
    fp8 = False
    if write:
        check(v_cache is not None, lambda: "k_cache was given without v_cache")
        fp8 = _check_write(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    else:
        check(v_cache is None and slot_mapping is None and k_scale is None and v_scale is None,
              lambda: "cache arguments were given without k_cache")
    check_device("q", q, k=k, v=v, positions=positions, cos_sin=cos_sin, k_cache=k_cache,
                 v_cache=v_cache, slot_mapping=slot_mapping, k_scale=k_scale, v_scale=v_scale)
    num_tokens, num_q_heads, head_dim = q.shape
    if num_tokens == 0:
        return
    vv = v if write else k
    kc = k_cache if write else q
    vc = v_cache if write else q
    _rope_write_kv_kernel[(num_tokens,)](
        q, k, vv, positions, cos_sin, kc, vc, slot_mapping if write else positions,
        k_scale if fp8 else cos_sin, v_scale if fp8 else cos_sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), vv.stride(0), vv.stride(1), cos_sin.stride(0),
        kc.stride(0), kc.stride(1), kc.stride(2) if write else 0,
        vc.stride(0), vc.stride(1), vc.stride(2) if write else 0, vc.stride(3) if write else 1,
        num_q_heads, k.shape[1], k_cache.shape[1] if write else 1,
        HALF=head_dim // 2, BLOCK_HQ=next_pow2(num_q_heads), BLOCK_HK=next_pow2(k.shape[1]),
        WRITE=write, FP8=fp8, FP8_MAX=FP8_MAX, num_warps=4,
        **launch_kwargs(q.device, num_tokens),
    )
