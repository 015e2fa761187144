"""Read a tensor into the GPU's L2 cache ahead of its use, on a side stream.

A batch-1 decode layer's attention over a short context is latency-bound (~9 us for 4 MiB of KV
on the H200, bench/results/decode-splits-2026-11-29.md), so HBM sits mostly idle while it runs;
the next kernel, the output projection's GEMV, then streams 32 MiB of weights (Llama-3-8B) from
HBM. Read on a side stream while the attention runs, those weights are in the 50 MB L2 when the
GEMV starts (engine/model_fused.py forks and joins the stream inside the step's CUDA graph).

The kernel reads every 32-bit word once (`evict_last`: keep the lines) and folds them into one
XOR per program, stored to a small scratch, so the loads are live and the result checkable
(`xor_words_ref`). Reference: `xor_words_ref` (numpy).
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ._common import check, check_device

BLOCK = 4096            # int32 words per load (16 KiB)
PROGRAMS = 132          # one per H200 SM; each reads a contiguous slice


@triton.jit
def _prefetch_kernel(x_ptr, out_ptr, n_words, per_prog, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    lo = pid.to(tl.int64) * per_prog
    acc = tl.zeros([BLOCK], tl.int32)
    for w0 in range(lo, tl.minimum(lo + per_prog, n_words), BLOCK):
        offs = w0 + tl.arange(0, BLOCK)
        acc ^= tl.load(x_ptr + offs, mask=offs < n_words, other=0, eviction_policy="evict_last")
    tl.store(out_ptr + pid, tl.xor_sum(acc, axis=0))


def xor_words_ref(t: torch.Tensor) -> int:
    """XOR of t's bytes read as little-endian int32 words (what `l2_prefetch`'s programs fold)."""
    return int(np.bitwise_xor.reduce(t.detach().cpu().contiguous().view(torch.int32).numpy().ravel(),
                                     initial=np.int32(0)))


def l2_prefetch(t: torch.Tensor, scratch: torch.Tensor | None = None, programs: int = PROGRAMS) -> torch.Tensor:
    """Read contiguous t (size a multiple of 4 bytes) through L2; returns the per-program XORs,
    int32 [programs actually launched], a view of scratch (`xor_words_ref(t)` is their XOR).
    No host sync: capturable in a CUDA graph."""
    check(t.is_contiguous(), lambda: "l2_prefetch needs a contiguous tensor")
    nbytes = t.numel() * t.element_size()
    check(nbytes % 4 == 0 and nbytes > 0, lambda: f"{nbytes} bytes is not a positive multiple of 4")
    if scratch is None:
        scratch = torch.empty(programs, dtype=torch.int32, device=t.device)
    check(scratch.dtype == torch.int32 and scratch.numel() >= programs and scratch.is_contiguous(),
          lambda: f"scratch must be contiguous int32 with >= {programs} elements")
    check_device("t", t, scratch=scratch)
    words = t.view(-1).view(torch.int32) if t.dtype != torch.int32 else t.view(-1)
    n = words.numel()
    per_prog = triton.cdiv(triton.cdiv(n, programs), BLOCK) * BLOCK
    grid = triton.cdiv(n, per_prog)
    _prefetch_kernel[(grid,)](words, scratch, n, per_prog, BLOCK=BLOCK, num_warps=4)
    return scratch[:grid]
