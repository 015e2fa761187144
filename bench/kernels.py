#!/usr/bin/env python3
"""Benchmark of the Triton paged-attention kernels against torch, side by side, one process.

    python3 bench/kernels.py [--tune] [--quick] [--no-flex] [--only decode|prefill] [--commit SHA]
    python3 bench/kernels.py --tune --only prefill   # prefill/extend only (~3 min on an H200)
    python bench/kernels.py --smoke     # CPU dry run of every section (Triton interpreter)

Sections (each checks correctness against the float32 reference or torch SDPA first):
  ceiling  device-to-device copy bandwidth (bytes read + written) -- the HBM ceiling
  decode   Llama-3-8B heads (32 q / 8 kv, d=128), block size 16, (B, L) in (1,4096) (8,4096)
           (64,4096) (64,16384) (256,2048) (1,131072), bf16 and fp8 KV: our kernel vs torch
           SDPA on the same data laid out contiguously (enable_gqa); TB/s of KV read. B <= 8
           also replayed from a CUDA graph (rotating over enough copies of the KV to defeat the
           60 MB L2) against the ideal KV bytes / copy bandwidth.
  flex     torch FlexAttention over the physical paged layout (if it compiles and runs)
  prefill  causal 4k / 8k / 16k, bf16: TFLOP/s (causal counted as half) vs SDPA
  extend   new tokens over a paged prefix vs SDPA (lower-right causal) on contiguous KV
           Both: paged_extend_attention (all K/V from the paged cache) and, in the "new"
           columns, paged_prefill_attention (new tokens' q/k/v as views of one fused qkv
           buffer, as the engine has them; prefix from the cache) on the same data.
  tune     (--tune) decode tile / split and extend tile sweeps, and the prefill kernel's tile
           sweep (BLOCK_M, BLOCK_N, warps, stages, TMA); the winners are used for the
           sections above and reported, so the defaults in kernels/ can follow them.
           With --only prefill only the prefill kernel's sweep runs (extend keeps its
           committed defaults). --smoke runs the prefill kernel's sweep on two configs.
Timing: triton.testing.do_bench medians (it flushes L2 between calls); graphs: CUDA events
around replays, median of 20. Prints a table last; writes JSON to $OUT/kernels.json (default
./bench/results/kernels-latest.json), the table beside it (-table.txt) and the prefill/extend
rows as markdown (-prefill.md).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import traceback
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SMOKE = "--smoke" in sys.argv   # CPU dry run of the whole script under the Triton interpreter
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"


def import_kernels():
    """splitserve.kernels from this checkout, installed or not (the device has no install)."""
    try:
        import splitserve.kernels  # noqa: F401
    except ImportError:
        pkg = types.ModuleType("splitserve")
        pkg.__path__ = [str(REPO / "splitserve"), str(REPO)]   # kernels/ -> splitserve.kernels
        sys.modules["splitserve"] = pkg
    import splitserve.kernels as kernels
    import splitserve.kernels.decode_attention as decode_mod
    import splitserve.kernels.extend_attention as extend_mod
    import splitserve.kernels.prefill_attention as prefill_mod
    import splitserve.kernels.testing as testing
    return kernels, decode_mod, extend_mod, prefill_mod, testing


K, DECODE, EXTEND, PREFILL, TESTING = import_kernels()
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 16
DEV = "cpu" if SMOKE else "cuda"
if SMOKE:
    TESTING.patch_interpreter_bf16_dot()
RESULTS: dict = {"decode": [], "decode_graph": [], "prefill": [], "extend": [], "tune": [],
                 "flex": [], "errors": []}


def bench(fn) -> float:
    """Median microseconds of fn (do_bench flushes the L2 before each call)."""
    if SMOKE:
        import time
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    return do_bench(fn, warmup=25, rep=150, return_mode="median") * 1e3


def bench_graph(fns, replays: int = 20) -> float:
    """Median microseconds per fn of a CUDA graph that calls each of fns once."""
    if SMOKE:
        return sum(bench(f) for f in fns) / len(fns)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(fns))
    times.sort()
    return times[len(times) // 2]


def host_time(fn, n: int = 200) -> float:
    """Microseconds of host time per call (launch + wrapper), the GPU kept busy meanwhile."""
    import time
    torch.cuda.synchronize()
    torch.cuda._sleep(int(5e8))          # ~0.25 s of GPU spin so the launch queue never drains
    t = time.perf_counter()
    for _ in range(n):
        fn()
    dt = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return dt


def section(name):
    def deco(fn):
        def run(*a, **kw):
            try:
                return fn(*a, **kw)
            except Exception as e:  # keep going: one broken section must not waste the run
                msg = f"{name}: {type(e).__name__}: {e}"
                print("ERROR", msg, flush=True)
                traceback.print_exc()
                RESULTS["errors"].append(msg[:2000])
        return run
    return deco


# ---------------------------------------------------------------- problem construction
class Paged:
    """B sequences of length L in a paged cache of `sets` disjoint copies (for L2 rotation)."""

    def __init__(self, B: int, L: int, kv: str, sets: int = 1, seed: int = 0):
        torch.manual_seed(seed)
        nb = B * L // PAGE
        self.B, self.L, self.kv, self.sets = B, L, kv, sets
        shape = (nb * sets, PAGE, HKV, D)
        if kv == "fp8":
            self.k_cache = self._fp8(shape)
            self.v_cache = self._fp8(shape)
            self.k_scale = torch.rand(HKV, device=DEV) * 0.02 + 0.01
            self.v_scale = torch.rand(HKV, device=DEV) * 0.02 + 0.01
        else:
            self.k_cache = torch.randn(shape, device=DEV, dtype=torch.bfloat16)
            self.v_cache = torch.randn(shape, device=DEV, dtype=torch.bfloat16)
            self.k_scale = self.v_scale = None
        perm = torch.randperm(nb * sets, device=DEV).to(torch.int32)
        self.tables = [perm[s * nb:(s + 1) * nb].view(B, L // PAGE).contiguous()
                       for s in range(sets)]
        self.seq_lens = torch.full((B,), L, dtype=torch.int32, device=DEV)
        self.q = torch.randn(B, HQ, D, device=DEV, dtype=torch.bfloat16)
        self.kv_bytes = 2 * B * L * HKV * D * self.k_cache.element_size()

    @staticmethod
    def _fp8(shape):
        out = torch.empty(shape, device=DEV, dtype=K.FP8_DTYPE)
        for i in range(0, shape[0], 4096):      # chunked: no fp32 copy of the whole cache
            out[i:i + 4096] = (torch.randn((min(4096, shape[0] - i),) + shape[1:], device=DEV)
                               * 40).clamp(-448, 448).to(K.FP8_DTYPE)
        return out

    def decode(self, s: int = 0, out=None):
        return K.paged_decode_attention(self.q, self.k_cache, self.v_cache, self.tables[s],
                                        self.seq_lens, D ** -0.5, self.k_scale, self.v_scale,
                                        out=out)

    def contiguous(self, s: int = 0):
        """The same K/V as [B, HKV, L, D] bf16 (dequantized for FP8), for SDPA."""
        def gather(cache, scale):
            x = cache[self.tables[s].long()].view(self.B, self.L, HKV, D)
            x = x.float() * scale[None, None, :, None] if scale is not None else x
            return x.to(torch.bfloat16).transpose(1, 2).contiguous()
        return gather(self.k_cache, self.k_scale), gather(self.v_cache, self.v_scale)

    def check(self, out: torch.Tensor, rows: int = 4) -> float:
        """Relative error of out's first/last rows vs the float32 reference."""
        idx = torch.tensor(sorted({0, self.B - 1} | set(range(min(rows, self.B)))), device=DEV)
        ref = K.decode_attention_ref(self.q[idx], self.k_cache, self.v_cache,
                                     self.tables[0][idx], self.seq_lens[idx], D ** -0.5,
                                     self.k_scale, self.v_scale)
        return TESTING.rel_err(out[idx], ref)


