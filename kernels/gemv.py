"""Small-M linear layers (GEMV, M <= 32 tokens) with the layer glue fused in: y = x @ W.T.

References: `reference_fused.norm_linear_ref` / `gemv_linear_ref`. Each program owns BLOCK_N output
columns (rows of W) for all M tokens and streams its W rows over the whole of K (no split-K, so
no reduce kernel); the grid is cdiv(N, BLOCK_N) programs (N=4096, BLOCK_N=16: 256 programs).
Accumulation is float32 with one final rounding to the activation dtype.

`norm_linear` computes residual add + RMSNorm in the prologue: every program recomputes the
inverse RMS of its M rows from the full rows (M x K reads from L2, small next to its W slice),
then normalizes each K tile as it streams W. The rounding is that of `rmsnorm.py` (sum, normed
and weight * normed each rounded to the dtype), so the GEMV input is what `rms_norm` would
produce up to the order of the RMS sum. The residual sum is written by program 0 only, into a
separate `residual_out` (in place would race with the programs still reading `residual`).
With `silu=True` W is the stacked [gate; up] weight [2I, K]: a program computes matching
gate and up columns and writes silu(gate) * up [M, I] with the rounding of `silu_mul.py`.

Two inner products, chosen per M class in TILES: float32 products accumulated elementwise
([BLOCK_N, BLOCK_K] for one token, [BLOCK_N, M, BLOCK_K] for a few) and reduced once after the
loop, or tl.dot of the W tile with the tokens padded to 16 (W is the MMA's M side: "swap AB").
The K loop asks for num_stages explicitly: Triton pipelines (cp.async) loads that feed no
tl.dot only then. Compiled for sm_90 without a GPU (triton.compile with a GPUTarget), every
bench/gemv.py tile fits in shared memory, streams W with 16-byte cp.async and spills nothing.
"""
from __future__ import annotations

import json
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._pdl import launch_kwargs, pdl_trigger, pdl_wait
from .gemv_rope import RopeKV, check_rope, rope_kv_epilogue, rope_launch_args
from ._rounding import round_to
from ._common import (ACT_DTYPES, check, check_device, check_dim, check_dtype, check_last_contiguous,
                      interpreting, next_pow2)

MAX_M = 32    # the engine uses it for steps of <= 16 tokens; 32 is the benchmark's reference point


class Tile(NamedTuple):
    block_n: int      # output columns (W rows) per program
    block_k: int      # K elements per W load
    num_warps: int
    num_stages: int
    use_dot: bool     # tl.dot with tokens padded to 16, else multiply + one final reduction


# Per kind (plain linear, norm prologue, norm + SiLU epilogue: two accumulators) and M class
# (tokens rounded up to a power of two). M=1: the H200 sweep's fastest (bench/gemv.py,
# bench/results/gemv-2026-11-29.md); M>1 chosen from sm_90 builds only (registers, no spills,
# shared memory) -- the engine uses these kernels for one-token steps, where they beat cuBLAS +
# glue. A JSON file named by $SPLITSERVE_GEMV_TILES ({kind: {M: [block_n, block_k, warps,
# stages, use_dot]}}, what `bench/gemv.py` writes as gemv-tiles.json) overrides entries at
# import: tuned tiles for another GPU without a code change.
TILES = {
    "plain": {1: Tile(8, 512, 4, 4, False), 2: Tile(16, 256, 4, 4, False), 4: Tile(16, 256, 4, 4, True),
              8: Tile(16, 256, 4, 4, True), 16: Tile(16, 256, 4, 4, True), 32: Tile(32, 128, 4, 3, True)},
    "norm": {1: Tile(8, 512, 2, 4, False), 2: Tile(16, 256, 4, 4, False), 4: Tile(16, 256, 4, 4, True),
             8: Tile(32, 128, 4, 4, True), 16: Tile(32, 128, 4, 4, True), 32: Tile(32, 128, 4, 3, True)},
    "silu": {1: Tile(8, 512, 2, 4, False), 2: Tile(32, 128, 4, 4, False), 4: Tile(32, 128, 4, 4, True),
             8: Tile(32, 128, 4, 4, True), 16: Tile(32, 128, 4, 4, True), 32: Tile(32, 128, 4, 3, True)},
}
STATS_ELEMS = 4096   # x elements per step of the norm prologue (all of K for one token)


