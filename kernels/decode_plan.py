"""Launch policy of the paged decode kernel (kernels/decode_attention.py), host side only.

What the kernel is launched with, from shapes alone (no tensor values, so a CUDA graph can hold
the launch): the tile shape and kv heads per program by grid size (`launch_shape`), the split
count (`plan_decode_splits`), how many splits the launch merges itself (`merge_cap`), and when
the batch-1 L2 prefetch runs. The constants are tuned on the H200 (bench/decode_sweep.py,
bench/decode_ab.py, bench/pdl_ab.py; each comment names its measurement). They are read at
every launch, so a bench or test may set them on this module.
"""
from __future__ import annotations

import math

import torch

from ._common import sm_count

# Tuning (H200, Llama-3-8B heads; bench/decode_sweep.py, bench/results/decode-sweep-*.md).
# (BLOCK_N: KV tokens per inner-loop tile, NUM_STAGES: pipelining depth of the K/V loads,
#  NUM_WARPS[, MAXNREG: a register cap per thread]), one set for 16-bit caches and one for FP8.
TILES_16BIT = (128, 4, 4)
TILES_FP8 = (64, 5, 4)
# kv heads per program (HPP): a program packs the query heads of HPP kv heads into its rows and
# reads those heads' K/V rows of each token together (adjacent in the cache); see the docstring
HPP_16BIT = 1
HPP_FP8 = 2
# Overrides by grid size before splitting (num_seqs * num_kv_heads <= max_programs), first
# match wins: (max_programs, fp8, (BLOCK_N, NUM_STAGES, NUM_WARPS), HPP). Measured: B=1 x 4k
# 16-bit in a graph 11.9 us with 128-token tiles vs 14.2; FP8 B=8 x 4k 33.7 us with two heads
# per program vs 39.8, but FP8 B=1 12.0 us with one vs 16.5. Empty it to use the defaults
# above for every batch (tests do).
BATCH_TILES = ((16, False, (128, 5, 4), 1),
               (16, True, (128, 5, 4), 1))
# ... and for large grids (num_seqs * num_kv_heads >= min_programs), after BATCH_TILES:
# (min_programs, fp8, tiles, HPP). Four kv heads per program (16 query rows, no MMA padding)
# and short tiles, measured at B=128/256 x 1k (bench/results/engine-2026-11-30-s11.md, sec. 4;
# engine step -199 / -341 us FP8, -211 / -79 us bf16, same process): FP8 (32-token pages)
# 83.6 / 151.7 us vs 88.9 / 162.4 with the defaults, bf16 137.3 / 257.5 vs 143.5 / 267.7; at
# B=32 both were slower than the defaults (FP8 29.5 vs 27.3 us).
LARGE_BATCH_TILES = ((1024, False, (16, 5, 4), 4),
                     (1024, True, (32, 5, 4), 4))
FUSED_MERGE_MAX_SPLITS = 16  # split counts up to this merge in the decode launch (0: never)
# the same for FP8 caches launched one kv head per program, whose 128-token tiles fit two
# programs per SM (bf16's one): at batch 1 in an 8448-token table, 32 splits made the engine
# step 60 us faster at 8k and 28 us slower at 1k (bench/results/engine-2026-11-30-s12.md,
# section 8). (With 8 query heads per kv head, 32 splits exceed MERGE_MAX_ELEMENTS and merge
# in the second launch: correct, slower.)
FUSED_MERGE_MAX_SPLITS_FP8 = 32
MERGE_MAX_ELEMENTS = 16384   # register bound of that merge: rows x splits x head_dim
FP8_FP16_COMPUTE = True  # FP8 K/V -> fp16 (one cvt per pair on sm_89+) rather than bf16
MIN_CHUNK = 128          # fewest KV tokens worth giving one split (256 until session 12: batch-1
#                          1k in the engine's 8448-token table 8.80 -> 7.34 us, step -11 us)
PROGRAMS_PER_SM = 2      # split until the grid has about this many programs per SM
MAX_SPLITS = 128
# L2 prefetch of each split's K/V before the PDL wait, for grids of at most this many sequences
# (0: never). With it a PDL launch reads seq_lens and block_tables *before* waiting for the
# previous kernel, so those two must not be written by the kernel launched just before it (the
# engine writes them by a host copy before the step's graph); q and the cache may be.
# Measured (bench/decode_ab.py, bench/pdl_ab.py --ab kvprefetch;
# bench/results/engine-2026-11-30-s12.md): batch-1 step -19 us; B=1 x 4k 11.19 -> 10.71 us;
# at B=8 the same or up to 1.5 us slower.
KV_PREFETCH_MAX_SEQS = 1


