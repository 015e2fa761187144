#!/usr/bin/env python3
"""Small-M fused linear kernels (kernels/gemv.py) against cuBLAS + the separate glue kernels.

    python3 bench/gemv.py --out DIR            # H200: < 4 minutes
    python3 bench/gemv.py --out DIR --smoke    # CPU dry run of every section (Triton interpreter)

Sections (each checks the fused result against the unfused one first):
  ceiling  device-to-device copy bandwidth (bytes read + written): the HBM ceiling
  shapes   Llama-3-8B bf16 layer shapes, qkv (norm + residual), o, gate_up (norm + residual +
           SiLU-mul), down, at M in 1, 8, 16, 32 tokens: cuBLAS F.linear alone, the current
           chain (rms_norm -> F.linear [-> silu_and_mul]) and the fused kernel over a small
           tile sweep (the best is reported beside every config). TB/s counts weight bytes only.
  chain    one layer's glue chain per CUDA graph, over 8 layers of distinct weights, at M 1 and
           8: current (rms_norm, qkv, o, rms_norm, gate_up, silu_and_mul, down; attention left
           out) vs fused (norm_linear, gemv, norm_linear+silu, gemv), us per layer.
Timing: CUDA graphs that call the op once per weight copy (copies sized so they exceed the
60 MB L2 several times), median of 20 replays, us per call. Writes DIR/gemv.json and DIR/gemv.md.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
import traceback
import types
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"


def import_kernels():
    """splitserve.kernels from this checkout, installed or not (the device has no install)."""
    try:
        importlib.import_module("splitserve.kernels")
    except ImportError:
        pkg = types.ModuleType("splitserve")
        pkg.__path__ = [str(REPO / "splitserve"), str(REPO)]   # kernels/ -> splitserve.kernels
        sys.modules["splitserve"] = pkg
    import splitserve.kernels as kernels
    import splitserve.kernels.gemv as gemv_mod
    import splitserve.kernels.testing as testing
    return kernels, gemv_mod, testing


K, GEMV, TESTING = import_kernels()
Tile = GEMV.Tile
DEV = "cpu" if SMOKE else "cuda"
DT = torch.bfloat16
EPS = 1e-5
if SMOKE:
    TESTING.patch_interpreter_bf16_dot()
# name -> (weight rows N, K, role); gate_up's N is both halves
SHAPES = ({"qkv": (96, 64, "norm"), "o": (64, 64, "plain"), "gate_up": (160, 64, "silu"),
           "down": (64, 80, "plain")} if SMOKE else
          {"qkv": (6144, 4096, "norm"), "o": (4096, 4096, "plain"),
           "gate_up": (2 * 14336, 4096, "silu"), "down": (4096, 14336, "plain")})
MS = (1, 8) if SMOKE else (1, 8, 16, 32)
SWEEP = {   # per M, after the kernel kind's default (kernels/gemv.py TILES); sm_90 builds: only
    # (16, 512, 4, 4, False) spills, with silu (two accumulators)
    1: [Tile(16, 512, 4, 4, False), Tile(8, 1024, 4, 4, False), Tile(32, 256, 8, 4, False),
        Tile(8, 512, 4, 4, False), Tile(32, 128, 4, 4, False), Tile(16, 512, 4, 4, True)],
    8: [Tile(16, 256, 4, 4, True), Tile(32, 128, 4, 4, True), Tile(64, 128, 4, 3, True),
        Tile(32, 256, 8, 4, True), Tile(16, 512, 4, 3, True)],
    32: [Tile(32, 128, 4, 3, True), Tile(64, 128, 4, 3, True)],
}
SWEEP[16] = SWEEP[8]
WIDE_M1 = [Tile(bn, bk, w, st, False) for bn, bk, w, st in (   # --m1-wide (one token)
    (8, 512, 4, 4), (8, 1024, 4, 4), (8, 512, 4, 6), (8, 256, 4, 6), (4, 1024, 4, 4),
    (16, 256, 4, 4), (16, 256, 4, 6), (16, 512, 4, 4), (16, 128, 4, 6), (32, 128, 4, 4),
    (32, 128, 4, 6), (32, 64, 4, 6), (64, 64, 4, 4), (64, 64, 4, 6), (16, 512, 8, 4),
    (32, 256, 4, 4), (8, 512, 2, 4))]
if SMOKE:
    SWEEP = {m: [Tile(16, 32, 4, 2, False), Tile(16, 64, 4, 2, True)] for m in MS}
SWEEP_BUDGET_S = 150     # past this, only the default tile is timed (the whole run must stay < 4 min)
T0 = time.perf_counter()
RESULTS: dict = {"shapes": [], "chain": [], "errors": []}


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def time_graph(fns, replays: int = 20) -> float:
    """Median microseconds per fn of a CUDA graph that calls each of fns once."""
    if SMOKE:
        t = time.perf_counter()
        for f in fns:
            f()
        return (time.perf_counter() - t) * 1e6 / len(fns)
    return TESTING.graph_time_us(fns, replays)


def section(fn):
    def run(*a, **kw):
        try:
            return fn(*a, **kw)
        except Exception as e:   # keep going: one broken section must not waste the run
            msg = f"{fn.__name__}: {type(e).__name__}: {e}"
            log("ERROR " + msg)
            traceback.print_exc()
            RESULTS["errors"].append(msg[:2000])
    return run


def rand(*shape, scale=1.0):
    return (torch.randn(*shape, device=DEV) * scale).to(DT)


def copies_for(nbytes: int) -> int:
    """Weight copies per graph so that one replay streams >= 300 MB (5x the L2)."""
    return 2 if SMOKE else max(2, min(12, math.ceil(300e6 / nbytes)))


@section
def ceiling() -> float:
    n = 2 ** 20 if SMOKE else 2 ** 30
    a = torch.randn(n, device=DEV, dtype=DT)
    b = torch.empty_like(a)
    us = time_graph([lambda: b.copy_(a)] * 4)
    bw = 2 * a.numel() * a.element_size() / us / 1e6
    log(f"copy ceiling: {bw:.2f} TB/s")
    RESULTS["ceiling_tbs"] = bw
    return bw


class Problem:
    """One shape at M tokens: C weight copies, inputs, outputs, and the ops to time."""

    def __init__(self, name: str, m: int):
        self.name, self.m = name, m
        self.n, self.k, self.role = SHAPES[name]
        wbytes = self.n * self.k * 2
        self.ws = [rand(self.n, self.k, scale=self.k ** -0.5) for _ in range(copies_for(wbytes))]
        self.wbytes = wbytes
        self.x, self.res, self.ln = rand(m, self.k), rand(m, self.k), (1 + rand(self.k, scale=0.2).float()).to(DT)
        self.res_out = torch.empty_like(self.res)
        self.n_out = self.n // 2 if self.role == "silu" else self.n
        self.out = torch.empty(m, self.n_out, device=DEV, dtype=DT)

    def cublas(self, w):
        return F.linear(self.x, w)

    def current(self, w, res=None):
        """What the engine's fused path runs today: rms_norm(+residual) -> F.linear -> silu_and_mul."""
        if self.role == "plain":
            return F.linear(self.x, w)
        h = K.rms_norm(self.x, self.ln, EPS, residual=self.res if res is None else res)
        y = F.linear(h, w)
        return K.silu_and_mul(y) if self.role == "silu" else y

    def fused(self, w, tile=None):
        if self.role == "plain":
            return K.gemv_linear(self.x, w, out=self.out, tile=tile)
        return K.norm_linear(self.x, self.ln, EPS, w, self.res, self.res_out, silu=self.role == "silu",
                             out=self.out, tile=tile)

    def check(self) -> dict:
        want = self.current(self.ws[0], res=self.res.clone()).float()
        got = self.fused(self.ws[0]).float()
        ulp = (want.abs().clamp_min(2.0 ** -14) * 2.0 ** -7)
        return {"rel_err": TESTING.rel_err(got, want), "max_ulps": float(((got - want).abs() / ulp).max()),
                "bit_equal": float((got == want).float().mean())}


@section
def shape_case(name: str, m: int, bw: float) -> None:
    p = Problem(name, m)
    row = {"shape": name, "M": m, "N": p.n, "K": p.k, "weight_MB": p.wbytes / 1e6, "copies": len(p.ws)}
    row.update(p.check())
    if row["rel_err"] > 1e-2:
        raise RuntimeError(f"{name} M={m}: fused differs from the current path: {row}")

    def t(op) -> dict:
        us = time_graph([lambda w=w: op(w) for w in p.ws])
        return {"us": us, "tbs": p.wbytes / us / 1e6, "of_ceiling": p.wbytes / us / 1e6 / bw}
    row["cublas"] = t(p.cublas)
    row["current"] = t(p.current)
    default = GEMV.tile_for(m, p.role)
    tiles = [default] + [c for c in SWEEP.get(m, []) if c != default]
    if time.perf_counter() - T0 > SWEEP_BUDGET_S:
        tiles = tiles[:1]
    row["sweep"] = []
    for tile in tiles:
        try:
            r = t(lambda w, tile=tile: p.fused(w, tile))
        except Exception as e:   # e.g. out of shared memory: the other tiles still run
            log(f"  tile {tuple(tile)}: {type(e).__name__}: {str(e)[:200]}")
            RESULTS["errors"].append(f"{name} M={m} tile {tuple(tile)}: {type(e).__name__}: {str(e)[:300]}")
            continue
        row["sweep"].append({"tile": list(tile), **r})
    if not row["sweep"]:
        raise RuntimeError(f"{name} M={m}: no tile ran")
    best = min(row["sweep"], key=lambda r: r["us"])
    nan = {"us": float("nan"), "tbs": float("nan")}
    row["fused_default"] = next((r for r in row["sweep"] if r["tile"] == list(tiles[0])), nan)
    row["fused_best"] = best
    row["speedup_vs_current"] = row["current"]["us"] / best["us"]
    RESULTS["shapes"].append(row)
    log(f"{name:8s} M={m:2d}: cublas {row['cublas']['us']:7.1f} us ({row['cublas']['tbs']:.2f} TB/s)"
        f"  current {row['current']['us']:7.1f}  fused best {best['us']:7.1f} us ({best['tbs']:.2f} TB/s,"
        f" tile {tuple(best['tile'])})  default {row['fused_default']['us']:7.1f}"
        f"  x{row['speedup_vs_current']:.2f}  rel_err {row['rel_err']:.1e}")


