"""Where a decode step and a small eager prefill step spend their time (issue 4 diagnosis).

Builds the engine as bench/engine.py does (dummy Llama-3-8B, bf16, Triton attention, CUDA-graph
decode) and runs torch.profiler over
  * B=1 decode steps from the CUDA graph (runner.run: host inputs -> replay -> tokens on the host):
    wall time per step vs the sum of the kernels' GPU time, kernels grouped by name with their
    bytes-free time share (GEMVs, attention, norms, ...);
  * one eager prefill step of 64 new tokens (the ~22 ms floor of profile_engine): host time by op
    (self CPU) and GPU time, to tell launch-bound host work from GPU work.
Writes <out>/profile-step.json and prints the tables.

    python3 bench/profile_step.py --out $OUT          # on the H200
    python bench/profile_step.py --smoke --out /tmp    # CPU, tiny shape: the script itself runs
    python3 bench/profile_step.py --out $OUT --decode 256:1024:bf16,128:1024:fp8
        # large-batch decode steps instead (batch:context:kv, one engine per KV dtype; no prefill)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import engine as be  # noqa: E402  (sets DEV/SHAPE/SMOKE from argv)


def kernel_table(prof, steps: int, top: int = 25) -> list[dict]:
    rows = []
    for e in prof.key_averages():
        dev_us = getattr(e, "self_device_time_total", None)
        if dev_us is None:
            dev_us = getattr(e, "self_cuda_time_total", 0)
        rows.append({"name": e.key[:90], "count_per_step": e.count / steps, "gpu_us_per_step": dev_us / steps,
                     "cpu_us_per_step": e.self_cpu_time_total / steps})
    return rows


def profile(fn, steps: int):
    import torch
    from torch.profiler import ProfilerActivity
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if be.DEV.type == "cuda" else [])
    for _ in range(3):
        fn()
    be.sync()
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        be.sync()
        wall = (time.perf_counter() - t0) / steps
    return prof, wall


def show(title: str, wall: float, rows: list[dict], key: str) -> dict:
    rows = sorted(rows, key=lambda r: -r[key])
    gpu = sum(r["gpu_us_per_step"] for r in rows)
    cpu = sum(r["cpu_us_per_step"] for r in rows)
    print(f"\n## {title}: {wall * 1e3:.3f} ms/step wall; kernels' GPU time {gpu / 1e3:.3f} ms/step; "
          f"host time inside recorded ops {cpu / 1e3:.3f} ms/step (the rest of the wall: Python, Triton's "
          "launcher, waits)", flush=True)
    print(f"{'us/step (' + key[:3] + ')':>16} {'n/step':>7}  name")
    for r in rows[:25]:
        print(f"{r[key]:16.1f} {r['count_per_step']:7.1f}  {r['name']}")
    return {"wall_ms": wall * 1e3, "gpu_ms": gpu / 1e3, "host_ops_ms": cpu / 1e3, "rows": rows[:60]}


def main() -> None:
    import numpy as np
    from splitserve.engine.request import SamplingParams
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--decode", default="", help="batch:context:kv,... decode points (default: B=1 at 1k, auto KV)")
    a = ap.parse_args()
    if a.decode:
        return profile_points(a)
    eng = be.make_engine("auto", 4096 if not be.SMOKE else 256)
    be.fill_cache_random(eng)
    res = {"shape": be.SHAPE, "device": str(be.DEV)}
    res["decode_b1"] = decode_point(eng, 1, 1024 if not be.SMOKE else 64, "bf16", a.steps)

    n = 64 if not be.SMOKE else 16
    gen = np.random.default_rng(2)

    def one_prefill():
        eng.add_request(gen.integers(2, eng.arch.vocab_size, n).tolist(), SamplingParams(max_tokens=1, ignore_eos=True))
        while eng.has_unfinished():
            eng.step()
    steps = max(a.steps // 4, 3)
    prof, wall = profile(one_prefill, steps)
    rows = kernel_table(prof, steps)
    res["prefill_64_gpu"] = show(f"eager prefill of {n} tokens, by GPU time", wall, rows, "gpu_us_per_step")
    res["prefill_64_cpu"] = show(f"eager prefill of {n} tokens, by host (self CPU) time", wall, rows, "cpu_us_per_step")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile-step.json").write_text(json.dumps(res, indent=1) + "\n")


def decode_point(eng, b: int, ctx: int, kv: str, steps: int) -> dict:
    """Graph-replayed decode steps of b sequences at ctx tokens: kernels by GPU time."""
    import numpy as np
    inp = be.decode_inputs(eng, b, ctx, np.random.default_rng(b))
    runner = eng.runner.decode_graphs
    prof, wall = profile(lambda: runner.run(inp)[1].tolist(), steps)
    return show(f"decode B={b} ctx {ctx} {kv} (graph replay)", wall, kernel_table(prof, steps), "gpu_us_per_step")


def profile_points(a) -> None:
    """Graph-replayed decode steps at each batch:context:kv point, kernels by GPU time."""
    points = [p.split(":") for p in a.decode.split(",")]
    res = {"shape": be.SHAPE, "device": str(be.DEV), "points": {}}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for kv in dict.fromkeys(p[2] for p in points):
        eng = be.make_engine({"bf16": "auto", "fp8": "fp8_e4m3"}.get(kv, kv), 4096 if not be.SMOKE else 256)
        be.fill_cache_random(eng)
        for b, ctx, _ in (p for p in points if p[2] == kv):
            b, ctx = int(b), int(ctx)
            res["points"][f"decode_b{b}_ctx{ctx}_{kv}"] = decode_point(eng, b, ctx, kv, a.steps)
            (out / "profile-step.json").write_text(json.dumps(res, indent=1) + "\n")
        be.free_engine(eng)


if __name__ == "__main__":
    main()