def sdpa_decode(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, enable_gqa=True).squeeze(2)


# ---------------------------------------------------------------- sections
@section("ceiling")
def ceiling() -> float:
    a = torch.randn(2 ** 30, device=DEV, dtype=torch.bfloat16)   # 2 GiB
    b = torch.empty_like(a)
    us = bench(lambda: b.copy_(a))
    bw = 2 * a.numel() * 2 / us / 1e6
    RESULTS["copy_TBps"] = bw
    print(f"copy bandwidth (read + write, 2 GiB): {bw:.2f} TB/s", flush=True)
    return bw


@section("decode")
def decode_case(B: int, L: int, kv: str, copy_bw: float, graph: bool):
    sets = max(1, min(16, math.ceil(256e6 / (2 * B * L * HKV * D * (1 if kv == "fp8" else 2)))))
    p = Paged(B, L, kv, sets=sets if graph else 1, seed=B + L)
    out = torch.full_like(p.q, float("nan"))
    p.decode(0, out)
    err = p.check(out)
    assert err < 1e-2, f"decode B={B} L={L} {kv}: rel err {err:.2e} vs reference"
    us = bench(lambda: p.decode(0, out))
    row = dict(B=B, L=L, kv=kv, us=us, TBps=p.kv_bytes / us / 1e6, rel_err=err,
               num_splits=DECODE.plan_decode_splits(B, HKV, L, p.q.device))
    k, v = p.contiguous(0)
    sd = sdpa_decode(p.q, k, v)
    row["sdpa_vs_ours_rel_err"] = TESTING.rel_err(out, sd)
    if kv == "bf16":
        row["sdpa_us"] = bench(lambda: sdpa_decode(p.q, k, v))
        row["sdpa_TBps"] = p.kv_bytes / row["sdpa_us"] / 1e6
        row["ratio_vs_sdpa"] = row["sdpa_us"] / us
    if B == 1 and L == 4096 and not SMOKE:
        row["host_us"] = host_time(lambda: p.decode(0, out))
        if kv == "bf16":
            row["sdpa_host_us"] = host_time(lambda: sdpa_decode(p.q, k, v))
    del k, v
    RESULTS["decode"].append(row)
    print("decode", row, flush=True)
    if graph:
        outs = [torch.empty_like(p.q) for _ in range(sets)]
        g_us = bench_graph([lambda s=s: p.decode(s, outs[s]) for s in range(sets)])
        ideal = p.kv_bytes / (copy_bw * 1e6)
        grow = dict(B=B, L=L, kv=kv, graph_us=g_us, ideal_us=ideal, x_ideal=g_us / ideal,
                    TBps=p.kv_bytes / g_us / 1e6, rotation_sets=sets)
        if kv == "bf16":
            kvs = [p.contiguous(s) for s in range(sets)]
            grow["sdpa_graph_us"] = bench_graph(
                [lambda s=s: sdpa_decode(p.q, *kvs[s]) for s in range(sets)])
            del kvs
        RESULTS["decode_graph"].append(grow)
        print("decode_graph", grow, flush=True)
    del p
    torch.cuda.empty_cache()