def best_tile(name: str, m: int):
    rows = [r for r in RESULTS["shapes"] if r["shape"] == name and r["M"] == m]
    return Tile(*rows[0]["fused_best"]["tile"]) if rows else None


@section
def chain_case(m: int, bw: float, layers: int) -> None:
    """One layer's linear layers + glue, current vs fused, in one graph over `layers` layers."""
    (nq, hid, _), (ngu, _, _) = SHAPES["qkv"], SHAPES["gate_up"]
    inter = ngu // 2
    lw = [{"qkv": rand(nq, hid, scale=hid ** -0.5), "o": rand(hid, hid, scale=hid ** -0.5),
           "gate_up": rand(ngu, hid, scale=hid ** -0.5), "down": rand(hid, inter, scale=inter ** -0.5),
           "ln1": (1 + rand(hid, scale=0.2).float()).to(DT), "ln2": (1 + rand(hid, scale=0.2).float()).to(DT)}
          for _ in range(layers)]
    wbytes = sum(lw[0][n].numel() * 2 for n in ("qkv", "o", "gate_up", "down"))
    attn_out = rand(m, hid)              # stands in for attention (not part of either chain)
    out, res_a, res_b = rand(m, hid), rand(m, hid), torch.empty(m, hid, device=DEV, dtype=DT)
    qkv_buf, o_buf = torch.empty(m, nq, device=DEV, dtype=DT), torch.empty(m, hid, device=DEV, dtype=DT)
    act = torch.empty(m, inter, device=DEV, dtype=DT)

    last = {"out": out.clone()}     # the current chain's down output feeds its next layer
    keep = []                       # every such output stays alive: a graph reads the first

    def current(w):
        h = K.rms_norm(last["out"], w["ln1"], EPS, residual=res_a)
        F.linear(h, w["qkv"])
        o = F.linear(attn_out, w["o"])
        h = K.rms_norm(o, w["ln2"], EPS, residual=res_a)
        last["out"] = F.linear(K.silu_and_mul(F.linear(h, w["gate_up"])), w["down"])
        keep.append(last["out"])

    def fused(w, tiles):
        K.norm_linear(out, w["ln1"], EPS, w["qkv"], res_a, res_b, out=qkv_buf, tile=tiles["qkv"])
        K.gemv_linear(attn_out, w["o"], out=o_buf, tile=tiles["o"])
        K.norm_linear(o_buf, w["ln2"], EPS, w["gate_up"], res_b, res_a, silu=True, out=act,
                      tile=tiles["gate_up"])
        K.gemv_linear(act, w["down"], out=out, tile=tiles["down"])

    row = {"M": m, "layers": layers, "weight_MB_per_layer": wbytes / 1e6,
           "roofline_us": wbytes / bw / 1e6}
    row["current_us"] = time_graph([lambda w=w: current(w) for w in lw])
    default = {n: None for n in SHAPES}
    row["fused_default_us"] = time_graph([lambda w=w: fused(w, default) for w in lw])
    tuned = {n: best_tile(n, m) for n in SHAPES}
    row["fused_best_tiles"] = {n: list(t) if t else None for n, t in tuned.items()}
    row["fused_best_us"] = time_graph([lambda w=w: fused(w, tuned) for w in lw])
    for key in ("current", "fused_default", "fused_best"):
        row[key + "_of_roofline"] = row["roofline_us"] / row[key + "_us"]
    RESULTS["chain"].append(row)
    log(f"chain M={m}: current {row['current_us']:.1f} us/layer ({row['current_of_roofline']:.0%} of "
        f"roofline {row['roofline_us']:.1f}), fused default {row['fused_default_us']:.1f} "
        f"({row['fused_default_of_roofline']:.0%}), fused best tiles {row['fused_best_us']:.1f} "
        f"({row['fused_best_of_roofline']:.0%})")


