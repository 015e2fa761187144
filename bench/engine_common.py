"""Shared setup of the engine GPU benchmark (bench/engine.py, bench/engine_ref.py).

The run's shape (dummy Llama-3-8B bf16 on the GPU, tiny float16 on the CPU under --smoke), the
sweep points, the GPU replay timer, the error-tolerant section runner and R, the one results dict every
section writes to (defined here once and imported by reference, as are T0, SMOKE and DEV).
Importing this module with --smoke in sys.argv sets TRITON_INTERPRET before Triton loads, and
maps the splitserve package folders by hand where it is not installed (the device has no install).
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

try:
    importlib.import_module("splitserve.engine")
except ImportError:   # the device has no install: map the package folders by hand
    pkg = types.ModuleType("splitserve")
    pkg.__path__ = [str(REPO / "splitserve"), str(REPO)]    # engine/, kernels/ -> splitserve.*
    sys.modules["splitserve"] = pkg

DEV = torch.device("cpu" if SMOKE else "cuda")
SHAPE, DTYPE = ("tiny", "float16") if SMOKE else ("llama3-8b", "bfloat16")
BATCHES = (1, 8) if SMOKE else (1, 8, 32, 128, 256)
CONTEXTS = (64, 200) if SMOKE else (1024, 8192)
PREFILLS = (64, 256) if SMOKE else (1024, 8192, 32768)
R: dict = {"errors": []}
T0 = time.time()


def now_s() -> float:
    return time.time() - T0


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()




def section(name: str, fn, args) -> None:
    if now_s() > args.budget_s:
        print(f"[{now_s():6.1f}s] skip {name}: over the time budget", flush=True)
        R["errors"].append(f"{name}: skipped (time budget)")
        return
    print(f"[{now_s():6.1f}s] --- {name}", flush=True)
    try:
        fn(args)
    except Exception as exc:   # keep going: the other sections still measure
        traceback.print_exc()
        R["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
    write_json(args)


def write_json(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine-gpu.json").write_text(json.dumps(R, indent=1, default=str))


def rand_prompt(gen: torch.Generator, n: int, vocab: int) -> list[int]:
    return torch.randint(2, vocab, (n,), generator=gen).tolist()


def replay_time(runner, b: int, reps: int = 20) -> float | None:
    """Seconds per replay of batch b's graph, back to back, timed by CUDA events."""
    from splitserve.engine.cuda_graph import bucket_for
    graph = runner._graphs.get(bucket_for(b, runner.buckets)) if DEV.type == "cuda" else None
    if graph is None:
        return None
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps
