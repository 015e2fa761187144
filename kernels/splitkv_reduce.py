"""Merge of split-KV partial attention outputs (second stage of split-KV decode).

Each split s of a (seq, head) row left o_s = softmax-normalized output over its chunk and
lse_s = log2(sum over the chunk of 2^(scaled score)). The full output is
    sum_s w_s * o_s / sum_s w_s,   w_s = 2^(lse_s - max_s lse_s);
empty splits carry lse = -inf and weigh nothing; a row with no keys at all gets zeros.
Tested through `paged_decode_attention` against `reference.decode_attention_ref`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import next_pow2

SPLIT_TILE = 16   # splits merged per loop step (bounds registers for long split lists)


@triton.jit
def _splitkv_reduce_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, v_scale_ptr,
    stride_ob, stride_oh, num_heads, num_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
    SPLIT_TILE: tl.constexpr, FP8: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row = seq.to(tl.int64) * num_heads + head            # (seq, head) row of the scratch
    offs_s = tl.arange(0, BLOCK_S)
    lse = tl.load(part_lse_ptr + row * num_splits + offs_s, mask=offs_s < num_splits,
                  other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)             # all empty: weights are all 0
    denom = tl.sum(tl.exp2(lse - m), 0)

    offs_t = tl.arange(0, SPLIT_TILE)
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for s0 in range(0, num_splits, SPLIT_TILE):
        sm = (s0 + offs_t) < num_splits
        w = tl.exp2(tl.load(part_lse_ptr + row * num_splits + s0 + offs_t, mask=sm,
                            other=float("-inf")) - m)
        o = tl.load(part_out_ptr + (row * num_splits + s0 + offs_t)[:, None] * HEAD_DIM
                    + offs_d[None, :], mask=sm[:, None], other=0.0)
        acc += tl.sum(w[:, None] * o, 0)
    o = acc / tl.where(denom > 0.0, denom, 1.0)
    if FP8:
        o = o * tl.load(v_scale_ptr + head // GROUP)
    tl.store(out_ptr + seq.to(tl.int64) * stride_ob + head * stride_oh + offs_d,
             o.to(out_ptr.dtype.element_ty))


def splitkv_reduce(part_out: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor,
                   group: int, v_scale: torch.Tensor | None) -> None:
    """out[b, h] = merge of part_out[b, h, :] by part_lse[b, h, :] (times v_scale[h // group]).

    part_out: float32 [num_seqs, num_q_heads, num_splits, head_dim] contiguous
    part_lse: float32 [num_seqs, num_q_heads, num_splits] contiguous
    out:      [num_seqs, num_q_heads, head_dim], last dim contiguous. Internal to decode: the
    caller (`paged_decode_attention`) has validated every shape.
    """
    num_seqs, num_heads, num_splits, head_dim = part_out.shape
    _splitkv_reduce_kernel[(num_seqs, num_heads)](
        part_out, part_lse, out, v_scale if v_scale is not None else part_lse,
        out.stride(0), out.stride(1), num_heads, num_splits,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_S=max(2, next_pow2(num_splits)),
        SPLIT_TILE=SPLIT_TILE, FP8=v_scale is not None, num_warps=4,
    )