def suggested_tiles() -> dict:
    """Per kernel kind and M, the tile with the least total time over that kind's shapes."""
    kinds: dict = {}
    for r in RESULTS["shapes"]:
        per = kinds.setdefault(SHAPES[r["shape"]][2], {}).setdefault(r["M"], {})
        for s in r["sweep"]:
            per.setdefault(tuple(s["tile"]), []).append(s["us"])
    n_shapes = {kind: sum(1 for v in SHAPES.values() if v[2] == kind) for kind in kinds}
    return {kind: {m: list(min((t for t, us in tiles.items() if len(us) == n_shapes[kind]),
                                key=lambda t: sum(tiles[t])))
                   for m, tiles in per_m.items()} for kind, per_m in kinds.items()}


def markdown() -> str:
    bw = RESULTS.get("ceiling_tbs") or 0.0
    lines = [f"# Small-M GEMV kernels vs cuBLAS ({RESULTS['device']}, {RESULTS['date']})", "",
             f"Copy ceiling {bw:.2f} TB/s. TB/s = weight bytes / time. `current` = rms_norm(+res) -> "
             "F.linear (-> silu_and_mul) as the engine runs it today; fused = one kernel.", "",
             "| shape | M | cuBLAS us (TB/s) | current us | fused default us (TB/s) | fused best us (TB/s) "
             "| best tile (BN, BK, warps, stages, dot) | current / fused | bit-equal |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in RESULTS["shapes"]:
        c, d, b = r["cublas"], r["fused_default"], r["fused_best"]
        lines.append(f"| {r['shape']} | {r['M']} | {c['us']:.1f} ({c['tbs']:.2f}) | {r['current']['us']:.1f} | "
                     f"{d['us']:.1f} ({d['tbs']:.2f}) | {b['us']:.1f} ({b['tbs']:.2f}) | {tuple(b['tile'])} | "
                     f"{r['speedup_vs_current']:.2f} | {r['bit_equal']:.1%} |")
    lines += ["", "## One layer's glue chain in a CUDA graph (attention left out), us per layer", "",
              "| M | roofline | current | fused (default tiles) | fused (best tiles) |", "|---:|---:|---:|---:|---:|"]
    for r in RESULTS["chain"]:
        lines.append(f"| {r['M']} | {r['roofline_us']:.1f} | {r['current_us']:.1f} ({r['current_of_roofline']:.0%}) | "
                     f"{r['fused_default_us']:.1f} ({r['fused_default_of_roofline']:.0%}) | "
                     f"{r['fused_best_us']:.1f} ({r['fused_best_of_roofline']:.0%}) |")
    lines += ["", "## Every tile timed", "", "| shape | M | tile | us | TB/s |", "|---|---:|---|---:|---:|"]
    for r in RESULTS["shapes"]:
        for s in r["sweep"]:
            lines.append(f"| {r['shape']} | {r['M']} | {tuple(s['tile'])} | {s['us']:.1f} | {s['tbs']:.2f} |")
    lines += ["", "## Suggested kernels/gemv.py TILES (least total time per kind)", "", "```",
              json.dumps(RESULTS.get("suggested_tiles", {})), "```"]
    if RESULTS["errors"]:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in RESULTS["errors"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="directory for gemv.json and gemv.md")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run under the Triton interpreter")
    ap.add_argument("--m1-wide", action="store_true",
                    help="one token only, a wider tile sweep; writes gemv-tiles.json "
                    "(for $SPLITSERVE_GEMV_TILES)")
    args = ap.parse_args()
    ms, chain_ms = (MS, (1, 8))
    if args.m1_wide:
        ms, chain_ms = (1,), (1,)
        if not SMOKE:
            SWEEP[1] = WIDE_M1
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    RESULTS["device"] = "cpu (smoke)" if SMOKE else torch.cuda.get_device_name()
    RESULTS["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    RESULTS["default_tiles"] = {kind: {m: list(t) for m, t in tiles.items()} for kind, tiles in GEMV.TILES.items()}
    bw = ceiling() or 4.17
    for m in ms:
        for name in SHAPES:
            shape_case(name, m, bw)
            if not SMOKE:
                torch.cuda.empty_cache()
    for m in chain_ms:
        chain_case(m, bw, layers=2 if SMOKE else 8)
    try:
        RESULTS["suggested_tiles"] = suggested_tiles()
    except Exception as e:   # a table with gaps must not lose the results
        RESULTS["errors"].append(f"suggested_tiles: {type(e).__name__}: {e}")
    (args.out / "gemv.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    if RESULTS.get("suggested_tiles"):
        (args.out / "gemv-tiles.json").write_text(json.dumps(RESULTS["suggested_tiles"]))
    (args.out / "gemv.md").write_text(markdown())
    log(f"wrote {args.out / 'gemv.json'} and gemv.md; {len(RESULTS['errors'])} errors")
    print(markdown(), flush=True)


if __name__ == "__main__":
    main()
