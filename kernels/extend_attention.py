"""Prefill / extend attention over the paged cache, varlen, in one launch.

Reference: `reference.paged_attention_ref`. The q_len_i new tokens of sequence i (their K/V
already written to the cache) attend fully to its seq_len_i - q_len_i cached tokens and
causally to themselves. Plain prefill is the case with no cached prefix; chunked prefill and
prefix-cache hits have one.

Work split. One program per (query tile of BLOCK_M new tokens, query head, sequence); tiles
past a sequence's q_len exit at once, so the grid can be sized from a bound on the longest
q_len (`max_query_len`) without reading seq lengths on the host. The key loop runs in two
phases: key tiles wholly before the tile's first query position need no mask; the last
ceil((BLOCK_M + BLOCK_N) / BLOCK_N) tiles apply the causal and length masks. Query tiles run
longest-first (reversed index) so the causal triangle's heavy tiles do not form the tail.
K/V rows are gathered through the block table per token (int64 addressing). FP8 caches are
converted in registers with the K scale folded into the softmax scale.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (check, check_attention_args, check_device, check_out_like,
                      check_query_start_loc, check_seq_metadata, v_token_minor)
from ._vpage import load_v_rows

# Tuning: H200, head_dim 128, swept by bench/kernels.py --tune (bench/results/kernels.md).
BLOCK_M = 64
BLOCK_N = 64
NUM_WARPS = 4
NUM_STAGES = 2
FP8_FP16_COMPUTE = True   # FP8 K/V -> fp16 (one cvt per pair on sm_89+) rather than bf16


@triton.jit
def _extend_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, query_start_loc_ptr, seq_lens_ptr,
    block_tables_ptr, k_scale_ptr, v_scale_ptr,
    sm_scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ko, stride_kh,
    stride_vb, stride_vo, stride_vh,
    stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP8: tl.constexpr,
    FP16_COMPUTE: tl.constexpr, V_TOKEN_MINOR: tl.constexpr = False, V_RUN: tl.constexpr = 1,
):
    mtile = tl.num_programs(0) - 1 - tl.program_id(0)   # heaviest causal tiles first
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if mtile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx = seq_len - q_len                                # cached prefix length
    kvh = head // GROUP

    offs_m = mtile * BLOCK_M + tl.arange(0, BLOCK_M)     # index among the new tokens
    offs_d = tl.arange(0, HEAD_DIM)
    mmask = offs_m < q_len
    q_pos = ctx + offs_m                                 # absolute positions of the queries
    tok = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=mmask[:, None], other=0.0)          # [BLOCK_M, D]
    # scores in log2 units: s = (q . k_stored) * qk_scale_log2
    qk_scale_log2 = sm_scale * 1.4426950408889634
    if FP8:
        qk_scale_log2 = qk_scale_log2 * tl.load(k_scale_ptr + kvh)
        if FP16_COMPUTE:
            # bf16 -> fp16 is exact within fp16's range (8 mantissa bits into 11): the
            # scale is not folded into q, whose rounding would cost accuracy
            q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_cache_ptr + kvh.to(tl.int64) * stride_kh + offs_d[None, :]
    v_head_off = kvh.to(tl.int64) * stride_vh

    # phase 1: keys [0, full_end) precede every query of the tile: no mask needed
    full_end = (ctx + mtile * BLOCK_M) // BLOCK_N * BLOCK_N
    for n0 in range(0, full_end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        blk = tl.load(bt_row + pos // PAGE).to(tl.int64)
        off = (pos % PAGE).to(tl.int64)
        k = tl.load(k_base + blk[:, None] * stride_kb + off[:, None] * stride_ko)
        v = load_v_rows(v_cache_ptr, blk, pos, v_head_off, None, stride_vb, stride_vo,
                        HEAD_DIM, PAGE, V_RUN, q.dtype, V_TOKEN_MINOR, False)
        s = tl.dot(q, tl.trans(k.to(q.dtype))) * qk_scale_log2      # [BLOCK_M, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v)
        m_i = m_new

    # phase 2: the diagonal: causal mask (key pos <= query pos) and the length mask
    diag_end = tl.minimum(ctx + (mtile + 1) * BLOCK_M, seq_len)
    for n0 in range(full_end, diag_end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        nmask = pos < seq_len
        blk = tl.load(bt_row + pos // PAGE, mask=nmask, other=0).to(tl.int64)
        off = (pos % PAGE).to(tl.int64)
        k = tl.load(k_base + blk[:, None] * stride_kb + off[:, None] * stride_ko,
                    mask=nmask[:, None], other=0.0)
        v = load_v_rows(v_cache_ptr, blk, pos, v_head_off, nmask, stride_vb, stride_vo,
                        HEAD_DIM, PAGE, V_RUN, q.dtype, V_TOKEN_MINOR, True)
        s = tl.dot(q, tl.trans(k.to(q.dtype))) * qk_scale_log2
        s = tl.where((pos[None, :] <= q_pos[:, None]) & nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v)
        m_i = m_new

    # every row saw key full_end (<= its position, < seq_len), so l_i > 0 for all rows
    o = acc / l_i[:, None]
    if FP8:
        o = o * tl.load(v_scale_ptr + kvh)
    tl.store(out_ptr + tok[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=mmask[:, None])


def paged_extend_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                           block_tables: torch.Tensor, scale: float,
                           k_scale: torch.Tensor | None = None,
                           v_scale: torch.Tensor | None = None,
                           max_query_len: int | None = None,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """Varlen prefill/extend attention over the paged cache (Triton `paged_attention_ref`).

    q:               [num_tokens, num_q_heads, head_dim] fp16/bf16, last dim contiguous
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], q's dtype or FP8 e4m3
                     (the new tokens' K/V already written, e.g. by `write_kv`)
    query_start_loc: int32 [num_seqs + 1]; seq_lens: int32 [num_seqs] (including new tokens);
    block_tables:    int32 [num_seqs, max_blocks_per_seq]
    k_scale, v_scale: float32 [num_kv_heads], required for (and only for) an FP8 cache
    max_query_len:   a host-side bound on the longest q_len; sizes the grid. Default
                     num_tokens (always safe; a tight bound saves empty programs).
    out:             optional preallocated output, q's shape and dtype.
    Sequences with q_len 0 are skipped. No host sync.
    """
    fp8 = check_attention_args(q, "[num_tokens, num_q_heads, head_dim]", k_cache, v_cache,
                               k_scale, v_scale)
    num_tokens, num_q_heads, head_dim = q.shape
    _, page, num_kv_heads, _ = k_cache.shape
    num_seqs = check_query_start_loc(query_start_loc)
    check_seq_metadata(seq_lens, block_tables, num_seqs)
    if out is None:
        out = torch.empty_like(q)
    check_out_like(out, q)
    check_device("q", q, k_cache=k_cache, v_cache=v_cache, query_start_loc=query_start_loc,
                 seq_lens=seq_lens, block_tables=block_tables, k_scale=k_scale,
                 v_scale=v_scale, out=out)
    if max_query_len is None:
        max_query_len = num_tokens
    check(max_query_len >= 0, lambda: f"max_query_len must be >= 0, got {max_query_len}")
    if num_seqs == 0 or num_tokens == 0 or max_query_len == 0:
        return out
    grid = (triton.cdiv(max_query_len, BLOCK_M), num_q_heads, num_seqs)
    _extend_kernel[grid](
        q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables,
        k_scale if fp8 else q, v_scale if fp8 else q,
        scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim, PAGE=page,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, FP8=fp8, FP16_COMPUTE=fp8 and FP8_FP16_COMPUTE,
        V_TOKEN_MINOR=v_token_minor(v_cache), V_RUN=min(page, BLOCK_N),
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return out