def load_tile_overrides(path: str) -> dict:
    """{kind: {m: Tile}} from a tiles JSON; unknown kinds, M classes or malformed tiles raise."""
    with open(path) as f:
        raw = json.load(f)
    out: dict = {}
    for kind, per_m in raw.items():
        if kind not in TILES:
            raise ValueError(f"{path}: unknown kernel kind {kind!r} (known: {sorted(TILES)})")
        for m, t in per_m.items():
            if int(m) not in TILES[kind] or len(t) != 5:
                raise ValueError(f"{path}: {kind}[{m}] must be an M class in {sorted(TILES[kind])} "
                                 f"with [block_n, block_k, warps, stages, use_dot], got {t!r}")
            out.setdefault(kind, {})[int(m)] = Tile(int(t[0]), int(t[1]), int(t[2]), int(t[3]), bool(t[4]))
    return out


if os.environ.get("SPLITSERVE_GEMV_TILES"):
    for _kind, _tiles in load_tile_overrides(os.environ["SPLITSERVE_GEMV_TILES"]).items():
        TILES[_kind].update(_tiles)


def tile_for(m: int, kind: str = "plain") -> Tile:
    """The default tile for m tokens of a `kind` ("plain", "norm" or "silu") kernel."""
    return TILES[kind][min(MAX_M, next_pow2(m))]


@triton.jit
def _round(x, dt: tl.constexpr, NATIVE: tl.constexpr):
    """_rounding.round_to; compiled for a GPU, the cast itself (cvt.rn: the same
    round-to-nearest-even in one instruction instead of six; the prologue rounds 3 M x K)."""
    if NATIVE:
        y = x.to(dt)
    else:
        y = round_to(x, dt)
    return y


@triton.jit
def _load_rows(x_ptr, res_ptr, rows, cols, mask, stride_x, stride_r, HAS_RES: tl.constexpr,
               NATIVE: tl.constexpr):
    """x[rows, cols], or residual + x rounded to the dtype (rmsnorm.py's fused add)."""
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        x = _round(r.to(tl.float32) + x.to(tl.float32), x_ptr.dtype.element_ty, NATIVE)
    return x


@triton.jit
def _inv_rms(x_ptr, res_ptr, res_out_ptr, M, K, stride_x, stride_r, stride_ro, eps, write_res,
             BLOCK_M: tl.constexpr, STATS_K: tl.constexpr, STATS_STAGES: tl.constexpr,
             HAS_RES: tl.constexpr, NATIVE: tl.constexpr):
    """rsqrt(mean(x^2) + eps) of the M rows [BLOCK_M]; the residual sum goes to res_out if
    write_res (program 0). Every W load waits for this, so it takes few, wide steps (one
    for a token with K <= STATS_ELEMS) and pipelines them when there are several."""
    rows = tl.arange(0, BLOCK_M)
    sq = tl.zeros([BLOCK_M, STATS_K], dtype=tl.float32)
    for k0 in tl.range(0, K, STATS_K, num_stages=STATS_STAGES):
        cols = k0 + tl.arange(0, STATS_K)
        mask = (rows[:, None] < M) & (cols[None, :] < K)
        x = _load_rows(x_ptr, res_ptr, rows, cols, mask, stride_x, stride_r, HAS_RES, NATIVE)
        if HAS_RES:
            if write_res:
                tl.store(res_out_ptr + rows[:, None] * stride_ro + cols[None, :], x, mask=mask)
        xf = x.to(tl.float32)
        sq += xf * xf
    return tl.math.rsqrt(tl.sum(sq, axis=1) / K + eps)


@triton.jit
def _mac(acc, w, x, USE_DOT: tl.constexpr, BLOCK_M: tl.constexpr):
    """acc += w [BN, BK] x x[BM, BK]^T: acc is [BN, BM] (dot), else the products are kept,
    [BN, BK] for one token, [BN, BM, BK] for more, and reduced once after the loop."""
    if USE_DOT:
        acc = tl.dot(w, tl.trans(x), acc)
    elif BLOCK_M == 1:
        acc += w.to(tl.float32) * x.to(tl.float32)
    else:
        acc += w.to(tl.float32)[:, None, :] * x.to(tl.float32)[None, :, :]
    return acc


