#!/usr/bin/env python3
"""The engine's bf16 linears (Llama-3-8B shapes) under each BLAS path torch offers, same process.

    python3 bench/gemm_ab.py --out DIR [--m 1,8,32,128,256] [--tag NAME]
    CUBLASLT_WORKSPACE_SIZE=65536 python3 bench/gemm_ab.py --out DIR --tag ws64m   # per process

Issue 4: at batch 8-256 the decode step's excess over the roofline is mostly the GEMMs (cuBLAS
at M=32: o 2.45 TB/s, qkv 3.1 TB/s, bench/results/gemv-2026-11-29.md). Variants, each captured
in its own CUDA graph that calls the op once per weight copy (copies exceed the L2 several
times), median of 20 replays, us per call:
  cublas      x @ W.t() (F.linear's mm) with torch's default BLAS backend (what the engine runs)
  cublaslt    the same with torch.backends.cuda.preferred_blas_library("cublaslt")
  cublas_t    torch.mm(x, W.t().contiguous()): the weight stored [K, N] (another kernel choice)
  cublaslt_t  both
  tunable     torch.cuda.tunable (TunableOp) on: every registered GEMM implementation timed once
              per shape on rotating buffers, the fastest kept (--variants cublas,tunable)
Every variant's output is checked against the first one's (same math, bf16 rounding). TB/s
counts weight bytes. Writes DIR/gemm-ab-TAG.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kbench import TESTING  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336), "lm_head": (128256, 4096)}   # (N, K)
LAYER = ("qkv", "o", "gate_up", "down")
VARIANTS = ["cublas", "cublaslt", "cublas_t", "cublaslt_t"]


def backend(name: str) -> None:
    torch.backends.cuda.preferred_blas_library("cublaslt" if name.startswith("cublaslt") else "cublas")
    tun = torch.cuda.tunable
    tun.enable(name == "tunable")
    tun.tuning_enable(name == "tunable")
    if name == "tunable":
        tun.set_rotating_buffer_size(512)     # MB: tuned on cold weights, as the step reads them
        tun.set_max_tuning_duration(200)      # ms per solution


def problem(n: int, k: int, m: int, shape: str) -> tuple:
    """Random bf16 weight copies [n, k] (together more than the L2 several times over, so every
    call streams its weight from HBM), the input [m, k], one output [m, n] per copy, and the
    JSON row's header. Returns (ws, x, outs, row)."""
    nbytes = n * k * 2
    copies = max(2, math.ceil(240e6 / nbytes))
    g = torch.Generator(device="cuda").manual_seed(m * 7 + n)
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
          for _ in range(copies)]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
    outs = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    row = {"shape": shape, "M": m, "N": n, "K": k, "weight_MB": nbytes / 1e6, "copies": copies}
    return ws, x, outs, row


def case(shape: str, m: int) -> dict:
    n, k = SHAPES[shape]
    ws, x, outs, row = problem(n, k, m, shape)
    nbytes, copies = n * k * 2, len(ws)
    wts = [w.t().contiguous() for w in ws]
    ref = None
    for v in VARIANTS:
        backend(v)
        if v.endswith("_t"):
            fns = [lambda i=i: torch.mm(x, wts[i], out=outs[i]) for i in range(copies)]
        else:
            # F.linear's own path: mm on the transposed view of the [N, K] weight
            fns = [lambda i=i: torch.mm(x, ws[i].t(), out=outs[i]) for i in range(copies)]
        us = TESTING.graph_time_us(fns)
        got = outs[0].float()
        if ref is None:
            ref = got.clone()
        err = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
        row[v] = {"us": us, "TBps": nbytes / us / 1e6, "max_rel_err_vs_first": err}
    backend("cublas")
    del ws, wts, outs
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--m", default="1,8,16,32,64,128,256")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tag", default="default")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    VARIANTS[:] = args.variants.split(",")
    ms = [int(v) for v in args.m.split(",")]
    env = {k: os.environ[k] for k in ("CUBLASLT_WORKSPACE_SIZE", "CUBLAS_WORKSPACE_CONFIG")
           if k in os.environ}
    rows, t0 = [], time.time()
    for shape in args.shapes.split(","):
        for m in ms:
            r = case(shape, m)
            rows.append(r)
            print(f"{shape:>8} M={m:<4} " + "  ".join(
                f"{v} {r[v]['us']:7.1f}us {r[v]['TBps']:.2f}TB/s" for v in VARIANTS), flush=True)
    print(f"\nper layer (qkv+o+gate_up+down), us [{args.tag}, env {env}]")
    print(f"{'M':>4} " + " ".join(f"{v:>11}" for v in VARIANTS))
    for m in ms:
        sel = [r for r in rows if r["M"] == m and r["shape"] in LAYER]
        if len(sel) == len(LAYER):
            print(f"{m:>4} " + " ".join(f"{sum(r[v]['us'] for r in sel):>11.1f}" for v in VARIANTS))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gemm-ab-{args.tag}.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "env": env,
         "commit": os.environ.get("GIT_COMMIT", ""), "seconds": time.time() - t0,
         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
