"""Skinny tensor-core linear layers for decode batches (M = 1..256 tokens): y = x @ W.T (+ bias).

Reference: `reference_fused.gemv_linear_ref` (float32 math, one rounding). A decode step's GEMMs
stream the weights once per step; at M = 32-256 cuBLAS reads them at 2.3-3.4 TB/s of the H200's
~4.4 (bench/gemm_ab.py: the down projection's 32 column tiles leave most SMs idle without a
K split, gate_up's 224 tiles take 1.7 waves). Here the MMA runs "swap AB": W's rows are the
MMA's M side (BLOCK_N = 64/128 rows per program, what wgmma needs), the tokens its N side
(BLOCK_M = M rounded up to a power of two >= 16). A program owns BLOCK_N output columns for all
tokens, so every weight byte is read once.

K can be split SPLIT ways (grid cdiv(N, BLOCK_N) x SPLIT) to give the SMs enough programs: each
split program writes its float32 partial tile to a scratch [SPLIT, N, BLOCK_M], then bumps its
column tile's counter (a CTA barrier, then an acq_rel atomic by one thread, which publishes the
program's stores); the last one sums the partials in split order (deterministic), writes y and
re-arms the counter (relaxed: nothing in the launch reads it again). The scratch is allocated
once per device and size and reused by every call (calls on one stream only; no host sync:
CUDA-graph capturable).

W and x tiles come by pointer loads (cp.async, pipelined) or by TMA descriptors. With silu=True
(gate_up, no split) a program also accumulates the matching up rows and stores silu(gate) * up,
rounded as cuBLAS + `silu_mul.py` round: one launch and no [M, 2I] intermediate. Launches use
PDL (kernels/_pdl.py), so a layer whose kernels are all Triton overlaps each launch with the
previous kernel's tail.

TILES / SILU_TILES pick (BLOCK_N, BLOCK_K, warps, stages, SPLIT, TMA) per weight shape and M
class; they are the fastest of `bench/linear_sweep.py` on the H200. Where cuBLAS was as fast or
faster the entry is absent, `skinny_tile` returns None and the engine calls F.linear. The engine
takes this path for steps of 2-128 tokens (one-token steps run kernels/gemv.py).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._pdl import launch_kwargs, pdl_trigger, pdl_wait
from ._rounding import round_to
from ._common import ACT_DTYPES, check, check_device, check_dim, check_dtype, check_last_contiguous, next_pow2

MAX_M = 256


class LinearTile(NamedTuple):
    block_n: int      # W rows (output columns) per program: 64 or 128 (the wgmma M side)
    block_k: int      # K elements per load
    num_warps: int
    num_stages: int
    split: int        # K split (1: no partials, no counter)
    tma: bool = False  # W and x tiles through TMA descriptors (16-byte aligned rows needed)


@triton.jit
def _linear_kernel(x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, cnt_ptr, M, N, K, stride_xm, stride_wn,
                   stride_ym, k_len, SPLIT, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                   HAS_BIAS: tl.constexpr, EVEN: tl.constexpr, SILU: tl.constexpr = False,
                   PDL: tl.constexpr = 0):
    pdl_wait(PDL)
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    nmask = rn < N
    mmask = rm < M
    k0 = pid_s * k_len
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + (k0 + rk)[None, :]
    x_ptrs = x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)     # SILU: the up rows (N further on)
    for k in tl.range(0, k_len, BLOCK_K, num_stages=STAGES):
        if EVEN:     # N % BLOCK_N == 0 and the splits tile K exactly: W loads unmasked
            w = tl.load(w_ptrs + k)
            x = tl.load(x_ptrs + k, mask=mmask[:, None], other=0.0)
            if SILU:
                w2 = tl.load(w_ptrs + N * stride_wn + k)
        else:
            kmask = (k0 + k + rk) < K
            w = tl.load(w_ptrs + k, mask=nmask[:, None] & kmask[None, :], other=0.0)
            x = tl.load(x_ptrs + k, mask=mmask[:, None] & kmask[None, :], other=0.0)
            if SILU:
                w2 = tl.load(w_ptrs + N * stride_wn + k, mask=nmask[:, None] & kmask[None, :], other=0.0)
        acc = tl.dot(w, tl.trans(x), acc)
        if SILU:
            acc2 = tl.dot(w2, tl.trans(x), acc2)
    pdl_trigger(PDL)
    _epilogue(acc, acc2, b_ptr, y_ptr, part_ptr, cnt_ptr, M, N, stride_ym, SPLIT, pid_n, pid_s,
              SPLIT_K, BLOCK_N, BLOCK_M, HAS_BIAS, SILU)


@triton.jit
def _epilogue(acc, acc2, b_ptr, y_ptr, part_ptr, cnt_ptr, M, N, stride_ym, SPLIT, pid_n, pid_s,
              SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
              HAS_BIAS: tl.constexpr, SILU: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] = y^T tile: bias, one rounding, store; or, with a K split, the
    partial to scratch and, in the split that finishes last, the sum of all in split order.
    SILU (no split, no bias): acc is gate, acc2 up; stores silu(gate) * up rounded as the
    unfused path rounds it (the GEMM's outputs, then silu_mul.py's two roundings)."""
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    nmask = rn < N
    mmask = rm < M
    y_ptrs = y_ptr + rm[None, :] * stride_ym + rn[:, None]
    ymask = nmask[:, None] & mmask[None, :]
    if SILU:
        dt = y_ptr.dtype.element_ty
        g = round_to(acc, dt).to(tl.float32)
        u = round_to(acc2, dt).to(tl.float32)
        sg = round_to(tl.math.div_rn(g, 1.0 + tl.exp(-g)), dt).to(tl.float32)
        tl.store(y_ptrs, round_to(sg * u, dt), mask=ymask)
    elif not SPLIT_K:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptrs, round_to(acc, y_ptr.dtype.element_ty), mask=ymask)
    else:
        tile = (rn[:, None] * BLOCK_M + rm[None, :]).to(tl.int64)
        tl.store(part_ptr + pid_s * N * BLOCK_M + tile, acc, mask=nmask[:, None])
        # every thread's stores precede the barrier; the acq_rel atomic publishes them (and, in
        # the last program, makes the other splits' visible); the last one re-arms the counter
        tl.debug_barrier()
        if tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel") == SPLIT - 1:
            tot = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for s in range(SPLIT):
                tot += tl.load(part_ptr + s * N * BLOCK_M + tile, mask=nmask[:, None], other=0.0,
                               cache_modifier=".cg")
            if HAS_BIAS:
                tot += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[:, None]
            tl.store(y_ptrs, round_to(tot, y_ptr.dtype.element_ty), mask=ymask)
            # no fence: nothing in the launch reads the counter again (as decode_attention)
            tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed")


