"""RoPE + paged KV write as the epilogue of the QKV GEMV (gemv.py's `norm_linear(..., rope=)`).

At one token per step the separate RoPE + KV-write kernel (rope.py) is a launch of its own per
layer (3.4 us x 32 layers of a 4.4 ms Llama-3-8B step; fused, the step took 84 us less in bf16
and 124 us less with an FP8 cache: bench/results/engine-b1-2026-11-29-s10.md). Fused, the
QKV GEMV's programs own *pairs* of output columns: program p computes BLOCK_N rotate-half pairs
(d, d + head_dim/2) of one head, i.e. W rows [r, r + BLOCK_N) and [r + half, r + half + BLOCK_N)
-- the same two-accumulator loop as the SiLU epilogue, whose second row set is the up half.
Then, in registers:
  * q heads: rotate, store into the QKV output (the attention reads q from there);
  * k heads: rotate, store into the QKV output and into the token's cache slot;
  * v heads: store into the QKV output and into the cache slot.
The rounding is rope.py's (`_rotate`), the FP8 quantisation kv_write.py's, slot -1 stores no
KV, so the result equals `norm_linear` followed by `rope_write_kv` bit for bit.
Reference: `reference_fused.norm_linear_ref` then `rope_write_kv_ref`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import check, check_head_dim, check_kv_cache
from .kv_write import quantize_e4m3
from .rope import _rotate


class RopeKV(NamedTuple):
    """Where the QKV GEMV's epilogue rotates and writes: the arguments of `rope_write_kv`."""
    positions: torch.Tensor      # int64 [M]
    cos_sin: torch.Tensor        # [max_positions, head_dim], the activation dtype (cos | sin)
    num_q_heads: int
    num_kv_heads: int
    k_cache: torch.Tensor        # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor        # the same shape (V pages may be token-minor)
    slot_mapping: torch.Tensor   # int64 [M], -1 = padding (no KV stored)
    k_scale: torch.Tensor | None = None   # FP8 caches: float32 [num_kv_heads]
    v_scale: torch.Tensor | None = None


def check_rope(r: RopeKV, x: torch.Tensor, weight: torch.Tensor, block_n: int) -> bool:
    """Validates the epilogue's arguments against x [M, K] and the QKV weight; returns FP8."""
    m = x.shape[0]
    check(r.cos_sin.dim() == 2, lambda: f"cos_sin must be [max_positions, head_dim], got "
          f"{tuple(r.cos_sin.shape)}")
    d = r.cos_sin.shape[1]
    check_head_dim(d)
    n = (r.num_q_heads + 2 * r.num_kv_heads) * d
    check(weight.shape[0] == n, lambda: f"weight has {weight.shape[0]} rows; q + k + v of "
          f"{r.num_q_heads}/{r.num_kv_heads} heads of {d} is {n}")
    check(r.cos_sin.dtype == x.dtype and r.cos_sin.stride(1) == 1,
          lambda: f"cos_sin must be {x.dtype} [max_positions, head_dim], last dim contiguous")
    for name, t in (("positions", r.positions), ("slot_mapping", r.slot_mapping)):
        check(t.dim() == 1 and t.shape[0] == m and t.dtype == torch.int64 and t.stride(0) == 1,
              lambda: f"{name} must be contiguous int64 [{m}], got {t.dtype} {tuple(t.shape)}")
    fp8 = check_kv_cache(r.k_cache, r.v_cache, r.k_scale, r.v_scale)
    check(tuple(r.k_cache.shape[2:]) == (r.num_kv_heads, d),
          lambda: f"the cache's [num_kv_heads, head_dim] is {tuple(r.k_cache.shape[2:])}, "
          f"the QKV weight's is ({r.num_kv_heads}, {d})")
    check(fp8 or r.k_cache.dtype == x.dtype,
          lambda: f"x is {x.dtype} but the cache is {r.k_cache.dtype}; a non-FP8 cache must match")
    check((d // 2) % block_n == 0, lambda: f"block_n {block_n} must divide head_dim / 2 = {d // 2}: "
          "a program's column pairs lie in one head")
    return fp8


def rope_launch_args(r: RopeKV | None, x: torch.Tensor) -> tuple:
    """The kernel's epilogue arguments (placeholders without rope)."""
    if r is None:
        return (x, x, 0, x, x, x, x, x, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0)
    kc, vc = r.k_cache, r.v_cache
    ks = r.k_scale if r.k_scale is not None else r.cos_sin
    vs = r.v_scale if r.v_scale is not None else r.cos_sin
    return (r.positions, r.cos_sin, r.cos_sin.stride(0), kc, vc, r.slot_mapping, ks, vs,
            kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2),
            vc.stride(3), kc.shape[1], r.num_q_heads, r.num_kv_heads)