@triton.jit(do_not_specialize=["M"])   # one build for every M of a block size
def _gemv_kernel(x_ptr, res_ptr, res_out_ptr, ln_ptr, w_ptr, b_ptr, out_ptr,
                 M, N, K, stride_x, stride_r, stride_ro, stride_w, stride_o, eps,
                 # ROPE epilogue (gemv_rope.py): positions, cos/sin, caches, slots, scales
                 pos_ptr, cs_ptr, stride_cs, kc_ptr, vc_ptr, slot_ptr, ks_ptr, vs_ptr,
                 s_kblk, s_koff, s_kh, s_vblk, s_voff, s_vh, s_vd, block_size,
                 num_q_heads, num_kv_heads,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 NORM: tl.constexpr, HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SILU: tl.constexpr, USE_DOT: tl.constexpr, EVEN: tl.constexpr,
                 NUM_STAGES: tl.constexpr, STATS_K: tl.constexpr, STATS_STAGES: tl.constexpr,
                 NATIVE: tl.constexpr, ROPE: tl.constexpr = False, HALF: tl.constexpr = 1,
                 FP8: tl.constexpr = False, FP8_MAX: tl.constexpr = 448.0,
                 PDL: tl.constexpr = 0):
    # (loading the first weight tile before this wait, to stream it in under the previous
    # kernel's tail, made the B=1 step 20-81 us slower: bench/results/pdl-ab-v2-2026-11-29.md;
    # an L2 prefetch of the first 1/2/4 tiles there, with the late trigger, gained 3-9 us at
    # one tile and cost 40-180 us at more: engine-2026-11-30-s11.md, section 2)
    pdl_wait(PDL)              # before any load of x, residual or out
    pid = tl.program_id(0)
    dt = w_ptr.dtype.element_ty
    rows = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    if ROPE:   # BLOCK_N rotate-half pairs of one head: rows offs_n and offs_n + HALF
        offs_n = (pid * BLOCK_N) // HALF * (2 * HALF) + (pid * BLOCK_N) % HALF + tl.arange(0, BLOCK_N)
    if NORM:
        rstd = _inv_rms(x_ptr, res_ptr, res_out_ptr, M, K, stride_x, stride_r, stride_ro, eps,
                        pid == 0, BLOCK_M, STATS_K, STATS_STAGES, HAS_RES, NATIVE)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_w + tl.arange(0, BLOCK_K)[None, :]
    # the second row set: SILU the up half's matching rows, ROPE the pairs' second halves
    up_ptrs = w_ptrs + (HALF if ROPE else N) * stride_w
    PAIRED: tl.constexpr = SILU or ROPE
    if USE_DOT:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    elif BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_M, BLOCK_K], dtype=tl.float32)
    acc_up = acc
    # num_stages on the loop itself: Triton pipelines loads that feed no tl.dot only when asked
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = _load_rows(x_ptr, res_ptr, rows, cols, (rows[:, None] < M) & (cols[None, :] < K),
                       stride_x, stride_r, HAS_RES, NATIVE)
        if NORM:
            y = _round(x.to(tl.float32) * rstd[:, None], dt, NATIVE)
            ln = tl.load(ln_ptr + cols, mask=cols < K, other=0.0)
            x = _round(ln.to(tl.float32)[None, :] * y.to(tl.float32), dt, NATIVE)
        wmask = (offs_n[:, None] < N) & (cols[None, :] < K)
        if EVEN:
            acc = _mac(acc, tl.load(w_ptrs), x, USE_DOT, BLOCK_M)
        else:
            acc = _mac(acc, tl.load(w_ptrs, mask=wmask, other=0.0), x, USE_DOT, BLOCK_M)
        if PAIRED:
            if EVEN:
                acc_up = _mac(acc_up, tl.load(up_ptrs), x, USE_DOT, BLOCK_M)
            else:
                acc_up = _mac(acc_up, tl.load(up_ptrs, mask=wmask, other=0.0), x, USE_DOT, BLOCK_M)
        w_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
    pdl_trigger(PDL)
    if USE_DOT:
        pass
    elif BLOCK_M == 1:
        acc = tl.sum(acc, axis=1)[:, None]
        acc_up = tl.sum(acc_up, axis=1)[:, None]
    else:
        acc = tl.sum(acc, axis=2)
        acc_up = tl.sum(acc_up, axis=2)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
        if ROPE:
            acc_up += tl.load(b_ptr + offs_n + HALF).to(tl.float32)[:, None]
    y = _round(acc, dt, NATIVE)                             # [BLOCK_N, BLOCK_M]
    if ROPE:
        rope_kv_epilogue(y, _round(acc_up, dt, NATIVE), offs_n, rows, M, out_ptr, stride_o,
                         pos_ptr, cs_ptr, stride_cs, kc_ptr, vc_ptr, slot_ptr, ks_ptr, vs_ptr,
                         s_kblk, s_koff, s_kh, s_vblk, s_voff, s_vh, s_vd, block_size,
                         num_q_heads, num_kv_heads, HALF, FP8, FP8_MAX)
    else:
        if SILU:   # silu_mul.py on the rounded gate and up
            g = y.to(tl.float32)
            s = _round(tl.math.div_rn(g, 1.0 + tl.exp(-g)), dt, NATIVE).to(tl.float32)
            y = _round(s * _round(acc_up, dt, NATIVE).to(tl.float32), dt, NATIVE)
        tl.store(out_ptr + rows[None, :] * stride_o + offs_n[:, None], y,
                 mask=(offs_n[:, None] < N) & (rows[None, :] < M))