@triton.jit
def _linear_tma_kernel(x_desc, w_desc, b_ptr, y_ptr, part_ptr, cnt_ptr, M, N, stride_ym, k_len, SPLIT,
                       SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_K: tl.constexpr, STAGES: tl.constexpr, HAS_BIAS: tl.constexpr,
                       SILU: tl.constexpr = False, PDL: tl.constexpr = 0):
    """_linear_kernel with W and x tiles loaded by TMA (tensor descriptors): one thread issues a
    tile, no per-element addresses; out-of-range rows and K columns arrive as zeros."""
    pdl_wait(PDL)
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n0 = pid_n * BLOCK_N
    k0 = pid_s * k_len
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k in tl.range(0, k_len, BLOCK_K, num_stages=STAGES):
        w = w_desc.load([n0, k0 + k])
        x = x_desc.load([0, k0 + k])
        acc = tl.dot(w, x.T, acc)
        if SILU:   # the up rows: N further on (a gate row past N reads up rows; masked at store)
            acc2 = tl.dot(w_desc.load([N + n0, k0 + k]), x.T, acc2)
    pdl_trigger(PDL)
    _epilogue(acc, acc2, b_ptr, y_ptr, part_ptr, cnt_ptr, M, N, stride_ym, SPLIT, pid_n, pid_s,
              SPLIT_K, BLOCK_N, BLOCK_M, HAS_BIAS, SILU)


# (N, K) of the weight -> {M class: tile}, for the classes where the fastest tile beat cuBLAS by
# 3% or more on the H200 in two sweeps on two machines (`bench/linear_sweep.py --m 32,8,64,128`,
# bench/results/engine-2026-11-30-s14.md); a step of M tokens uses the class >= M. The QKV
# projection at M <= 32 is level with cuBLAS alone, but with it every kernel of the layer is a
# PDL launch: whole steps 24-40 us faster (`bench/pdl_ab.py --ab skinny`; skinny-cublas-qkv is
# the table without it). Llama-3-8B shapes only: other shapes and classes keep cuBLAS.
# SILU_TILES: the same for gate_up with silu_and_mul fused in (against cuBLAS + the silu_and_mul
# kernel).
M_CLASSES = (8, 32, 64, 128)
TILES: dict[tuple[int, int], dict[int, LinearTile]] = {
    (4096, 4096): {8: LinearTile(64, 128, 4, 5, 1), 32: LinearTile(64, 128, 4, 5, 1, True)},        # o
    (6144, 4096): {8: LinearTile(64, 128, 4, 5, 1), 32: LinearTile(64, 128, 4, 5, 1),               # qkv
                   64: LinearTile(64, 128, 4, 5, 1, True)},
    (28672, 4096): {8: LinearTile(128, 64, 4, 5, 1, True), 32: LinearTile(64, 64, 4, 3, 1),
                    64: LinearTile(128, 64, 4, 3, 1, True), 128: LinearTile(128, 64, 8, 3, 1, True)},  # gate_up
    (4096, 14336): {32: LinearTile(64, 128, 4, 5, 2), 64: LinearTile(64, 128, 4, 5, 2)},            # down
}
SILU_TILES: dict[tuple[int, int], dict[int, LinearTile]] = {       # vs skinny/cuBLAS + silu kernel
    (28672, 4096): {8: LinearTile(128, 128, 4, 3, 1, True), 32: LinearTile(64, 64, 4, 3, 1),
                    64: LinearTile(64, 64, 4, 3, 1), 128: LinearTile(128, 64, 8, 4, 1, True)},
}


