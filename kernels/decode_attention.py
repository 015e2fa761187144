"""Paged decode attention: one new query token per sequence over its paged KV cache.

Reference: `reference.decode_attention_ref` (= `paged_attention_ref` with one token per seq).

Work split. One program per (sequence, group of HPP kv heads, KV split). GQA: the `group`
query heads that share a kv head are rows of one [BLOCK_H, head_dim] tile, so each K/V tile is
read from memory once and feeds a tensor-core dot for the whole group. With HPP > 1 the rows
are the query heads of HPP kv heads (HPP * group rows: with group 4 and HPP 4 the 16-row MMA
tile carries no padding) and a key tile holds BLOCK_N tokens x HPP heads, token-major, so a
token's HPP head rows -- adjacent in the cache -- are read together as one longer run; a row
only sees the columns of its own kv head (the others are masked to -inf before the softmax),
so the tensor-core work per useful score is the same as with padded rows (measured: FP8 B=8 x
4k 33.3 vs 40.3 us, equal at B=64; FP8 uses two, except at batch 1 via BATCH_TILES). With
token-minor V pages (FP8 caches, `_vpage.py`) the columns are head-major instead, so a page's
tokens of one head are adjacent. Whole tiles run unmasked; only each split's ragged last tile
is masked (a select on V between load and MMA forced V back through registers: 259 vs 189 us,
FP8 B=64 x 4k). The tile shapes, kv heads per program and split counts are chosen per launch by
`decode_plan.py` (tuned constants, shapes only).

Split-KV: a long context is cut into `num_splits` chunks processed by separate programs, which
write a normalized partial output and its log-sum-exp (base 2) to scratch. The merge runs in
the same launch when the scratch has counters and there are at most FUSED_MERGE_MAX_SPLITS
splits: each split program bumps its (sequence, head group)'s counter (a CTA barrier, then an
acq_rel atomic by one thread, which publishes the whole program's stores); the last one loads
all splits' partials at once (L2 reads) and writes the output, then re-arms the counter (a
relaxed atomic: nothing in the launch reads it again).
Otherwise `splitkv_reduce` merges them in a second launch. (A first in-launch merge that walked
the splits one load at a time was slower than the second launch: 20.4 vs 14.8 us at B=1,
L=4096; the vectorized one is faster: 12.7 vs 13.1 us.) `num_splits` is chosen on the host
from shapes alone (batch, kv heads, SM count, the block table's width), and each sequence's
chunk length is computed on the GPU from its own seq_len, so the launch never reads tensor
values: no host sync, capturable in a CUDA graph. With one split the kernel writes the final
output directly.

Batch-1 PDL launches (KV_PREFETCH_MAX_SEQS) read seq_len and the block table before waiting
for the previous kernel and issue an L2 prefetch of their split's first K/V tile, so those
lines stream in during the QKV kernel's tail; q and every K/V load still come after the wait
(a prefetch never makes a stale value visible: L2 is where the new token's stores land).

FP8 (e4m3) caches are converted in registers (to fp16 by default: one hardware conversion per
pair on sm_89+, exact, and q's bf16 -> fp16 is exact in range); the K scale is folded into the
softmax scale and the V scale is applied once to the output row. Addressing is int64
(block id * block stride).
A sequence of length 0 (graph padding) produces a zero output row, not NaN.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import (check, check_attention_args, check_device, check_out_like,
                      check_seq_metadata, interpreting, next_pow2, v_token_minor)
from ._pdl import launch_kwargs, pdl_trigger, pdl_wait
from ._vpage import load_v_rows
from . import decode_plan as plan
from .splitkv_reduce import splitkv_reduce

@triton.jit
def _merge_splits(part_out_ptr, part_lse_ptr, out_ptr, v_scale_ptr, seq, kvh0, num_q_heads,
                  num_splits, stride_ob, stride_oh, GROUP: tl.constexpr, HPP: tl.constexpr,
                  HEAD_DIM: tl.constexpr, MERGE_ROWS: tl.constexpr, MERGE_S: tl.constexpr,
                  FP8: tl.constexpr):
    """Split merge of one program's query heads, all splits in one load (as splitkv_reduce)."""
    r = tl.arange(0, MERGE_ROWS)
    sp = tl.arange(0, MERGE_S)
    d = tl.arange(0, HEAD_DIM)
    rmask = r < GROUP * HPP
    heads = kvh0 * GROUP + r
    rows = (seq.to(tl.int64) * num_q_heads + heads) * num_splits            # [R]
    m2 = rmask[:, None] & (sp < num_splits)[None, :]
    lse = tl.load(part_lse_ptr + rows[:, None] + sp[None, :], mask=m2, other=float("-inf"),
                  cache_modifier=".cg")                                     # [R, S]
    po = tl.load(part_out_ptr + (rows[:, None, None] + sp[None, :, None]) * HEAD_DIM
                 + d[None, None, :], mask=m2[:, :, None], other=0.0,
                 cache_modifier=".cg")                                      # [R, S, D]
    m = tl.max(lse, 1)
    m = tl.where(m == float("-inf"), 0.0, m)                                # all splits empty
    w = tl.exp2(lse - m[:, None])
    den = tl.sum(w, 1)
    o = tl.sum(w[:, :, None] * po, 1) / tl.where(den > 0.0, den, 1.0)[:, None]
    if FP8:
        o = o * tl.load(v_scale_ptr + kvh0 + tl.minimum(r // GROUP, HPP - 1))[:, None]
    tl.store(out_ptr + seq.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _prefetch_l2(ptrs):
    """prefetch.global.L2 of each address: no registers filled, never faults. L2 is the GPU's
    point of coherence, so a line prefetched before its writer's store still reads new after."""
    return tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                                     dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_split(start, end, col_tok, col_kvh, bt_row, k_cache_ptr, v_cache_ptr, stride_kb,
                    stride_ko, stride_kh, stride_vb, stride_vo, stride_vh,
                    HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, LINE: tl.constexpr,
                    V_TOKEN_MINOR: tl.constexpr):
    """One L2 prefetch per 128-byte line (LINE elements) of the K and V rows of this split's
    first tile (all of it prefetched measured slower at long contexts: L2 churn)."""
    lines = tl.arange(0, HEAD_DIM // LINE) * LINE
    pos = start + col_tok
    blk = tl.load(bt_row + pos // PAGE, mask=pos < end, other=0).to(tl.int64)
    in_page = (pos % PAGE).to(tl.int64)
    _prefetch_l2(k_cache_ptr + (blk * stride_kb + in_page * stride_ko
                                + col_kvh.to(tl.int64) * stride_kh)[:, None] + lines[None, :])
    head_v = col_kvh.to(tl.int64) * stride_vh
    if V_TOKEN_MINOR:   # a page's bytes of one head are [HEAD_DIM, PAGE]: a line per token
        _prefetch_l2(v_cache_ptr + blk * stride_vb + head_v
                     + tl.minimum(in_page * LINE, HEAD_DIM * PAGE - 1))
    else:
        _prefetch_l2(v_cache_ptr + (blk * stride_vb + in_page * stride_vo + head_v)[:, None]
                     + lines[None, :])


@triton.jit
def _tile(q, m_i, l_i, acc, n0, end, col_tok, col_off, v_head_off, same_head, bt_row,
          k_cache_ptr, v_cache_ptr, qk_scale_log2, stride_kb, stride_ko, stride_vb, stride_vo,
          HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, V_RUN: tl.constexpr, HPP: tl.constexpr,
          V_TOKEN_MINOR: tl.constexpr, MASKED: tl.constexpr):
    """One online-softmax step over the tile of columns at n0 + col_tok (MASKED: some may be
    at or past `end`)."""
    pos = n0 + col_tok
    nmask = pos < end
    if MASKED:
        blk = tl.load(bt_row + pos // PAGE, mask=nmask, other=0).to(tl.int64)
    else:
        blk = tl.load(bt_row + pos // PAGE).to(tl.int64)
    k_ptrs = k_cache_ptr + blk[:, None] * stride_kb \
        + (pos % PAGE).to(tl.int64)[:, None] * stride_ko + col_off
    if MASKED:
        k = tl.load(k_ptrs, mask=nmask[:, None], other=0.0)   # [BLOCK_N * HPP, D]
    else:
        k = tl.load(k_ptrs)
    v = load_v_rows(v_cache_ptr, blk, pos, v_head_off, nmask, stride_vb, stride_vo,
                    HEAD_DIM, PAGE, V_RUN, q.dtype, V_TOKEN_MINOR, MASKED)
    s = tl.dot(q, tl.trans(k.to(q.dtype))) * qk_scale_log2[:, None]
    if MASKED:
        s = tl.where(same_head & nmask[None, :], s, float("-inf"))
    elif HPP > 1:
        s = tl.where(same_head, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, k_scale_ptr, v_scale_ptr,
    out_ptr, part_out_ptr, part_lse_ptr, counters_ptr,
    sm_scale,
    stride_qb, stride_qh,
    stride_kb, stride_ko, stride_kh,
    stride_vb, stride_vo, stride_vh,
    stride_bt, stride_ob, stride_oh,
    num_splits, num_q_heads,
    GROUP: tl.constexpr, HPP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, MIN_CHUNK: tl.constexpr,
    FP8: tl.constexpr, FP16_COMPUTE: tl.constexpr, DIRECT_OUT: tl.constexpr,
    V_TOKEN_MINOR: tl.constexpr = False, V_RUN: tl.constexpr = 1, PDL: tl.constexpr = 0,
    FUSED_MERGE: tl.constexpr = False,
    MERGE_ROWS: tl.constexpr = 4, MERGE_S: tl.constexpr = 16, PREFETCH_LINE: tl.constexpr = 0,
):
    if not PREFETCH_LINE:
        pdl_wait(PDL)
    seq = tl.program_id(0)
    kvh0 = tl.program_id(1) * HPP                           # first kv head of this program
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    # this sequence's chunk per split: a multiple of BLOCK_N, at least MIN_CHUNK
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    chunk = tl.maximum(chunk, MIN_CHUNK)
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    # columns: BLOCK_N tokens x HPP kv heads, token-major, so one token's HPP head rows
    # (adjacent in the cache) are adjacent in the tile; head-major for token-minor V pages,
    # so a page's tokens of one head are adjacent
    offs_c = tl.arange(0, BLOCK_N * HPP)
    if V_TOKEN_MINOR:
        col_tok = offs_c % BLOCK_N
        col_kvh = kvh0 + offs_c // BLOCK_N
    else:
        col_tok = offs_c // HPP
        col_kvh = kvh0 + offs_c % HPP
    v_head_off = col_kvh.to(tl.int64) * stride_vh
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    if PREFETCH_LINE:
        # PDL launches: seq_lens and block tables come from before the previous kernel (see
        # KV_PREFETCH_MAX_SEQS), so this split's first K/V lines stream into L2 while that
        # kernel finishes
        _prefetch_split(start, end, col_tok, col_kvh, bt_row, k_cache_ptr, v_cache_ptr, stride_kb,
                        stride_ko, stride_kh, stride_vb, stride_vo, stride_vh, HEAD_DIM, PAGE,
                        PREFETCH_LINE, V_TOKEN_MINOR)
        pdl_wait(PDL)                                       # before q and the new token's K/V
    # rows: the HPP * GROUP query heads of kv heads kvh0 .. kvh0 + HPP - 1, in head order
    offs_r = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    heads = kvh0 * GROUP + offs_r
    hmask = offs_r < GROUP * HPP
    row_kvh = kvh0 + tl.minimum(offs_r // GROUP, HPP - 1)   # each row's kv head
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh
                + offs_d[None, :], mask=hmask[:, None], other=0.0)   # [BLOCK_H, D]
    # scores in log2 units: s = (q . k_stored) * qk_scale_log2 (per row: its kv head's scale)
    qk_scale_log2 = tl.full([BLOCK_H], sm_scale * 1.4426950408889634, tl.float32)
    if FP8:
        qk_scale_log2 = qk_scale_log2 * tl.load(k_scale_ptr + row_kvh)
        if FP16_COMPUTE:
            # bf16 -> fp16 is exact within fp16's range (8 mantissa bits into 11): the
            # scale is not folded into q, whose rounding would cost accuracy
            q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
    same_head = row_kvh[:, None] == col_kvh[None, :]        # [BLOCK_H, BLOCK_N * HPP]
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    col_off = col_kvh.to(tl.int64)[:, None] * stride_kh + offs_d[None, :]
    # whole tiles without masks (so the FP8 -> compute-dtype conversion of V stays next to
    # the MMA and V streams straight from shared memory), then the ragged last tile masked
    full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N
    for n0 in range(start, full_end, BLOCK_N):
        m_i, l_i, acc = _tile(q, m_i, l_i, acc, n0, end, col_tok, col_off, v_head_off, same_head,
                              bt_row, k_cache_ptr, v_cache_ptr, qk_scale_log2, stride_kb,
                              stride_ko, stride_vb, stride_vo, HEAD_DIM, PAGE, V_RUN, HPP,
                              V_TOKEN_MINOR, False)
    if full_end < end:
        m_i, l_i, acc = _tile(q, m_i, l_i, acc, full_end, end, col_tok, col_off, v_head_off,
                              same_head, bt_row, k_cache_ptr, v_cache_ptr, qk_scale_log2,
                              stride_kb, stride_ko, stride_vb, stride_vo, HEAD_DIM, PAGE, V_RUN,
                              HPP, V_TOKEN_MINOR, True)
    pdl_trigger(PDL)

    has = l_i > 0.0                                         # false: empty split or seq_len 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    out_ptrs = out_ptr + seq.to(tl.int64) * stride_ob + heads[:, None] * stride_oh \
        + offs_d[None, :]
    if DIRECT_OUT:
        if FP8:
            o = o * tl.load(v_scale_ptr + row_kvh)[:, None]
        tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=hmask[:, None])
    else:
        # scratch: part_out [num_seqs, num_q_heads, num_splits, D], part_lse [.., num_splits]
        rows = (seq.to(tl.int64) * num_q_heads + heads) * num_splits
        tl.store(part_out_ptr + (rows + split)[:, None] * HEAD_DIM + offs_d[None, :], o,
                 mask=hmask[:, None])
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + rows + split, lse, mask=hmask)
        if FUSED_MERGE:
            # the last split of this (seq, head group) to finish merges all of them: every
            # thread's stores precede the barrier, the acq_rel atomic publishes them (and,
            # in the last program, makes the others' visible); it re-arms the counter.
            # (Letting the splits past a short sequence's end skip the stores and the count
            # measured the same: bench/results/engine-2026-11-30-s12.md, section 8.)
            tl.debug_barrier()
            counter = counters_ptr + seq * tl.num_programs(1) + tl.program_id(1)
            if tl.atomic_add(counter, 1, sem="acq_rel") == num_splits - 1:
                _merge_splits(part_out_ptr, part_lse_ptr, out_ptr, v_scale_ptr,
                              seq, kvh0, num_q_heads, num_splits, stride_ob, stride_oh,
                              GROUP, HPP, HEAD_DIM, MERGE_ROWS, MERGE_S, FP8)
                # re-arm without a fence: no program reads the counter again in this launch,
                # and the next launch sees it after the kernel boundary (acq_rel put a
                # MEMBAR.ALL.GPU before the merging program's exit: B=1 x 4k 10.54 -> 10.23
                # us, bench/results/kernels.md, session 19)
                tl.atomic_xchg(counter, 0, sem="relaxed")


class SplitKVScratch(NamedTuple):
    """Float32 scratch for split-KV decode; preallocate it to keep a captured graph's pool flat.

    Every call overwrites all of it (the counters return to zero), so one scratch serves any
    number of sequential calls (not two at once on different streams). Without counters the
    splits are always merged by the separate `splitkv_reduce` launch.
    """
    part_out: torch.Tensor   # [num_seqs, num_q_heads, num_splits, head_dim]
    part_lse: torch.Tensor   # [num_seqs, num_q_heads, num_splits], log2-sum-exp of each split
    counters: torch.Tensor | None = None   # int32 [num_seqs * num_q_heads], zeros: the fused
    #                                        merge's finished-split counts, left at zero


def alloc_split_kv_scratch(num_seqs: int, num_q_heads: int, head_dim: int, num_splits: int,
                           device: torch.device) -> SplitKVScratch:
    return SplitKVScratch(
        torch.empty(num_seqs, num_q_heads, num_splits, head_dim, dtype=torch.float32,
                    device=device),
        torch.empty(num_seqs, num_q_heads, num_splits, dtype=torch.float32, device=device),
        torch.zeros(num_seqs * num_q_heads, dtype=torch.int32, device=device))


def _check_decode_args(q, k_cache, v_cache, block_tables, seq_lens, k_scale, v_scale,
                       out) -> bool:
    fp8 = check_attention_args(q, "[num_seqs, num_q_heads, head_dim]", k_cache, v_cache,
                               k_scale, v_scale)
    num_seqs = q.shape[0]
    check_seq_metadata(seq_lens, block_tables, num_seqs)
    if out is not None:
        check_out_like(out, q)
    check_device("q", q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                 seq_lens=seq_lens, k_scale=k_scale, v_scale=v_scale, out=out)
    return fp8


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           k_scale: torch.Tensor | None = None,
                           v_scale: torch.Tensor | None = None,
                           out: torch.Tensor | None = None, num_splits: int | None = None,
                           scratch: SplitKVScratch | None = None) -> torch.Tensor:
    """Decode attention of one new token per sequence over the paged cache.

    q:            [num_seqs, num_q_heads, head_dim] fp16/bf16 (last dim contiguous)
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], q's dtype or FP8 e4m3
    block_tables: int32 [num_seqs, max_blocks_per_seq]; seq_lens: int32 [num_seqs], the
                  context length *including* the new token (its K/V already written)
    scale:        softmax scale (usually head_dim ** -0.5)
    k_scale, v_scale: float32 [num_kv_heads], required for (and only for) an FP8 cache
    out:          optional preallocated [num_seqs, num_q_heads, head_dim] in q's dtype
    num_splits:   override the split-KV count (default: `decode_plan.plan_decode_splits`)
    scratch:      optional preallocated `SplitKVScratch` for exactly num_splits splits
    Returns out. No host sync and no value-dependent allocation: capturable in a CUDA graph.
    """
    fp8 = _check_decode_args(q, k_cache, v_cache, block_tables, seq_lens, k_scale, v_scale, out)
    num_seqs, num_q_heads, head_dim = q.shape
    _, page, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    if num_splits is None:
        num_splits = plan.plan_decode_splits(num_seqs, num_kv_heads, block_tables.shape[1] * page,
                                        q.device, fp8)
    check(num_splits >= 1, lambda: f"num_splits must be >= 1, got {num_splits}")
    direct = num_splits == 1
    if not direct:
        if scratch is None:
            scratch = alloc_split_kv_scratch(num_seqs, num_q_heads, head_dim, num_splits,
                                             q.device)
        _check_scratch(scratch, num_seqs, num_q_heads, head_dim, num_splits)
        part_out, part_lse, counters = scratch
    else:
        part_out = part_lse = counters = out          # unused when DIRECT_OUT
    tiles, hpp = plan.launch_shape(num_seqs, num_kv_heads, fp8)
    block_n, num_stages, num_warps = tiles[:3]
    regs = {} if len(tiles) < 4 or interpreting() else dict(maxnreg=tiles[3])  # register cap
    merge_rows, merge_s = max(2, next_pow2(group * hpp)), max(2, next_pow2(num_splits))
    pdl = launch_kwargs(q.device, num_seqs)
    prefetch = bool(pdl["PDL"]) and num_seqs <= plan.KV_PREFETCH_MAX_SEQS
    fused = (not direct and counters is not None and num_splits <= plan.merge_cap(fp8, hpp)
             and merge_rows * merge_s * head_dim <= plan.MERGE_MAX_ELEMENTS)
    _decode_kernel[(num_seqs, num_kv_heads // hpp, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, k_scale if fp8 else q,
        v_scale if fp8 else q, out, part_out, part_lse, counters,
        scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        num_splits, num_q_heads,
        GROUP=group, HPP=hpp, BLOCK_H=max(16, next_pow2(group * hpp)), HEAD_DIM=head_dim, PAGE=page,
        BLOCK_N=block_n, MIN_CHUNK=max(plan.MIN_CHUNK, block_n), FP8=fp8,
        FP16_COMPUTE=fp8 and plan.FP8_FP16_COMPUTE, DIRECT_OUT=direct,
        FUSED_MERGE=fused, MERGE_ROWS=merge_rows, MERGE_S=merge_s,
        V_TOKEN_MINOR=v_token_minor(v_cache), V_RUN=min(page, block_n),
        PREFETCH_LINE=min(128 // k_cache.element_size(), head_dim) if prefetch else 0,
        num_warps=num_warps, num_stages=num_stages, **regs, **pdl,
    )
    if not direct and not fused:
        splitkv_reduce(part_out, part_lse, out, group, v_scale if fp8 else None)
    return out


def _check_scratch(scratch: SplitKVScratch, num_seqs: int, num_q_heads: int, head_dim: int,
                   num_splits: int) -> None:
    want = (num_seqs, num_q_heads, num_splits, head_dim)
    ok = (tuple(scratch.part_out.shape) == want and scratch.part_out.is_contiguous()
          and tuple(scratch.part_lse.shape) == want[:3] and scratch.part_lse.is_contiguous()
          and scratch.part_out.dtype == scratch.part_lse.dtype == torch.float32)
    check(ok, lambda: f"scratch must be contiguous float32 part_out {want} and part_lse "
          f"{want[:3]} (see alloc_split_kv_scratch)")
    c = scratch.counters
    check(c is None or (c.dtype == torch.int32 and c.is_contiguous()
                        and c.numel() >= num_seqs * num_q_heads),
          lambda: f"scratch counters must be contiguous int32 with >= {num_seqs * num_q_heads} "
          "elements, zero-filled (see alloc_split_kv_scratch)")
