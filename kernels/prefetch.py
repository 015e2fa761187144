"""L2 prefetch of a weight while a latency-bound kernel leaves HBM bandwidth idle.

A decode step's attention at batch 8-128 reads its KV at 2-3.5 TB/s, below the H200's ~4.4: its
loads wait on the block table and it runs 2 programs per SM. The o projection right after it is
a small GEMM (33.5 MB for Llama-3-8B) that cuBLAS streams at only ~2.4 TB/s (launch ramp and
tail, bench/gemm_ab.py). Issuing the o weight's lines to L2 (50 MB on the H200) just before the
attention lets HBM serve them inside the attention's idle bandwidth; the GEMM then reads L2.

`l2_prefetch(w, fraction, mode)` issues one prefetch per 128-byte line of the first `fraction`
of every row of a 2-D weight (row prefixes: a GEMM's programs walk K together, so the head of
every row is what is read first). It fills no registers, never faults, and returns at once: the
kernel ends when its prefetches are issued, not when they land. Modes:
- "evict_last": `prefetch.global.L2::evict_last`, so a streaming kernel in between evicts its own
  lines first;
- "normal": `prefetch.global.L2::evict_normal`;
- "bulk": `cp.async.bulk.prefetch.L2` of 4 KiB pieces (the TMA unit issues them).
A hint only: results never depend on it. Under the Triton interpreter (and on CPU) it is a no-op,
so there is no torch reference; tests/test_kernels_prefetch.py checks the arguments on CPU and, on a
GPU, that every mode runs (also inside a CUDA graph) and leaves the data unchanged. Whether it
pays is measured by `bench/pdl_ab.py --ab l2w` on whole decode steps.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check, interpreting

LINE = 128          # bytes per prefetch.global.L2 (one L2 line)
BULK = 4096         # bytes per cp.async.bulk.prefetch.L2 piece
BLOCK = 1024        # prefetches per program
MODES = {"normal": 0, "evict_last": 1, "bulk": 2}
_ASM = {
    0: "prefetch.global.L2::evict_normal [$1];\n\tmov.u32 $0, 0;",
    1: "prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;",
    2: "cp.async.bulk.prefetch.L2.global [$1], 4096;\n\tmov.u32 $0, 0;",
}


@triton.jit
def _l2_prefetch_kernel(base_ptr, row_stride, per_row, total,
                        PIECE: tl.constexpr, BLOCK: tl.constexpr, ASM: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    i = tl.minimum(i, total - 1)              # the last program repeats the last piece
    row = i // per_row
    addr = base_ptr + row * row_stride + (i - row * per_row) * PIECE
    tl.inline_asm_elementwise(ASM, "=r,l", [addr], dtype=tl.int32, is_pure=False, pack=1)


def l2_prefetch(w: torch.Tensor, fraction: float = 1.0, mode: str = "evict_last") -> None:
    """Prefetch the first `fraction` of every row of w (2-D, rows contiguous) into L2.

    No host sync (capturable in a CUDA graph); a no-op on CPU and under TRITON_INTERPRET=1.
    """
    check(mode in MODES, lambda: f"mode must be one of {sorted(MODES)}, got {mode!r}")
    check(0.0 < fraction <= 1.0, lambda: f"fraction must be in (0, 1], got {fraction}")
    check(w.dim() == 2 and w.stride(1) == 1,
          lambda: f"w must be 2-D with contiguous rows, got shape {tuple(w.shape)} strides {w.stride()}")
    if w.device.type != "cuda" or interpreting() or w.numel() == 0:
        return
    piece = BULK if mode == "bulk" else LINE
    row_bytes = w.shape[1] * w.element_size()
    per_row = int(row_bytes * fraction) // piece
    check(per_row > 0, lambda: f"{fraction} of a {row_bytes}-byte row is less than one {piece}-byte piece")
    row_stride = w.stride(0) * w.element_size()
    check(mode != "bulk" or (w.data_ptr() % 16 == 0 and row_stride % 16 == 0),
          lambda: "bulk prefetch needs 16-byte aligned rows")
    total = w.shape[0] * per_row
    _l2_prefetch_kernel[(triton.cdiv(total, BLOCK),)](
        w.view(torch.uint8), row_stride, per_row, total, PIECE=piece, BLOCK=BLOCK, ASM=_ASM[MODES[mode]], num_warps=4)