def skinny_tile(n: int, k: int, m: int, silu: bool = False) -> LinearTile | None:
    """The tile for an [m, k] x [n, k]^T linear (silu: the fused gate_up + SiLU-and-mul, n = 2I),
    or None where cuBLAS (+ silu_and_mul) is the faster choice."""
    per = (SILU_TILES if silu else TILES).get((n, k))
    if not per:
        return None
    cls = next((c for c in M_CLASSES if m <= c), None)
    return per.get(cls) if cls is not None else None


_SCRATCH: dict = {}


def _scratch(device: torch.device, part_elems: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 partials and int32 counters (zeros) per device and size, never freed: a captured
    CUDA graph keeps their addresses."""
    key = (device.type, device.index, part_elems, tiles)
    if key not in _SCRATCH:
        _SCRATCH[key] = (torch.empty(part_elems, dtype=torch.float32, device=device),
                         torch.zeros(tiles, dtype=torch.int32, device=device))
    return _SCRATCH[key]


def skinny_linear(x: torch.Tensor, w: torch.Tensor, tile: LinearTile, bias: torch.Tensor | None = None,
                  out: torch.Tensor | None = None, silu: bool = False) -> torch.Tensor:
    """Triton version of `gemv_linear_ref` for 1..MAX_M tokens; returns out [M, N].

    x:    [M, K] fp16/bf16, last dim contiguous
    w:    [N, K] x's dtype, last dim contiguous; with silu the stacked [gate; up] weight [2I, K]
    tile: LinearTile (see TILES / `skinny_tile`)
    bias: optional [N] (not with silu)
    silu: out = silu_and_mul(x @ w.T) [M, I], rounded as the two unfused kernels round
    No host sync: capturable in a CUDA graph; launched with PDL where kernels/_pdl.py says so.
    """
    check_dim("x", x, 2, "[num_tokens, in_features]")
    check_dim("w", w, 2, "[out_features, in_features]")
    check_dtype("x", x, ACT_DTYPES)
    check(w.dtype == x.dtype, lambda: f"w dtype {w.dtype} != x dtype {x.dtype}")
    check_last_contiguous("x", x)
    check_last_contiguous("w", w)
    m, k = x.shape
    check(w.shape[1] == k, lambda: f"w is {list(w.shape)}, x has {k} features")
    check(1 <= m <= MAX_M, lambda: f"{m} tokens: this kernel takes 1..{MAX_M}")
    check(tile.block_n in (16, 32, 64, 128) and tile.block_k in (16, 32, 64, 128, 256) and tile.split >= 1,
          lambda: f"bad tile {tile}")
    if silu:
        check(w.shape[0] % 2 == 0 and bias is None and tile.split == 1,
              lambda: "silu needs an even number of weight rows [gate; up], no bias and split 1")
    n = w.shape[0] // 2 if silu else w.shape[0]
    if bias is not None:
        check(bias.shape == (n,) and bias.dtype == x.dtype and bias.stride(0) == 1,
              lambda: f"bias must be contiguous [{n}] {x.dtype}")
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    check(out.shape == (m, n) and out.dtype == x.dtype and out.stride(1) == 1,
          lambda: f"out must be [{m}, {n}] {x.dtype} with contiguous rows")
    check_device("x", x, w=w, bias=bias, out=out)
    block_m = max(16, next_pow2(m))
    tiles = triton.cdiv(n, tile.block_n)
    k_len = triton.cdiv(triton.cdiv(k, tile.split), tile.block_k) * tile.block_k
    split = triton.cdiv(k, k_len)             # no empty split
    part, cnt = (_scratch(x.device, split * n * block_m, tiles) if split > 1 else (out, out))
    common = dict(SPLIT_K=split > 1, BLOCK_N=tile.block_n, BLOCK_M=block_m, BLOCK_K=tile.block_k,
                  STAGES=tile.num_stages, HAS_BIAS=bias is not None, SILU=silu,
                  num_warps=tile.num_warps, **launch_kwargs(x.device, m))
    b = bias if bias is not None else out
    if tile.tma:
        check(all(t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0 for t in (x, w)),
              lambda: "a TMA tile needs x and w with 16-byte aligned rows")
        _linear_tma_kernel[(tiles, split)](
            TensorDescriptor(x, [m, k], [x.stride(0), 1], [block_m, tile.block_k]),
            TensorDescriptor(w, [w.shape[0], k], [w.stride(0), 1], [tile.block_n, tile.block_k]),
            b, out, part, cnt, m, n, out.stride(0), k_len, split, **common)
    else:
        _linear_kernel[(tiles, split)](
            x, w, b, out, part, cnt, m, n, k, x.stride(0), w.stride(0), out.stride(0), k_len, split,
            EVEN=n % tile.block_n == 0 and k_len * split == k, **common)
    return out
