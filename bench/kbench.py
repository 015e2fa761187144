"""Shared setup of the attention-kernel benchmarks (bench/kernels.py, bench/kernels_prefill.py).

The kernel modules, the problem shape (Llama-3-8B heads, block size 16), the timers, the
error-tolerant section decorator and RESULTS, the one dict every section appends to (it is
defined here once and imported by reference; the tile settings live on the kernel modules).
Importing this module with --smoke in sys.argv sets TRITON_INTERPRET before Triton loads.
"""
from __future__ import annotations

import importlib
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
        importlib.import_module("splitserve.kernels")
    except ImportError:
        pkg = types.ModuleType("splitserve")
        pkg.__path__ = [str(REPO / "splitserve"), str(REPO)]   # kernels/ -> splitserve.kernels
        sys.modules["splitserve"] = pkg
    import splitserve.kernels as kernels
    import splitserve.kernels.decode_plan as decode_mod   # the decode launch policy (tiles, splits)
    import splitserve.kernels.extend_attention as extend_mod
    import splitserve.kernels.prefill_attention as prefill_mod
    import splitserve.kernels.testing as testing
    return kernels, decode_mod, extend_mod, prefill_mod, testing


K, DECODE, EXTEND, PREFILL, TESTING = import_kernels()
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
    return TESTING.graph_time_us(fns, replays)


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
