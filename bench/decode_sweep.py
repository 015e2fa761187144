"""Sweep of the paged decode kernel's launch shape on the GPU (issue 3: FP8 decode speed).

    python3 bench/decode_sweep.py --out DIR [--smoke] [--budget-s 240]

Cases (Llama-3-8B heads, block size 16, shuffled pages): B=64 x 4096 timed eagerly (L2
flushed), B=8 and B=1 x 4096 replayed from a CUDA graph over rotated cache copies -- for bf16
and FP8 caches. For each config (kv heads per program, BLOCK_N, stages, warps) every case
is checked against the float32 reference before it is timed. Then, for the chosen configs,
split planning with and without the in-launch split merge. Writes decode-sweep.json and decode-sweep.md into DIR.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("bench_kernels", HERE / "kernels.py")
KB = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(KB)          # shares bench/kernels.py's cases, timers and kernels
DECODE = KB.DECODE
SMOKE = KB.SMOKE


ONLY: list[tuple] = []   # --only: sweep just these configs


def configs(kv: str) -> list[tuple]:
    """(HPP, BLOCK_N, stages, warps) with at most 256 key rows per tile."""
    if ONLY:
        return [c for c in ONLY if kv == "fp8" or c[0] * c[1] <= 128]
    out = []
    for hpp in (1, 2, 4, 8):
        for cols in (64, 128, 256):
            block_n = cols // hpp
            if block_n < 16 or (kv == "bf16" and cols > 128):
                continue
            for stages, warps in ((3, 4), (4, 4), (5, 4), (3, 8)):
                out.append((hpp, block_n, stages, warps))
    return out[:2] if SMOKE else out


def apply(kv: str, cfg: tuple) -> None:
    hpp, tiles = cfg[0], tuple(cfg[1:])   # (BLOCK_N, stages, warps[, maxnreg])
    DECODE.BATCH_TILES = DECODE.LARGE_BATCH_TILES = ()   # the swept config for every batch size
    if kv == "fp8":
        DECODE.HPP_FP8, DECODE.TILES_FP8 = hpp, tiles
    else:
        DECODE.HPP_16BIT, DECODE.TILES_16BIT = hpp, tiles


CASES: list[tuple] = []  # --cases: (B, L, sets) instead of the defaults


def cases(kv: str) -> dict:
    """(B, L, kv) -> problem; sets > 1: timed in a CUDA graph over that many cache copies."""
    L = 64 if SMOKE else 4096
    triples = CASES or ([(64, L, 1), (8, L, 4), (1, L, 16)] if not SMOKE else [(2, L, 1), (1, L, 2)])
    return {(B, n, kv): KB.Paged(B, n, kv, sets=sets, seed=B) for B, n, sets in triples}


def time_case(p, outs) -> float:
    if p.sets == 1:
        return KB.bench(lambda: p.decode(0, outs[0]))
    return KB.bench_graph([lambda s=s: p.decode(s, outs[s]) for s in range(p.sets)])


def sweep(kv: str, rows: list, deadline: float) -> None:
    cs = cases(kv)
    outs = {k: [torch.empty_like(p.q) for _ in range(p.sets)] for k, p in cs.items()}
    for cfg in configs(kv):
        if time.time() > deadline:
            rows.append(dict(kv=kv, cfg=cfg, skipped="time budget"))
            continue
        apply(kv, cfg)
        for key, p in cs.items():
            try:
                p.decode(0, outs[key][0])
                err = p.check(outs[key][0])
                assert err < 1e-2, f"rel err {err:.2e}"
                us = time_case(p, outs[key])
            except Exception as e:  # e.g. out of shared memory
                rows.append(dict(kv=kv, cfg=cfg, case=key, error=str(e)[:300]))
                print("sweep", kv, cfg, key, "failed:", str(e)[:160], flush=True)
                continue
            rows.append(dict(kv=kv, cfg=cfg, case=key, us=us, TBps=p.kv_bytes / us / 1e6,
                             rel_err=err))
            print(f"sweep {kv} {cfg} B={key[0]}: "
                  f"{us:.1f} us {p.kv_bytes / us / 1e6:.2f} TB/s", flush=True)
    del cs, outs
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


def split_sweep(rows: list, deadline: float) -> None:
    """Split planning (programs per SM, shortest split) for the small-batch graph cases."""
    base = (DECODE.PROGRAMS_PER_SM, DECODE.MIN_CHUNK)
    for kv in ("fp8", "bf16"):
        cs = {k: p for k, p in cases(kv).items() if k[0] <= 8}
        L = 32 if SMOKE else 1024        # the engine benchmark's short context at batch 1
        cs[(1, L, kv)] = KB.Paged(1, L, kv, sets=16, seed=7)
        outs = {k: [torch.empty_like(p.q) for _ in range(p.sets)] for k, p in cs.items()}
        for plan in [(2, 256), (4, 128), (2, 128), (4, 64), (8, 64), (1, 512),
                     (1, 1024), (1, 4096)][:2 if SMOKE else None]:
            if time.time() > deadline:
                break
            DECODE.PROGRAMS_PER_SM, DECODE.MIN_CHUNK = plan
            for key, p in cs.items():
                for fused in (0, 64):      # split merge: separate launch / in the decode launch
                    DECODE.FUSED_MERGE_MAX_SPLITS = fused
                    p.decode(0, outs[key][0])
                    err = p.check(outs[key][0])
                    us = time_case(p, outs[key])
                    rows.append(dict(kv=kv, split_plan=plan, fused_merge=bool(fused), case=key,
                                     split_us=us, rel_err=err,
                                     splits=DECODE.plan_decode_splits(key[0], KB.HKV, key[1],
                                                                      p.q.device, kv == "fp8")))
                    print(f"split {kv} plan={plan} fused={bool(fused)} B={key[0]} L={key[1]}: "
                          f"{us:.1f} us err {err:.1e}", flush=True)
                DECODE.FUSED_MERGE_MAX_SPLITS = 0
        del cs, outs
    DECODE.PROGRAMS_PER_SM, DECODE.MIN_CHUNK = base


def pick(rows: list, kv: str):
    """Config with the lowest sum of (time / the case's best time) over the cases it ran."""
    ok = [r for r in rows if r.get("kv") == kv and "us" in r]
    best = {}
    for r in ok:
        best[r["case"]] = min(best.get(r["case"], float("inf")), r["us"])
    score: dict = {}
    ncase: dict = {}
    for r in ok:
        score[r["cfg"]] = score.get(r["cfg"], 0.0) + r["us"] / best[r["case"]]
        ncase[r["cfg"]] = ncase.get(r["cfg"], 0) + 1
    full = [c for c in score if ncase[c] == len(best)]
    return min(full, key=score.get) if full else None


def report(rows: list, chosen: dict) -> str:
    keys = sorted({tuple(r["case"][:2]) for r in rows if "us" in r}, reverse=True)
    lines = ["| kv | HPP | BLOCK_N | stages | warps | " + " | ".join(
        f"B={b} L={n} us (TB/s)" for b, n in keys) + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(keys)]
    by = {}
    for r in rows:
        if "us" in r:
            by.setdefault((r["kv"], tuple(r["cfg"])), {})[tuple(r["case"][:2])] = r
    for (kv, cfg), cs in sorted(by.items()):
        cell = [f"{cs[k]['us']:.1f} ({cs[k]['TBps']:.2f})" if k in cs else "-" for k in keys]
        mark = " **chosen**" if chosen.get(kv) == cfg else ""
        regs = f" (maxnreg {cfg[4]})" if len(cfg) > 4 else ""
        lines.append(f"| {kv}{mark} | {cfg[0]} | {cfg[1]} | {cfg[2]} | {cfg[3]}{regs} | "
                     + " | ".join(cell) + " |")
    for r in rows:
        if "split_plan" in r:
            lines.append(f"\nsplit plan {r['split_plan']} {r['kv']} B={r['case'][0]} L={r['case'][1]}"
                         f"{' fused merge' if r.get('fused_merge') else ''}: "
                         f"{r['split_us']:.1f} us ({r['splits']} splits)")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="CPU dry run under the interpreter")
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--cases", nargs="*", default=None,
                    help="problems as B,L,SETS (SETS > 1: timed in a graph over rotated copies)")
    ap.add_argument("--kv", nargs="*", default=["fp8", "bf16"], choices=["fp8", "bf16"])
    ap.add_argument("--no-splits", action="store_true", help="skip the split-plan sweep")
    ap.add_argument("--page", type=int, default=KB.PAGE, help="KV block size (tokens per page)")
    ap.add_argument("--only", nargs="*", default=None,
                    help="configs to sweep as HPP,BLOCK_N,STAGES,WARPS[,MAXNREG] (default: the grid)")
    args = ap.parse_args()
    KB.PAGE = args.page                  # bench/kernels.py's Paged reads it per case
    ONLY.extend(tuple(int(x) for x in c.split(",")) for c in args.only or [])
    CASES.extend(tuple(int(x) for x in c.split(",")) for c in args.cases or [])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.budget_s
    rows: list = []
    chosen = {}
    for kv in args.kv:
        sweep(kv, rows, deadline)
        chosen[kv] = pick(rows, kv)
        print("chosen", kv, chosen[kv], flush=True)
    for kv in args.kv:
        if chosen[kv] is not None:
            apply(kv, chosen[kv])
    if not args.no_splits:
        split_sweep(rows, deadline)
    meta = dict(page=args.page,
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                torch=torch.__version__, argv=sys.argv, chosen=chosen)
    (out / "decode-sweep.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1,
                                                      default=str))
    (out / "decode-sweep.md").write_text(report(rows, chosen))
    print(report(rows, chosen))


if __name__ == "__main__":
    main()
