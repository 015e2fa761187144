"""Reading V tiles from paged caches in either V page layout (see `reference.token_minor_v`).

Token-major pages put a token's head_dim values together; token-minor pages put a page's tokens
together for each (kv head, d). P.V reduces over tokens, and on sm_90 an 8-bit tensor-core
operand must be contiguous along the reduced dim: from token-major FP8 pages Triton gathers V
byte by byte into shared memory (ncu: FP8 decode at 48% of DRAM bandwidth, 2 blocks/SM by
registers), while token-minor pages load as 16-byte runs of one page's tokens.

Token-minor tiles are loaded without a mask (a mask that varies inside a run would split the
vector loads): rows past the sequence read whole in-bounds pages (their own page, or block 0
where the block-table load was masked) and are zeroed in registers, so stale or NaN bytes never
reach the P.V product.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_v_rows(v_cache_ptr, blk, pos, head_off, valid, stride_vb, stride_vo,
                HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, RUN: tl.constexpr, DT: tl.constexpr,
                TOKEN_MINOR: tl.constexpr, MASKED: tl.constexpr):
    """V rows [N, HEAD_DIM] in dtype DT for tokens at positions pos [N] of blocks blk [N]
    (int64), kv head offset head_off ([N] or scalar: head * stride_vh). Rows where `valid` [N]
    is false (only when MASKED) are zero. RUN: tokens per contiguous run of `pos` that stay in
    one page and start page-aligned (min(PAGE, tile rows), tiles page-aligned)."""
    offs_d = tl.arange(0, HEAD_DIM)[None, :]
    if TOKEN_MINOR:
        off = (blk * stride_vb + head_off + (pos % PAGE))[:, None] + offs_d * PAGE
        off = tl.max_contiguous(tl.multiple_of(off, [RUN, 1]), [RUN, 1])
        v = tl.load(v_cache_ptr + off).to(DT)
        if MASKED:
            v = tl.where(valid[:, None], v, 0.0)
    else:
        off = (blk * stride_vb + (pos % PAGE).to(tl.int64) * stride_vo + head_off)[:, None] + offs_d
        if MASKED:
            v = tl.load(v_cache_ptr + off, mask=valid[:, None], other=0.0).to(DT)
        else:
            v = tl.load(v_cache_ptr + off).to(DT)
    return v