@triton.jit
def _store_kv(p, scale_ptr, y, mask, FP8: tl.constexpr, FP8_MAX: tl.constexpr):
    """y [BLOCK_N, BLOCK_M] (activation dtype) into cache pointers p, quantized when FP8."""
    yf = y.to(tl.float32)
    if FP8:
        yf = quantize_e4m3(yf, tl.load(scale_ptr), FP8_MAX)
    tl.store(p, yf.to(p.dtype.element_ty), mask=mask)


@triton.jit
def rope_kv_epilogue(y1, y2, offs_n, rows, M, out_ptr, stride_o,
                     pos_ptr, cs_ptr, stride_cs, kc_ptr, vc_ptr, slot_ptr, ks_ptr, vs_ptr,
                     s_kblk, s_koff, s_kh, s_vblk, s_voff, s_vh, s_vd, block_size,
                     num_q_heads, num_kv_heads, HALF: tl.constexpr, FP8: tl.constexpr,
                     FP8_MAX: tl.constexpr):
    """y1, y2: the rounded outputs [BLOCK_N, BLOCK_M] of W rows offs_n and offs_n + HALF (the
    first and second halves of one head)."""
    head = offs_n // (2 * HALF)                 # [BLOCK_N], all equal
    h0 = tl.min(head, axis=0)
    d = offs_n % (2 * HALF)                     # < HALF
    row_ok = rows[None, :] < M                  # [1, BLOCK_M]
    o_ptrs = out_ptr + rows[None, :] * stride_o + offs_n[:, None]
    slot = tl.load(slot_ptr + rows, mask=rows < M, other=-1).to(tl.int64)
    blk = (slot // block_size)[None, :]
    off = (slot % block_size)[None, :]
    write = row_ok & (slot[None, :] >= 0)
    if h0 < num_q_heads + num_kv_heads:         # q or k: rotate
        pos = tl.load(pos_ptr + rows, mask=rows < M, other=0).to(tl.int64)
        cp = cs_ptr + pos[None, :] * stride_cs + d[:, None]
        c = tl.load(cp, mask=row_ok, other=0.0).to(tl.float32)
        s = tl.load(cp + HALF, mask=row_ok, other=0.0).to(tl.float32)
        o1, o2 = _rotate(y1, y2, c, s, out_ptr.dtype.element_ty)
        tl.store(o_ptrs, o1, mask=row_ok)
        tl.store(o_ptrs + HALF, o2, mask=row_ok)
        if h0 >= num_q_heads:
            kvh = h0 - num_q_heads
            p = kc_ptr + blk * s_kblk + off * s_koff + kvh * s_kh + d[:, None]
            _store_kv(p, ks_ptr + kvh, o1, write, FP8, FP8_MAX)
            _store_kv(p + HALF, ks_ptr + kvh, o2, write, FP8, FP8_MAX)
    else:                                       # v: as computed
        tl.store(o_ptrs, y1, mask=row_ok)
        tl.store(o_ptrs + HALF, y2, mask=row_ok)
        kvh = h0 - num_q_heads - num_kv_heads
        p = vc_ptr + blk * s_vblk + off * s_voff + kvh * s_vh + d[:, None] * s_vd
        _store_kv(p, vs_ptr + kvh, y1, write, FP8, FP8_MAX)
        _store_kv(p + HALF * s_vd, vs_ptr + kvh, y2, write, FP8, FP8_MAX)