@section("flex")
def flex_case(B: int = 8, L: int = 4096):
    """FlexAttention over the physical paged layout: kv_idx is a physical slot; a slot is
    visible to batch b iff its block belongs to b (the block mask skips the others)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    p = Paged(B, L, "bf16", seed=5)
    nb = p.k_cache.shape[0]
    owner = torch.empty(nb, dtype=torch.int32, device=DEV)
    owner[p.tables[0].flatten().long()] = torch.arange(B, device=DEV, dtype=torch.int32
                                                       ).repeat_interleave(L // PAGE)
    # logical order within a sequence does not matter for attention without a causal mask

    def mask_mod(b, h, q_idx, kv_idx):
        return owner[kv_idx // PAGE] == b

    kphys = p.k_cache.view(1, nb * PAGE, HKV, D).transpose(1, 2)    # [1, HKV, slots, D]
    vphys = p.v_cache.view(1, nb * PAGE, HKV, D).transpose(1, 2)
    q = p.q.unsqueeze(2)                                              # [B, HQ, 1, D]
    bm = create_block_mask(mask_mod, B, None, 1, nb * PAGE, device=DEV, BLOCK_SIZE=(16, 128))
    fa = torch.compile(flex_attention)
    kx = kphys.expand(B, -1, -1, -1)
    vx = vphys.expand(B, -1, -1, -1)
    o = fa(q, kx, vx, block_mask=bm, enable_gqa=True).squeeze(2)
    out = torch.empty_like(p.q)
    p.decode(0, out)
    err = TESTING.rel_err(o, out)
    us = bench(lambda: fa(q, kx, vx, block_mask=bm, enable_gqa=True))
    ours = bench(lambda: p.decode(0, out))
    row = dict(B=B, L=L, kv="bf16", flex_us=us, ours_us=ours, flex_TBps=p.kv_bytes / us / 1e6,
               rel_err_vs_ours=err, note="mask block 128 slots (8 pages) on the physical layout")
    RESULTS["flex"].append(row)
    print("flex", row, flush=True)


def extend_problem(B: int, ctx: int, q_len: int, kv: str, seed: int):
    return TESTING.make_paged_case([ctx + q_len] * B, [q_len] * B, HQ, HKV, D, PAGE,
                                   torch.bfloat16, torch.bfloat16 if kv == "bf16" else K.FP8_DTYPE,
                                   device="cpu", seed=seed)


def to_dev(c):
    for f in ("q", "k_cache", "v_cache", "query_start_loc", "seq_lens", "block_tables",
              "k_scale", "v_scale"):
        t = getattr(c, f)
        if t is not None:
            setattr(c, f, t.to(DEV))
    return c


def gpu_case(B: int, ctx: int, q_len: int, kv: str, seed: int):
    """Like make_paged_case but generated on the GPU (fast for 16k tokens); no NaN tails."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    S = ctx + q_len
    nblk = (S + PAGE - 1) // PAGE
    shape = (B * nblk, PAGE, HKV, D)
    if kv == "fp8":
        kc = (torch.randn(shape, device=DEV, generator=g) * 40).clamp(-448, 448).to(K.FP8_DTYPE)
        vc = (torch.randn(shape, device=DEV, generator=g) * 40).clamp(-448, 448).to(K.FP8_DTYPE)
        ks = torch.rand(HKV, device=DEV, generator=g) * 0.02 + 0.01
        vs = torch.rand(HKV, device=DEV, generator=g) * 0.02 + 0.01
    else:
        kc = torch.randn(shape, device=DEV, generator=g, dtype=torch.bfloat16)
        vc = torch.randn(shape, device=DEV, generator=g, dtype=torch.bfloat16)
        ks = vs = None
    tables = torch.randperm(B * nblk, device=DEV, generator=g).to(torch.int32).view(B, nblk)
    q = torch.randn(B * q_len, HQ, D, device=DEV, generator=g, dtype=torch.bfloat16)
    qsl = torch.arange(0, B + 1, device=DEV, dtype=torch.int32) * q_len
    seq_lens = torch.full((B,), S, device=DEV, dtype=torch.int32)
    return types.SimpleNamespace(q=q, k_cache=kc, v_cache=vc, query_start_loc=qsl,
                                 seq_lens=seq_lens, block_tables=tables, k_scale=ks,
                                 v_scale=vs, scale=D ** -0.5, max_query_len=q_len)


