"""Prefill / extend attention with the new tokens' K/V read from contiguous tensors, varlen.

Reference: `reference_prefill.prefill_attention_ref`. The q_len_i new tokens of sequence i
attend fully to its ctx_i = seq_len_i - q_len_i cached tokens (read through the block table
from the paged cache, as `paged_extend_attention` does) and causally to themselves, whose K/V
come from `k`, `v` [num_tokens, num_kv_heads, head_dim]: this step's projection output (k
rotated), strided views of the fused qkv are fine. Plain prefill (ctx 0) never touches the
cache, so its tiles load contiguous rows instead of gathering token by token.

Work split. One program per (query tile of BLOCK_M new tokens, query head, sequence), heavy
causal tiles first; tiles past a sequence's q_len exit at once, so the grid is sized from a
host bound on the longest q_len. Three key loops, FlashAttention-2 style (online softmax in
base 2, the softmax scale folded into the exponent, q loaded once):
  1. the cached prefix, unmasked BLOCK_N tiles then one tile masked at ctx;
  2. the new tokens before the query tile (j < mtile * BLOCK_M): no mask;
  3. the diagonal: causal mask j <= i and j < q_len.
With USE_TMA the contiguous K/V tiles of loops 2-3 load through host-built tensor descriptors
(TMA on Hopper; needs 16-byte aligned base and token stride); the pointer path is the default.
(`tl.range(..., warp_specialize=True)` was tried: compiled for sm_90, Triton 3.9 emits no
warp-specialized partitions for this loop, so there is no such option.)

FP8 caches: the prefix pages are e4m3, converted to q's dtype in registers, the K scale folded
into the softmax scale and the V scale folded into the probabilities before P.V. The new
tokens' K/V are, by default (`quantize_new_kv=True`), rounded in registers exactly as `write_kv`
stores them (value / scale, saturated, e4m3 round-to-nearest-even), so the result equals
`paged_extend_attention`'s over the written cache: a prompt's numerics do not depend on how it
was chunked or which part hit the prefix cache, and the engine's CPU and GPU paths see the
same K/V.
`quantize_new_kv=False` attends to the unquantized K/V instead (more accurate, slightly
cheaper; what FlashInfer-style prefill over fresh K/V computes).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (check, check_attention_args, check_device, check_dim,
                      check_last_contiguous, check_out_like, check_query_start_loc,
                      check_seq_metadata, v_token_minor)
from ._vpage import load_v_rows
from .kv_write import quantize_e4m3

# Tiles: swept on the H200, head_dim 128 (`bench/kernels.py --tune --only prefill`, 10 configs,
# bench/results/kernels-prefill-2026-11-29.md): 128 x 128, 8 warps, 3 stages with TMA loads of
# the contiguous K/V won (514 TFLOP/s on 4k causal; without TMA 451; 128 x 64: 348-482).
BLOCK_M = 128
BLOCK_N = 128
NUM_WARPS = 8
NUM_STAGES = 3
USE_TMA = True


@triton.jit
def _softmax_step(q, k, v, qk_scale, m_i, l_i, acc, mask, v_scale, MASKED: tl.constexpr,
                  SCALE_V: tl.constexpr):
    """One key tile of the online softmax: k, v [BLOCK_N, D] -> updated (m_i, l_i, acc)."""
    s = tl.dot(q, tl.trans(k)) * qk_scale                    # [BLOCK_M, BLOCK_N], log2 units
    if MASKED:
        s = tl.where(mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if SCALE_V:   # FP8: the V scale on p (rounded to the compute dtype like p itself)
        p = p * v_scale
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])   # accumulates inside the MMA
    return m_new, l_i, acc


@triton.jit
def _prefix_loop(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, bt_row, kvh, ctx, qk_scale,
                 v_scale, stride_cb, stride_co, stride_ch, stride_vb, stride_vo, stride_vh,
                 HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                 FP8: tl.constexpr, V_TOKEN_MINOR: tl.constexpr, V_RUN: tl.constexpr):
    """Keys [0, ctx) from the paged cache, gathered per token through the block table."""
    offs_d = tl.arange(0, HEAD_DIM)
    k_base = k_cache_ptr + kvh.to(tl.int64) * stride_ch + offs_d[None, :]
    v_head_off = kvh.to(tl.int64) * stride_vh
    full_end = ctx // BLOCK_N * BLOCK_N
    for n0 in range(0, full_end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        blk = tl.load(bt_row + pos // PAGE).to(tl.int64)
        row = (blk * stride_cb + (pos % PAGE).to(tl.int64) * stride_co)[:, None]
        k = tl.load(k_base + row).to(q.dtype)
        v = load_v_rows(v_cache_ptr, blk, pos, v_head_off, None, stride_vb, stride_vo,
                        HEAD_DIM, PAGE, V_RUN, q.dtype, V_TOKEN_MINOR, False)
        m_i, l_i, acc = _softmax_step(q, k, v, qk_scale, m_i, l_i, acc, None, v_scale,
                                      MASKED=False, SCALE_V=FP8)
    if full_end < ctx:
        pos = full_end + tl.arange(0, BLOCK_N)
        nmask = pos < ctx
        blk = tl.load(bt_row + pos // PAGE, mask=nmask, other=0).to(tl.int64)
        row = (blk * stride_cb + (pos % PAGE).to(tl.int64) * stride_co)[:, None]
        k = tl.load(k_base + row, mask=nmask[:, None], other=0.0).to(q.dtype)
        v = load_v_rows(v_cache_ptr, blk, pos, v_head_off, nmask, stride_vb, stride_vo,
                        HEAD_DIM, PAGE, V_RUN, q.dtype, V_TOKEN_MINOR, True)
        m_i, l_i, acc = _softmax_step(q, k, v, qk_scale, m_i, l_i, acc, nmask[None, :],
                                      v_scale, MASKED=True, SCALE_V=FP8)
    return m_i, l_i, acc


@triton.jit
def _load_kv(k_ptr, v_ptr, rows, row0, stride_kt, stride_vt, stride_kh, stride_vh, kvh, mask,
             HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr, MASKED: tl.constexpr):
    """One [BLOCK_N, D] tile of the contiguous K and V at token rows `rows` (= row0 + arange)."""
    if USE_TMA:   # k_ptr, v_ptr are descriptors over [num_tokens, cols]; OOB rows read 0
        k = k_ptr.load([row0, kvh * stride_kh])
        v = v_ptr.load([row0, kvh * stride_vh])
    else:
        offs_d = tl.arange(0, HEAD_DIM)[None, :]
        r = rows.to(tl.int64)[:, None]
        kp = k_ptr + r * stride_kt + kvh * stride_kh + offs_d
        vp = v_ptr + r * stride_vt + kvh * stride_vh + offs_d
        if MASKED:
            k = tl.load(kp, mask=mask[:, None], other=0.0)
            v = tl.load(vp, mask=mask[:, None], other=0.0)
        else:
            k = tl.load(kp)
            v = tl.load(vp)
    return k, v


@triton.jit
def _as_stored(x, scale):
    """A 16-bit K/V tile -> the e4m3 values write_kv would store (float32, on the e4m3 grid:
    IEEE division as write_kv does, saturation at FP8_MAX = 448)."""
    y = x.to(tl.float32)
    return quantize_e4m3(y, tl.broadcast_to(scale, y.shape), 448.0)


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, out_ptr, query_start_loc_ptr, seq_lens_ptr,
    block_tables_ptr, k_scale_ptr, v_scale_ptr,
    sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_cb, stride_co, stride_ch,
    stride_cvb, stride_cvo, stride_cvh,    # v_cache (may be token-minor)
    stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP8: tl.constexpr, QUANT_NEW: tl.constexpr,
    USE_TMA: tl.constexpr, V_TOKEN_MINOR: tl.constexpr = False, V_RUN: tl.constexpr = 1,
):
    mtile = tl.num_programs(0) - 1 - tl.program_id(0)   # heaviest causal tiles first
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if mtile * BLOCK_M >= q_len:
        return
    ctx = tl.load(seq_lens_ptr + seq) - q_len            # cached prefix length
    kvh = head // GROUP

    offs_m = mtile * BLOCK_M + tl.arange(0, BLOCK_M)     # index among the new tokens
    offs_d = tl.arange(0, HEAD_DIM)
    mmask = offs_m < q_len
    tok = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=mmask[:, None], other=0.0)          # [BLOCK_M, D]
    qk_scale = sm_scale * 1.4426950408889634             # scores in log2 units
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    k_sc = 1.0
    v_sc = 1.0
    if FP8:
        k_sc = tl.load(k_scale_ptr + kvh)
        v_sc = tl.load(v_scale_ptr + kvh)
    if ctx > 0:
        bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
        m_i, l_i, acc = _prefix_loop(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, bt_row, kvh,
                                     ctx, qk_scale * k_sc, v_sc, stride_cb, stride_co,
                                     stride_ch, stride_cvb, stride_cvo, stride_cvh, HEAD_DIM,
                                     PAGE, BLOCK_N, FP8, V_TOKEN_MINOR, V_RUN)

    # new tokens (QUANT_NEW: as stored, so their scales apply as to the prefix)
    new_qk_scale = qk_scale * k_sc if QUANT_NEW else qk_scale
    # new tokens before the query tile: every query of the tile sees them
    full_end = mtile * BLOCK_M // BLOCK_N * BLOCK_N
    for n0 in range(0, full_end, BLOCK_N):
        rows = q_start + n0 + tl.arange(0, BLOCK_N)
        k, v = _load_kv(k_ptr, v_ptr, rows, q_start + n0, stride_kt, stride_vt, stride_kh,
                        stride_vh, kvh, None, HEAD_DIM, USE_TMA, False)
        if QUANT_NEW:
            k, v = _as_stored(k, k_sc).to(q.dtype), _as_stored(v, v_sc).to(q.dtype)
        m_i, l_i, acc = _softmax_step(q, k, v, new_qk_scale, m_i, l_i, acc, None, v_sc,
                                      MASKED=False, SCALE_V=QUANT_NEW)
    # the diagonal: key j <= query i (indices among the new tokens), j < q_len
    diag_end = tl.minimum((mtile + 1) * BLOCK_M, q_len)
    for n0 in range(full_end, diag_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < q_len
        k, v = _load_kv(k_ptr, v_ptr, q_start + offs_n, q_start + n0, stride_kt, stride_vt,
                        stride_kh, stride_vh, kvh, nmask, HEAD_DIM, USE_TMA, True)
        if QUANT_NEW:
            k, v = _as_stored(k, k_sc).to(q.dtype), _as_stored(v, v_sc).to(q.dtype)
        mask = (offs_n[None, :] <= offs_m[:, None]) & nmask[None, :]
        m_i, l_i, acc = _softmax_step(q, k, v, new_qk_scale, m_i, l_i, acc, mask, v_sc,
                                      MASKED=True, SCALE_V=QUANT_NEW)

    # every row saw at least one key (key 0 of the prefix, or new token full_end <= its index)
    o = acc / l_i[:, None]
    tl.store(out_ptr + tok[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=mmask[:, None])


def _check_new_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor) -> None:
    for name, t in (("k", k), ("v", v)):
        check_dim(name, t, 3, "[num_tokens, num_kv_heads, head_dim]")
        check_last_contiguous(name, t)
        check(t.dtype == q.dtype, lambda: f"{name} is {t.dtype} but q is {q.dtype}; the new "
              "tokens' K/V must be in q's dtype (unquantized)")
        check(tuple(t.shape) == (q.shape[0],) + tuple(k_cache.shape[2:]),
              lambda: f"{name} must be [num_tokens={q.shape[0]}, num_kv_heads={k_cache.shape[2]}, "
              f"head_dim={k_cache.shape[3]}], got {tuple(t.shape)}")


def _tma_ok(t: torch.Tensor) -> bool:
    return (t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0
            and (t.stride(1) * t.element_size()) % 16 == 0)


def _descriptor(t: torch.Tensor, block_n: int):
    """[num_tokens, Hkv, D] strided view -> a 2-D descriptor over [num_tokens, cols]: a tile is
    BLOCK_N token rows of one head (column offset kvh * stride(1))."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    cols = (t.shape[1] - 1) * t.stride(1) + t.shape[2]
    return TensorDescriptor(t, [t.shape[0], cols], [t.stride(0), 1], [block_n, t.shape[2]])