def launch_shape(num_seqs: int, num_kv_heads: int, fp8: bool) -> tuple[tuple, int]:
    """((BLOCK_N, NUM_STAGES, NUM_WARPS), HPP) for a batch: BATCH_TILES, LARGE_BATCH_TILES,
    else the defaults."""
    grid = num_seqs * num_kv_heads
    for max_programs, for_fp8, tiles, hpp in BATCH_TILES:
        if for_fp8 == fp8 and grid <= max_programs:
            return tiles, _divisor(num_kv_heads, hpp)
    for min_programs, for_fp8, tiles, hpp in LARGE_BATCH_TILES:
        if for_fp8 == fp8 and grid >= min_programs:
            return tiles, _divisor(num_kv_heads, hpp)
    return (TILES_FP8 if fp8 else TILES_16BIT), heads_per_program(num_kv_heads, fp8)


def heads_per_program(num_kv_heads: int, fp8: bool) -> int:
    """The tuned kv heads per program, lowered until it divides num_kv_heads."""
    return _divisor(num_kv_heads, HPP_FP8 if fp8 else HPP_16BIT)


def _divisor(num_kv_heads: int, hpp: int) -> int:
    hpp = max(1, hpp)
    while num_kv_heads % hpp:
        hpp -= 1
    return hpp


def plan_decode_splits(num_seqs: int, num_kv_heads: int, max_context: int,
                       device: torch.device, fp8: bool = False) -> int:
    """KV splits per (seq, kv head group), from static shape information only.

    Enough programs to fill the GPU (PROGRAMS_PER_SM per SM), but no split shorter than
    MIN_CHUNK tokens of the longest context the block table can hold, and no more than the
    decode launch merges itself (FUSED_MERGE_MAX_SPLITS): a second merge launch cost more
    than the extra splits gained at every batch-1 length measured on the H200 but FP8 at 32k+
    (bench/decode_splits.py; bench/results/engine-b1-2026-11-29-s10.md: bf16 8k 16.5 us at 16
    splits vs 23.1 at 32; FP8 128k 127.0 vs 112.9). The plan sees the table's width, not the lengths, so
    an engine with a long max_model_len got 33 splits and the second launch on every short
    context too. The count rounds down, never past one wave of PROGRAMS_PER_SM per SM: a grid
    1.45 waves deep (B=32 FP8, 128 programs x 3 splits) ran its last programs alone, 190 us at
    8k against 144 us at 2 splits (bench/results/engine-2026-11-30-s11.md).
    """
    hpp = launch_shape(num_seqs, num_kv_heads, fp8)[1]
    programs = max(1, num_seqs * num_kv_heads // hpp)
    want = max(1, PROGRAMS_PER_SM * sm_count(device) // programs)   # whole waves only
    most = max(1, math.ceil(max_context / MIN_CHUNK))
    return max(1, min(want, most, MAX_SPLITS, merge_cap(fp8, hpp) or MAX_SPLITS))


def merge_cap(fp8: bool, hpp: int) -> int:
    """Most splits the decode launch merges itself for this dtype and kv heads per program."""
    return FUSED_MERGE_MAX_SPLITS_FP8 if fp8 and hpp == 1 else FUSED_MERGE_MAX_SPLITS