def run_extend(c, out=None):
    return K.paged_extend_attention(c.q, c.k_cache, c.v_cache, c.query_start_loc, c.seq_lens,
                                    c.block_tables, c.scale, c.k_scale, c.v_scale,
                                    max_query_len=c.max_query_len, out=out)


def fused_qkv(c, k, v, B: int, q_len: int):
    """q, k, v of the new tokens as views of one [T, (HQ + 2 HKV) * D] buffer (the engine's
    qkv projection output); k, v ([B, HKV, S, D] contiguous, for SDPA) give the new rows."""
    T = B * q_len
    buf = torch.empty(T, (HQ + 2 * HKV) * D, device=DEV, dtype=torch.bfloat16)
    qn = buf[:, :HQ * D].view(T, HQ, D)
    kn = buf[:, HQ * D:(HQ + HKV) * D].view(T, HKV, D)
    vn = buf[:, (HQ + HKV) * D:].view(T, HKV, D)
    qn.copy_(c.q)
    kn.copy_(k[:, :, -q_len:].transpose(1, 2).reshape(T, HKV, D))
    vn.copy_(v[:, :, -q_len:].transpose(1, 2).reshape(T, HKV, D))
    return qn, kn, vn


def run_new(c, qkv, out=None, quantize_new_kv=True):
    return K.paged_prefill_attention(qkv[0], qkv[1], qkv[2], c.k_cache, c.v_cache,
                                     c.query_start_loc, c.seq_lens, c.block_tables, c.scale,
                                     c.k_scale, c.v_scale, max_query_len=c.max_query_len,
                                     out=out, quantize_new_kv=quantize_new_kv)


NEW_TILE_NAMES = ("BLOCK_M", "BLOCK_N", "NUM_WARPS", "NUM_STAGES", "USE_TMA")


def new_tiles() -> tuple:
    return tuple(getattr(PREFILL, n) for n in NEW_TILE_NAMES)


def set_new_tiles(cfg: tuple) -> None:
    for name, value in zip(NEW_TILE_NAMES, cfg):
        setattr(PREFILL, name, value)


def contiguous_kv(c, B, S):
    def gather(cache, scale):
        x = cache[c.block_tables.long()].view(B, -1, HKV, D)[:, :S]
        x = x.float() * scale[None, None, :, None] if scale is not None else x
        return x.to(torch.bfloat16).transpose(1, 2).contiguous()
    return gather(c.k_cache, c.k_scale), gather(c.v_cache, c.v_scale)


def sdpa_extend(q, k, v, q_len, S):
    from torch.nn.attention.bias import causal_lower_right
    if q_len == S:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                enable_gqa=True)
    # lower-right causal bias; expand GQA heads up front (the bias path may lack enable_gqa)
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=causal_lower_right(q_len, S))


