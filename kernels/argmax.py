"""Greedy sampling's argmax over the vocabulary, split across programs.

Reference: `torch.argmax(logits, dim=-1)` (the first index of the maximum). torch reduces one
row per thread block: at batch 1 its kernel read 128k float32 logits in 28.6 us on the H200
(bench/step_trace.py; bench/results/engine-b1-2026-11-29-s10.md: the step's largest kernel after
the weights and attention), where the bytes take well under a microsecond. Here each row is cut into `splits`
chunks, one program each (stage 1: the chunk's maximum and its first index), then one program
per row picks the first chunk holding the row's maximum (stage 2). Two small launches, no host
sync: capturable in a CUDA graph. Past SPLIT_MAX_ROWS rows torch's one-block-per-row kernel
is already spread over the GPU and faster (H200, vocab 128256, in a CUDA graph: torch 27.2 /
33.1 / 39.7 / 40.6 / 49.1 us at 1 / 8 / 32 / 128 / 256 rows, this 3.8 / 5.0 / 18.2 / 58.6 /
113.3 us; bench/argmax_bench.py), so `argmax_rows` hands those batches to torch.

Ordering: values compare as their float32 bits mapped to ordered integers, so the result is
torch's for every finite value and +-inf; a NaN (positive, as GPUs produce) ranks above +inf,
as torch's argmax also returns a NaN's index. Ties go to the smallest index, like torch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check, check_device, check_dim

BLOCK = 1024
TARGET_PROGRAMS = 256      # stage 1 programs per launch (rows x splits), ~2 per H200 SM
MAX_SPLITS = 64
SPLIT_MAX_ROWS = 32        # more rows: torch.argmax (measured faster there)


@triton.jit
def _ordered(x):
    """float32 -> int32 with the same order (negative values have their magnitude bits flipped)."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _argmax_chunks(x_ptr, key_ptr, idx_ptr, stride_x, n_cols, chunk, splits,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    lo = s * chunk
    best_key = tl.full([BLOCK], -2147483648, tl.int32)
    best_idx = tl.full([BLOCK], 2147483647, tl.int32)
    for c0 in range(lo, tl.minimum(lo + chunk, n_cols), BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + cols, mask=cols < n_cols, other=float("-inf"))
        key = tl.where(cols < n_cols, _ordered(x.to(tl.float32)), -2147483648)
        better = key > best_key               # strictly: an equal later value keeps the first
        best_idx = tl.where(better, cols, best_idx)
        best_key = tl.where(better, key, best_key)
    k = tl.max(best_key, axis=0)
    i = tl.min(tl.where(best_key == k, best_idx, 2147483647), axis=0)
    tl.store(key_ptr + row * splits + s, k)
    tl.store(idx_ptr + row * splits + s, i)


@triton.jit
def _argmax_pick(key_ptr, idx_ptr, out_ptr, splits, SPLITS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, SPLITS)
    key = tl.load(key_ptr + row * splits + offs, mask=offs < splits, other=-2147483648)
    idx = tl.load(idx_ptr + row * splits + offs, mask=offs < splits, other=2147483647)
    k = tl.max(key, axis=0)
    tl.store(out_ptr + row, tl.min(tl.where(key == k, idx, 2147483647), axis=0).to(tl.int64))


def plan_splits(rows: int, n_cols: int) -> int:
    """Chunks per row: enough programs to spread the read, each at least one BLOCK."""
    return max(1, min(MAX_SPLITS, triton.cdiv(TARGET_PROGRAMS, max(rows, 1)), triton.cdiv(n_cols, BLOCK)))


def argmax_rows(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """torch.argmax(logits, dim=-1) for logits [rows, n] (float32/bf16/fp16, last dim
    contiguous, n < 2^31) -> int64 [rows]."""
    check_dim("logits", logits, 2, "[rows, vocab]")
    check(logits.dtype in (torch.float32, torch.bfloat16, torch.float16),
          lambda: f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    check(logits.stride(1) == 1 or logits.shape[1] <= 1, lambda: "logits' last dim must be contiguous")
    rows, n = logits.shape
    check(0 < n < 2 ** 31, lambda: f"vocab size {n} must be in [1, 2^31)")
    if out is None:
        out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    check(out.shape == (rows,) and out.dtype == torch.int64,
          lambda: f"out must be int64 [{rows}], got {out.dtype} {tuple(out.shape)}")
    check_device("logits", logits, out=out)
    if rows == 0:
        return out
    if rows > SPLIT_MAX_ROWS:
        return torch.argmax(logits, dim=-1, out=out)
    splits = plan_splits(rows, n)
    chunk = triton.cdiv(triton.cdiv(n, splits), BLOCK) * BLOCK
    splits = triton.cdiv(n, chunk)
    keys = torch.empty(rows, splits, dtype=torch.int32, device=logits.device)
    idx = torch.empty(rows, splits, dtype=torch.int32, device=logits.device)
    _argmax_chunks[(rows, splits)](logits, keys, idx, logits.stride(0), n, chunk, splits,
                                   BLOCK=BLOCK, num_warps=4)
    _argmax_pick[(rows,)](keys, idx, out, splits, SPLITS=triton.next_power_of_2(splits), num_warps=1)
    return out