def paged_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            k_cache: torch.Tensor, v_cache: torch.Tensor,
                            query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                            block_tables: torch.Tensor, scale: float,
                            k_scale: torch.Tensor | None = None,
                            v_scale: torch.Tensor | None = None,
                            max_query_len: int | None = None,
                            out: torch.Tensor | None = None,
                            quantize_new_kv: bool = True) -> torch.Tensor:
    """Varlen prefill/extend attention, new K/V contiguous, prefix paged (Triton
    `prefill_attention_ref`).

    q:               [num_tokens, num_q_heads, head_dim] fp16/bf16, last dim contiguous
    k, v:            [num_tokens, num_kv_heads, head_dim] in q's dtype: the new tokens' K/V
                     (k rotated), last dim contiguous, any token/head strides
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], q's dtype or FP8
                     e4m3; only each sequence's first seq_len - q_len tokens are read
    query_start_loc: int32 [num_seqs + 1]; seq_lens: int32 [num_seqs] (including new tokens);
    block_tables:    int32 [num_seqs, max_blocks_per_seq]
    k_scale, v_scale: float32 [num_kv_heads], required for (and only for) an FP8 cache
    max_query_len:   host bound on the longest q_len; sizes the grid (default num_tokens).
    out:             optional preallocated output, q's shape and dtype.
    quantize_new_kv: FP8 cache only: the new tokens see their K/V as the cache stores them
                     (default; equals paged_extend_attention) or unquantized (False).
    Sequences with q_len 0 are skipped. No host sync.
    """
    fp8 = check_attention_args(q, "[num_tokens, num_q_heads, head_dim]", k_cache, v_cache,
                               k_scale, v_scale)
    _check_new_kv(q, k, v, k_cache)
    num_tokens, num_q_heads, head_dim = q.shape
    _, page, num_kv_heads, _ = k_cache.shape
    num_seqs = check_query_start_loc(query_start_loc)
    check_seq_metadata(seq_lens, block_tables, num_seqs)
    if out is None:
        out = torch.empty_like(q)
    check_out_like(out, q)
    check_device("q", q, k=k, v=v, k_cache=k_cache, v_cache=v_cache,
                 query_start_loc=query_start_loc, seq_lens=seq_lens, block_tables=block_tables,
                 k_scale=k_scale, v_scale=v_scale, out=out)
    if max_query_len is None:
        max_query_len = num_tokens
    check(max_query_len >= 0, lambda: f"max_query_len must be >= 0, got {max_query_len}")
    if num_seqs == 0 or num_tokens == 0 or max_query_len == 0:
        return out
    kd, vd = k, v
    use_tma = USE_TMA and _tma_ok(k) and _tma_ok(v)      # else the pointer path
    if use_tma:
        kd, vd = _descriptor(k, BLOCK_N), _descriptor(v, BLOCK_N)
    grid = (triton.cdiv(max_query_len, BLOCK_M), num_q_heads, num_seqs)
    _prefill_kernel[grid](
        q, kd, vd, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables,
        k_scale if fp8 else q, v_scale if fp8 else q,
        scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim, PAGE=page,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, FP8=fp8, QUANT_NEW=fp8 and quantize_new_kv,
        USE_TMA=use_tma, V_TOKEN_MINOR=v_token_minor(v_cache), V_RUN=min(page, BLOCK_N),
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return out