@section("extend")
def extend_case(B: int, ctx: int, q_len: int, kv: str, kind: str):
    c = gpu_case(B, ctx, q_len, kv, seed=ctx + q_len + B)
    S = ctx + q_len
    out = torch.full_like(c.q, float("nan"))
    run_extend(c, out)
    k, v = contiguous_kv(c, B, S)
    qkv = fused_qkv(c, k, v, B, q_len)
    qb = c.q.view(B, q_len, HQ, D).transpose(1, 2)
    if q_len != S:
        k, v = (x.repeat_interleave(HQ // HKV, dim=1) for x in (k, v))
    ref_sd = sdpa_extend(qb, k, v, q_len, S).transpose(1, 2).reshape(-1, HQ, D)
    err_sdpa = TESTING.rel_err(out, ref_sd)
    out_new = torch.full_like(c.q, float("nan"))
    run_new(c, qkv, out_new)
    err_new_sdpa = TESTING.rel_err(out_new, ref_sd)
    err = err_new = None
    if B * q_len * S <= 4096 * 4096:   # float32 reference fits comfortably
        meta = (c.query_start_loc, c.seq_lens, c.block_tables, c.scale, c.k_scale, c.v_scale)
        err = TESTING.rel_err(out, K.paged_attention_ref(c.q, c.k_cache, c.v_cache, *meta))
        err_new = TESTING.rel_err(out_new, K.prefill_attention_ref(*qkv, c.k_cache, c.v_cache,
                                                                   *meta))
        assert err < 1e-2, f"{kind} B={B} ctx={ctx} q={q_len} {kv}: rel err {err:.2e}"
        assert err_new < 1e-2, f"{kind} B={B} ctx={ctx} q={q_len} {kv}: new rel err {err_new:.2e}"
    assert err_sdpa < 2e-2, f"{kind} vs SDPA rel err {err_sdpa:.2e}"
    assert err_new_sdpa < 2e-2, f"{kind} new kernel vs SDPA rel err {err_new_sdpa:.2e}"
    flops = 4 * B * HQ * D * q_len * (ctx + (q_len + 1) / 2)
    us = bench(lambda: run_extend(c, out))
    row = dict(B=B, ctx=ctx, q_len=q_len, kv=kv, us=us, TFLOPs=flops / us / 1e6,
               rel_err=err, rel_err_vs_sdpa=err_sdpa,
               tiles=(EXTEND.BLOCK_M, EXTEND.BLOCK_N, EXTEND.NUM_WARPS, EXTEND.NUM_STAGES))
    row["new_us"] = bench(lambda: run_new(c, qkv, out_new))
    row.update(new_TFLOPs=flops / row["new_us"] / 1e6, new_rel_err=err_new,
               new_rel_err_vs_sdpa=err_new_sdpa, new_tiles=new_tiles())
    if kv == "fp8":   # the new tokens unquantized (quantize_new_kv=False)
        row["new_unquantized_us"] = bench(lambda: run_new(c, qkv, out_new, False))
    if kv == "bf16":
        row["sdpa_us"] = bench(lambda: sdpa_extend(qb, k, v, q_len, S))
        row["sdpa_TFLOPs"] = flops / row["sdpa_us"] / 1e6
        row["ratio_vs_sdpa"] = row["sdpa_us"] / us
        row["new_ratio_vs_sdpa"] = row["sdpa_us"] / row["new_us"]
    RESULTS[kind].append(row)
    print(kind, row, flush=True)
    del c, k, v, qkv
    torch.cuda.empty_cache()


# ---------------------------------------------------------------- tuning
def _pick(kernel: str) -> tuple:
    """The config whose times, each over its case's best, sum lowest."""
    rows = [r for r in RESULTS["tune"] if r["kernel"] == kernel and "us" in r]
    best: dict = {}
    for r in rows:
        best[r["case"]] = min(best.get(r["case"], float("inf")), r["us"])
    score: dict = {}
    for r in rows:
        score[r["cfg"]] = score.get(r["cfg"], 0.0) + r["us"] / best[r["case"]]
    return min(score, key=score.get)


def _sweep(kernel: str, cfgs, apply, cases, outs) -> tuple:
    for cfg in cfgs[:2] if SMOKE else cfgs:
        apply(cfg)
        for key, p in cases.items():
            o = outs[key]
            try:
                t = (bench(lambda: p.decode(0, o[0])) if p.sets == 1 else
                     bench_graph([lambda s=s: p.decode(s, o[s]) for s in range(p.sets)]))
                err = p.check(o[0])
                assert err < 1e-2, f"rel err {err:.2e}"
            except Exception as e:  # e.g. out of shared memory for a config
                RESULTS["tune"].append(dict(kernel=kernel, cfg=cfg, case=key, error=str(e)[:300]))
                print("tune", kernel, cfg, key, "failed:", str(e)[:200], flush=True)
                continue
            RESULTS["tune"].append(dict(kernel=kernel, cfg=cfg, case=key, us=t,
                                        TBps=p.kv_bytes / t / 1e6, rel_err=err))
            print("tune", kernel, cfg, key, f"{t:.1f} us", flush=True)
    cfg = _pick(kernel)
    apply(cfg)
    return cfg


@section("tune-decode")
def tune_decode():
    L = 64 if SMOKE else 4096

    def make(kv, pairs):   # B=64 timed eagerly; B<=8 in a graph over rotated copies
        cases = {(B, L, kv): Paged(B, L, kv, sets=sets, seed=B) for B, sets in pairs}
        return cases, {k: [torch.empty_like(p.q) for _ in range(p.sets)]
                       for k, p in cases.items()}

    bf, bf_out = make("bf16", [(64, 1), (8, 2), (1, 16)])
    fp, fp_out = make("fp8", [(64, 1), (8, 4), (1, 16)])

    def tiles16(c):
        DECODE.TILES_16BIT = c

    def tiles8(c):
        DECODE.TILES_FP8 = c[:3]
        DECODE.FP8_FP16_COMPUTE = c[3]

    _sweep("decode-tiles-bf16", [(32, 5, 4), (32, 4, 4), (32, 6, 4), (64, 3, 4), (128, 2, 4),
                                 (16, 8, 4)], tiles16, bf, bf_out)
    _sweep("decode-tiles-fp8", [(64, 4, 4, True), (32, 5, 4, True), (64, 3, 4, True),
                                (128, 3, 4, True), (128, 4, 8, True), (64, 6, 4, True),
                                (64, 4, 4, False), (128, 3, 4, False)], tiles8, fp, fp_out)

    def split(c):
        DECODE.PROGRAMS_PER_SM, DECODE.MIN_CHUNK = c

    both = {**bf, **fp}
    _sweep("decode-split", [(2, 256), (4, 128), (2, 128), (8, 128), (2, 512), (1, 256)],
           split, both, {**bf_out, **fp_out})
    best = dict(TILES_16BIT=DECODE.TILES_16BIT, TILES_FP8=DECODE.TILES_FP8,
                FP8_FP16_COMPUTE=DECODE.FP8_FP16_COMPUTE, PROGRAMS_PER_SM=DECODE.PROGRAMS_PER_SM,
                MIN_CHUNK=DECODE.MIN_CHUNK)
    RESULTS["decode_config"] = best
    print("decode config chosen:", best, flush=True)
    del bf, fp, both, bf_out, fp_out
    torch.cuda.empty_cache()


@section("tune-prefill")
def tune_prefill():
    L, ctx, q_len = (40, 40, 8) if SMOKE else (4096, 4096, 512)
    c = gpu_case(1, 0, L, "bf16", seed=4)
    ce = gpu_case(4, ctx, q_len, "bf16", seed=5)
    out, oute = torch.empty_like(c.q), torch.empty_like(ce.q)
    results = {}
    for cfg in [(64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 4, 2), (128, 128, 8, 2),
                (128, 64, 8, 3), (64, 128, 4, 3), (64, 32, 4, 4), (128, 128, 8, 3)][
                    :2 if SMOKE else None]:
        EXTEND.BLOCK_M, EXTEND.BLOCK_N, EXTEND.NUM_WARPS, EXTEND.NUM_STAGES = cfg
        try:
            t = bench(lambda: run_extend(c, out))
            te = bench(lambda: run_extend(ce, oute))
        except Exception as e:
            RESULTS["tune"].append(dict(kernel="extend", cfg=cfg, error=str(e)[:300]))
            continue
        flops = 4 * HQ * D * L * (L + 1) / 2
        flops_e = 4 * 4 * HQ * D * q_len * (ctx + (q_len + 1) / 2)
        RESULTS["tune"].append(dict(kernel="extend", cfg=cfg, prefill_us=t,
                                    prefill_TFLOPs=flops / t / 1e6, extend_us=te,
                                    extend_TFLOPs=flops_e / te / 1e6))
        results[cfg] = (t, te)
        print("tune extend", cfg, f"prefill {flops / t / 1e6:.0f} TFLOP/s, "
              f"extend {flops_e / te / 1e6:.0f} TFLOP/s", flush=True)
    best_p = min(v[0] for v in results.values())
    best_e = min(v[1] for v in results.values())
    cfg = min(results, key=lambda k: results[k][0] / best_p + results[k][1] / best_e)
    EXTEND.BLOCK_M, EXTEND.BLOCK_N, EXTEND.NUM_WARPS, EXTEND.NUM_STAGES = cfg
    RESULTS["extend_config"] = dict(BLOCK_M=cfg[0], BLOCK_N=cfg[1], NUM_WARPS=cfg[2],
                                    NUM_STAGES=cfg[3])
    c8 = gpu_case(4, ctx, q_len, "fp8", seed=6)
    out8 = torch.empty_like(c8.q)
    fp16 = {}
    for flag in (True, False):
        EXTEND.FP8_FP16_COMPUTE = flag
        fp16[flag] = bench(lambda: run_extend(c8, out8))
        RESULTS["tune"].append(dict(kernel="extend-fp8-compute", cfg=("fp16" if flag else "bf16"),
                                    extend_us=fp16[flag]))
        print("tune extend fp8 fp16-compute", flag, f"{fp16[flag]:.1f} us", flush=True)
    EXTEND.FP8_FP16_COMPUTE = fp16[True] <= fp16[False]
    RESULTS["extend_config"]["FP8_FP16_COMPUTE"] = EXTEND.FP8_FP16_COMPUTE
    print("extend config chosen:", RESULTS["extend_config"], flush=True)
    del c, ce, c8
    torch.cuda.empty_cache()


@section("tune-prefill-new")
def tune_prefill_new():
    """paged_prefill_attention's tiles (NEW_TILE_NAMES) on a causal 8k prefill and a
    4 x (4096 cached + 512 new) extend; checked against SDPA per config."""
    cases = {}
    for key, (B, ctx, q_len) in (("prefill", (1, 0, 40 if SMOKE else 8192)),
                                 ("extend", (2, 40, 8) if SMOKE else (4, 4096, 512))):
        c = gpu_case(B, ctx, q_len, "bf16", seed=7)
        k, v = contiguous_kv(c, B, ctx + q_len)
        qkv = fused_qkv(c, k, v, B, q_len)
        if ctx:
            k, v = (x.repeat_interleave(HQ // HKV, dim=1) for x in (k, v))
        ref = sdpa_extend(c.q.view(B, q_len, HQ, D).transpose(1, 2), k, v, q_len, ctx + q_len)
        flops = 4 * B * HQ * D * q_len * (ctx + (q_len + 1) / 2)
        cases[key] = (c, qkv, ref.transpose(1, 2).reshape(-1, HQ, D), flops)
        del k, v
    # all fit the H200's 227 KiB of shared memory (compiled for sm_90 with Triton 3.9)
    cfgs = [(128, 64, 8, 3, False), (128, 64, 8, 4, False), (128, 128, 8, 2, False),
            (128, 128, 8, 3, False), (64, 64, 4, 3, False), (128, 64, 4, 3, False),
            (128, 128, 8, 2, True), (128, 128, 8, 3, True), (128, 64, 8, 4, True),
            (128, 64, 8, 3, True)]
    default = new_tiles()
    for cfg in [cfgs[0], cfgs[-1]] if SMOKE else cfgs:
        set_new_tiles(cfg)
        rows = []
        try:   # e.g. out of shared memory for a config: it fails as a whole
            for key, (c, qkv, ref, flops) in cases.items():
                out = torch.full_like(c.q, float("nan"))
                run_new(c, qkv, out)
                err = TESTING.rel_err(out, ref)
                assert err < 2e-2, f"{key}: rel err {err:.2e} vs SDPA"
                t = bench(lambda: run_new(c, qkv, out))
                rows.append(dict(kernel="prefill-new", cfg=cfg, case=key, us=t,
                                 TFLOPs=flops / t / 1e6, rel_err=err))
                print("tune prefill-new", cfg, key, f"{flops / t / 1e6:.0f} TFLOP/s", flush=True)
        except Exception as e:
            RESULTS["tune"].append(dict(kernel="prefill-new", cfg=cfg,
                                        error=f"{type(e).__name__}: {str(e)[:300]}"))
            print("tune prefill-new", cfg, "failed:", str(e)[:200], flush=True)
            continue
        RESULTS["tune"].extend(rows)
    ok = any(r["kernel"] == "prefill-new" and "us" in r for r in RESULTS["tune"])
    cfg = _pick("prefill-new") if ok else default
    set_new_tiles(cfg)
    RESULTS["prefill_config"] = dict(zip(NEW_TILE_NAMES, cfg))
    print("prefill config chosen:", RESULTS["prefill_config"], flush=True)
    del cases
    if not SMOKE:
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- report
def decode_table() -> list[str]:
    lines = ["", "decode (KV read TB/s; ratio = SDPA time / ours)",
             f"{'B':>4} {'L':>7} {'kv':>5} {'us':>9} {'TB/s':>6} {'SDPA us':>9} {'SDPA TB/s':>9}"
             f" {'ratio':>6} {'splits':>6}"]
    for r in RESULTS["decode"]:
        lines.append(f"{r['B']:>4} {r['L']:>7} {r['kv']:>5} {r['us']:>9.1f} {r['TBps']:>6.2f} "
                     f"{r.get('sdpa_us', float('nan')):>9.1f} "
                     f"{r.get('sdpa_TBps', float('nan')):>9.2f} "
                     f"{r.get('ratio_vs_sdpa', float('nan')):>6.2f} {r['num_splits']:>6}")
    bf = {(r["B"], r["L"]): r["us"] for r in RESULTS["decode"] if r["kv"] == "bf16"}
    for r in RESULTS["decode"]:
        if r["kv"] == "fp8" and (r["B"], r["L"]) in bf:
            lines.append(f"  fp8 speed-up over bf16 at B={r['B']} L={r['L']}: "
                         f"{bf[(r['B'], r['L'])] / r['us']:.2f}x")
    lines += ["", "decode in a CUDA graph (ideal = KV bytes / copy bandwidth)",
              f"{'B':>4} {'L':>7} {'kv':>5} {'graph us':>9} {'ideal us':>9} {'x ideal':>8}"
              f" {'SDPA graph us':>13}"]
    for r in RESULTS["decode_graph"]:
        lines.append(f"{r['B']:>4} {r['L']:>7} {r['kv']:>5} {r['graph_us']:>9.1f} "
                     f"{r['ideal_us']:>9.1f} {r['x_ideal']:>8.2f} "
                     f"{r.get('sdpa_graph_us', float('nan')):>13.1f}")
    return lines


def table() -> str:
    lines = decode_table() if RESULTS["decode"] else []
    nan = float("nan")
    for kind in ("prefill", "extend"):
        lines += ["", f"{kind} (TFLOP/s, causal counted as half; paged = paged_extend_attention,"
                  " new = paged_prefill_attention; ratio = SDPA time / ours)",
                  f"{'B':>4} {'ctx':>6} {'q_len':>6} {'kv':>5} {'paged us':>9} {'TFLOP/s':>8}"
                  f" {'new us':>9} {'TFLOP/s':>8} {'SDPA':>8} {'ratio':>6} {'new ratio':>9}"]
        for r in RESULTS[kind]:
            lines.append(f"{r['B']:>4} {r['ctx']:>6} {r['q_len']:>6} {r['kv']:>5} "
                         f"{r['us']:>9.1f} {r['TFLOPs']:>8.1f} "
                         f"{r.get('new_us', nan):>9.1f} {r.get('new_TFLOPs', nan):>8.1f} "
                         f"{r.get('sdpa_TFLOPs', nan):>8.1f} "
                         f"{r.get('ratio_vs_sdpa', nan):>6.2f} "
                         f"{r.get('new_ratio_vs_sdpa', nan):>9.2f}")
    if "prefill_config" in RESULTS:
        lines.append(f"new kernel tiles: {RESULTS['prefill_config']}")
    for r in RESULTS["flex"]:
        lines.append(f"\nflex paged decode B={r['B']} L={r['L']}: {r['flex_us']:.1f} us "
                     f"({r['flex_TBps']:.2f} TB/s) vs ours {r['ours_us']:.1f} us")
    if RESULTS["errors"]:
        lines += ["", "ERRORS:"] + [f"  {e[:300]}" for e in RESULTS["errors"]]
    return "\n".join(lines)


def prefill_markdown() -> str:
    """The prefill/extend rows as the markdown table of bench/results/kernels.md, with the
    paged_prefill_attention ("new") columns beside paged_extend_attention ("paged")."""
    def f(r, key, fmt):
        return format(r[key], fmt) if r.get(key) is not None else ""
    lines = ["| B | cached ctx | new tokens | kv | paged us | paged TFLOP/s | new us | "
             "new TFLOP/s | SDPA TFLOP/s | paged ratio | new ratio |",
             "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in RESULTS["prefill"] + RESULTS["extend"]:
        lines.append(f"| {r['B']} | {r['ctx']} | {r['q_len']} | {r['kv']} | {f(r, 'us', '.1f')} | "
                     f"{f(r, 'TFLOPs', '.0f')} | {f(r, 'new_us', '.1f')} | "
                     f"{f(r, 'new_TFLOPs', '.0f')} | {f(r, 'sdpa_TFLOPs', '.0f')} | "
                     f"{f(r, 'ratio_vs_sdpa', '.2f')} | {f(r, 'new_ratio_vs_sdpa', '.2f')} |")
    return "\n".join(lines) + f"\n\nnew kernel tiles: {RESULTS.get('prefill_config')}\n"


def save() -> None:
    out_dir = Path(os.environ.get("OUT", REPO / "bench" / "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "kernels.json" if "OUT" in os.environ else "kernels-latest.json"
    (out_dir / name).write_text(json.dumps(RESULTS, indent=1, default=str))
    (out_dir / name.replace(".json", "-table.txt")).write_text(table() + "\n")
    if RESULTS["prefill"] or RESULTS["extend"]:
        (out_dir / name.replace(".json", "-prefill.md")).write_text(prefill_markdown())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tune", action="store_true", help="sweep tiles/splits first, use the best")
    ap.add_argument("--quick", action="store_true", help="skip the largest cases and flex")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    ap.add_argument("--only", choices=("decode", "prefill"),
                    help="run one part: decode (+ flex) or prefill/extend (+ their tuning)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU dry run with tiny shapes under the Triton interpreter")
    ap.add_argument("--commit", default=os.environ.get("COMMIT", "unknown"))
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    RESULTS["meta"] = dict(date=datetime.date.today().isoformat(), commit=args.commit,
                           gpu="cpu-smoke" if SMOKE else torch.cuda.get_device_name(),
                           torch=torch.__version__,
                           triton=triton.__version__, command=" ".join(sys.argv))
    print(RESULTS["meta"], flush=True)
    decode, prefill = args.only in (None, "decode"), args.only in (None, "prefill")
    bw = 4.24 if SMOKE or not decode else (ceiling() or 4.24)
    if args.tune and decode:
        tune_decode()
    if args.tune and args.only is None:
        tune_prefill()
    if (args.tune or SMOKE) and prefill:
        tune_prefill_new()
    RESULTS.setdefault("decode_config", dict(
        TILES_16BIT=DECODE.TILES_16BIT, TILES_FP8=DECODE.TILES_FP8,
        FP8_FP16_COMPUTE=DECODE.FP8_FP16_COMPUTE, PROGRAMS_PER_SM=DECODE.PROGRAMS_PER_SM,
        MIN_CHUNK=DECODE.MIN_CHUNK))
    RESULTS.setdefault("extend_config", dict(BLOCK_M=EXTEND.BLOCK_M, BLOCK_N=EXTEND.BLOCK_N,
                                             NUM_WARPS=EXTEND.NUM_WARPS,
                                             NUM_STAGES=EXTEND.NUM_STAGES))
    RESULTS.setdefault("prefill_config", dict(zip(NEW_TILE_NAMES, new_tiles())))
    if decode:
        decode_part(args, bw)
    if prefill:
        prefill_part(args)
    if decode and not (args.quick or args.no_flex or SMOKE):
        flex_case()              # last: its torch.compile is the slowest and least certain
        save()
    print(table(), flush=True)


def decode_part(args, bw: float) -> None:
    shapes = [(1, 4096), (8, 4096), (64, 4096), (64, 16384), (256, 2048), (1, 131072)]
    if args.quick:
        shapes = shapes[:3]
    if SMOKE:
        shapes = [(1, 64), (3, 48)]
    for B, L in shapes:
        for kv in ("bf16", "fp8"):
            decode_case(B, L, kv, bw, graph=B <= 8)
    save()


def prefill_part(args) -> None:
    for L in ([40] if SMOKE else [4096] if args.quick else [4096, 8192, 16384]):
        extend_case(1, 0, L, "bf16", "prefill")
    for B, ctx, q_len in ([(1, 50, 20), (2, 33, 9)] if SMOKE else
                          [(1, 8192, 1024), (8, 4096, 512)]):
        for kv in ("bf16", "fp8"):
            extend_case(B, ctx, q_len, kv, "extend")
    save()


if __name__ == "__main__":
    main()
