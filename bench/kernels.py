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

This file holds the decode and flex sections, the decode tuning, the report and main; the shared
setup, timers and RESULTS are in bench/kbench.py, the prefill/extend cases, their tuning and
markdown in bench/kernels_prefill.py.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from pathlib import Path

import torch

# bench/ is not a package: its siblings must import both when this runs as a script and when
# it is loaded by path (bench/decode_sweep.py does, and reads its names off this module)
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from kbench import (D, DECODE, DEV, EXTEND, HKV, HQ, PAGE, REPO, RESULTS,  # noqa: E402
                    SMOKE, TESTING, K, _pick, bench, bench_graph, host_time, section)
from kernels_prefill import (NEW_TILE_NAMES, extend_case, new_tiles,  # noqa: E402
                             prefill_markdown, tune_prefill, tune_prefill_new)
import triton  # noqa: E402  (after kbench: --smoke sets TRITON_INTERPRET first)


# ---------------------------------------------------------------- problem construction
class Paged:
    """B sequences of length L in a paged cache of `sets` disjoint copies (for L2 rotation)."""

    def __init__(self, B: int, L: int, kv: str, sets: int = 1, seed: int = 0, page: int | None = None):
        """kv: bf16, fp8 (V pages token-minor, as the engine stores FP8), or fp8-tmaj (V pages
        token-major like K: the layout before token-minor V, kept as the same-run baseline)."""
        torch.manual_seed(seed)
        page = page or PAGE          # the module's PAGE at call time (decode_sweep.py sets it)
        nb = B * L // page
        self.B, self.L, self.kv, self.sets = B, L, kv, sets
        shape = (nb * sets, page, HKV, D)
        if kv.startswith("fp8"):
            self.k_cache = self._fp8(shape)
            self.v_cache = self._fp8(shape)
            if kv == "fp8":
                self.v_cache = K.token_minor_v(self.v_cache)   # random values either way
            self.k_scale = torch.rand(HKV, device=DEV) * 0.02 + 0.01
            self.v_scale = torch.rand(HKV, device=DEV) * 0.02 + 0.01
        else:
            self.k_cache = torch.randn(shape, device=DEV, dtype=torch.bfloat16)
            self.v_cache = torch.randn(shape, device=DEV, dtype=torch.bfloat16)
            self.k_scale = self.v_scale = None
        perm = torch.randperm(nb * sets, device=DEV).to(torch.int32)
        self.tables = [perm[s * nb:(s + 1) * nb].view(B, L // page).contiguous()
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

    def decode(self, s: int = 0, out=None, scratch=None):
        """scratch: a preallocated split-KV scratch (as the engine keeps one), else per call."""
        splits = None if scratch is None else scratch.part_lse.shape[-1]
        return K.paged_decode_attention(self.q, self.k_cache, self.v_cache, self.tables[s],
                                        self.seq_lens, D ** -0.5, self.k_scale, self.v_scale,
                                        out=out, num_splits=splits, scratch=scratch)

    def scratches(self) -> list:
        """One split-KV scratch per cache copy for the planned split count (None: one split)."""
        splits = K.plan_decode_splits(self.B, HKV, self.L, self.q.device,
                                      fp8=self.kv.startswith("fp8"))
        return [K.alloc_split_kv_scratch(self.B, HQ, D, splits, self.q.device) if splits > 1
                else None for _ in range(self.sets)]

    def contiguous(self, s: int = 0):
        """The same K/V as [B, HKV, L, D] bf16 (dequantized for FP8), for SDPA."""
        def gather(cache, scale):
            x = cache[self.tables[s].long()].reshape(self.B, self.L, HKV, D)
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
    sets = max(1, min(16, math.ceil(256e6 / (2 * B * L * HKV * D * (1 if kv.startswith("fp8") else 2)))))
    p = Paged(B, L, kv, sets=sets if graph else 1, seed=B + L)
    out = torch.full_like(p.q, float("nan"))
    p.decode(0, out)
    err = p.check(out)
    assert err < 1e-2, f"decode B={B} L={L} {kv}: rel err {err:.2e} vs reference"
    us = bench(lambda: p.decode(0, out))
    row = dict(B=B, L=L, kv=kv, us=us, TBps=p.kv_bytes / us / 1e6, rel_err=err,
               num_splits=DECODE.plan_decode_splits(B, HKV, L, p.q.device, fp8=kv.startswith("fp8")))
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
    k = v = None   # free them (the timing lambdas hold them; not del: pyflakes)
    RESULTS["decode"].append(row)
    print("decode", row, flush=True)
    if graph:
        outs = [torch.empty_like(p.q) for _ in range(sets)]
        scr = p.scratches()     # preallocated as in the engine: no scratch memset in the graph
        g_us = bench_graph([lambda s=s: p.decode(s, outs[s], scr[s]) for s in range(sets)])
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
    p = None
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


# ---------------------------------------------------------------- tuning
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
        if r["kv"].startswith("fp8") and (r["B"], r["L"]) in bf:
            lines.append(f"  {r['kv']} speed-up over bf16 at B={r['B']} L={r['L']}: "
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
        # fp8-tmaj (token-major V pages, the old FP8 layout): the same-run baseline at B=64
        for kv in ("bf16", "fp8") + (("fp8-tmaj",) if B == 64 or SMOKE else ()):
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