def _check_x(name: str, x: torch.Tensor) -> None:
    check_dim(name, x, 2, "[num_tokens, in_features]")
    check_dtype(name, x, ACT_DTYPES)
    check_last_contiguous(name, x)
    check(x.shape[0] <= MAX_M, lambda: f"{name} has {x.shape[0]} rows; the GEMV kernels take at "
          f"most {MAX_M} tokens (use F.linear for more)")


def _launch(x, weight, out, *, tile, norm_weight=None, eps=0.0, residual=None, residual_out=None,
            bias=None, silu=False, rope: RopeKV | None = None) -> torch.Tensor:
    m, k = x.shape
    n = out.shape[1]
    if m == 0:
        return out
    paired = silu or rope is not None      # two row sets per program
    t = tile or tile_for(m, "silu" if paired else "norm" if norm_weight is not None else "plain")
    check(t.block_n >= 16 or not t.use_dot, lambda: f"{t}: tl.dot needs block_n >= 16")
    half = rope.cos_sin.shape[1] // 2 if rope is not None and rope.cos_sin.dim() == 2 else 1
    if rope is not None and tile is None and t.block_n > half:   # a program's pairs in one head
        t = t._replace(block_n=half, use_dot=t.use_dot and half >= 16)
    fp8 = rope is not None and check_rope(rope, x, weight, t.block_n)
    block_m = max(16, next_pow2(m)) if t.use_dot else next_pow2(m)
    even = n % t.block_n == 0 and k % t.block_k == 0
    programs = n // (2 * t.block_n) if rope is not None else triton.cdiv(n, t.block_n)
    stats_k = min(next_pow2(k), max(16, STATS_ELEMS // block_m))
    norm, res = norm_weight is not None, residual is not None
    _gemv_kernel[(programs,)](
        x, residual if res else x, residual_out if res else x, norm_weight if norm else weight,
        weight, bias if bias is not None else weight, out,
        m, n, k, x.stride(0), residual.stride(0) if res else 0,
        residual_out.stride(0) if res else 0, weight.stride(0), out.stride(0), eps,
        *rope_launch_args(rope, x), ROPE=rope is not None, HALF=half, FP8=fp8, BLOCK_M=block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, NORM=norm, HAS_RES=res,
        HAS_BIAS=bias is not None, SILU=silu, USE_DOT=t.use_dot, EVEN=even, NUM_STAGES=t.num_stages,
        STATS_K=stats_k, STATS_STAGES=1 if stats_k >= k else 3, NATIVE=not interpreting(),
        num_warps=t.num_warps, num_stages=t.num_stages,
        **launch_kwargs(x.device, m))
    return out


def _check_weight(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool,
                  out: torch.Tensor | None) -> torch.Tensor:
    """Checks W (and bias, out) against x; returns out, allocated if None."""
    check_dim("weight", weight, 2, "[out_features, in_features]")
    check(weight.dtype == x.dtype, lambda: f"weight is {weight.dtype} but x is {x.dtype}")
    check(weight.shape[1] == x.shape[1],
          lambda: f"weight {tuple(weight.shape)} does not match x's {x.shape[1]} in_features")
    check_last_contiguous("weight", weight)
    n = weight.shape[0]
    if silu:
        check(n % 2 == 0, lambda: f"silu needs the stacked [gate; up] weight; {n} rows is odd")
        check(bias is None, lambda: "bias with silu is not supported")
        n //= 2
    if bias is not None:
        check(bias.dim() == 1 and bias.shape[0] == n and bias.stride(0) == 1 and bias.dtype == x.dtype,
              lambda: f"bias must be contiguous {x.dtype} [{n}], got {bias.dtype} {tuple(bias.shape)}")
    if out is None:
        out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    check(tuple(out.shape) == (x.shape[0], n) and out.dtype == x.dtype,
          lambda: f"out must be {x.dtype} [{x.shape[0]}, {n}], got {out.dtype} {tuple(out.shape)}")
    check_last_contiguous("out", out)
    return out


def gemv_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         out: torch.Tensor | None = None, tile: Tile | None = None) -> torch.Tensor:
    """F.linear for at most MAX_M tokens, no split-K reduce kernel; returns out [M, N].

    x: [M, K] fp16/bf16, last dim contiguous; weight: [N, K] same dtype, last dim contiguous;
    bias: optional contiguous [N]. No host sync: capturable in a CUDA graph.
    """
    _check_x("x", x)
    out = _check_weight(x, weight, bias, False, out)
    check_device("x", x, weight=weight, bias=bias, out=out)
    return _launch(x, weight, out, tile=tile, bias=bias)


def norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                residual: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, silu: bool = False, out: torch.Tensor | None = None,
                tile: Tile | None = None, rope: RopeKV | None = None) -> torch.Tensor:
    """F.linear(rms_norm(x, norm_weight, eps, residual), weight, bias) in one kernel, with
    silu=True followed by silu_and_mul, with rope= (the QKV projection) followed by
    rope_write_kv of its q, k, v views (gemv_rope.py); returns out [M, N] (silu: [M, N / 2]).

    x:            [M, K] fp16/bf16, last dim contiguous (M <= MAX_M)
    norm_weight:  [K] contiguous, x's dtype
    residual:     optional [M, K]: the sum residual + x (rounded) is normed and written to
                  residual_out ([M, K], required with residual, must not be residual itself);
                  residual is only read
    weight:       [N, K], last dim contiguous; with silu the stacked [gate; up] rows; with
                  rope the stacked [q; k; v] rows, q and k rotated and k, v written to the cache
    No host sync: capturable in a CUDA graph.
    """
    _check_x("x", x)
    k = x.shape[1]
    check(norm_weight.dim() == 1 and norm_weight.shape[0] == k and norm_weight.stride(0) == 1
          and norm_weight.dtype == x.dtype, lambda: f"norm_weight must be contiguous {x.dtype} [{k}], "
          f"got {norm_weight.dtype} {tuple(norm_weight.shape)}")
    check((residual is None) == (residual_out is None),
          lambda: "residual and residual_out go together (the sum is written to residual_out)")
    if residual is not None and residual_out is not None:
        for name, r in (("residual", residual), ("residual_out", residual_out)):
            check(r.shape == x.shape and r.dtype == x.dtype,
                  lambda: f"{name} must be {x.dtype} {tuple(x.shape)}, got {r.dtype} {tuple(r.shape)}")
            check_last_contiguous(name, r)
        check(residual_out.data_ptr() != residual.data_ptr(),
              lambda: "residual_out must be a separate buffer: other programs still read residual")
    check(not (silu and rope is not None), lambda: "silu and rope are two different epilogues")
    out = _check_weight(x, weight, bias, silu, out)
    r = rope._asdict() if rope is not None else {}
    check_device("x", x, norm_weight=norm_weight, weight=weight, residual=residual,
                 residual_out=residual_out, bias=bias, out=out,
                 **{k: v for k, v in r.items() if isinstance(v, torch.Tensor)})
    return _launch(x, weight, out, tile=tile, norm_weight=norm_weight, eps=eps, residual=residual,
                   residual_out=residual_out, bias=bias, silu=silu, rope=rope)
