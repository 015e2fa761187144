"""Where a decode step's GPU time goes outside its CUDA graph (issue 4's engine.step() vs replay).

Builds the bench/engine.py engine (dummy Llama-3-8B, bf16 or FP8 KV), puts B requests at ~ctx
tokens of context, and runs LLMEngine.step() with overlapped decode under torch.profiler. From
the GPU activity it prints, per step (one graph replay to the next): the graph's span, every
activity outside it (copies, gathers, clones) with its duration, and the idle gaps, so the
difference between the graph replay time and engine.step()'s is accounted for.

    python bench/step_trace.py --out $OUT [--batch 1] [--ctx 1024] [--kv bf16|fp8] [--steps 12]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine as eb  # noqa: E402  (bench/engine.py: the engine and request setup)
from engine_common import sync  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from splitserve.engine.request import SamplingParams  # noqa: E402


def gpu_events(prof) -> list[dict]:
    """GPU activities (kernels, copies) sorted by start: name, start and end in us."""
    out = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.elapsed_us() >= 0:
            out.append(dict(name=e.name, start=e.time_range.start, end=e.time_range.end))
    return sorted(out, key=lambda r: r["start"])


def split_steps(ev: list[dict], marker: str) -> list[list[dict]]:
    """Cut the activity list after each occurrence of the step's last graph kernel (marker)."""
    steps, cur = [], []
    for r in ev:
        cur.append(r)
        if marker.lower() in r["name"].lower():
            steps.append(cur)
            cur = []
    return steps


def kernel_table(steps: list[list[dict]]) -> list[dict]:
    """Per kernel name: launches and GPU microseconds per step, largest first."""
    if not steps:
        return []
    tot: dict = {}
    for s in steps:
        for r in s:
            n, us = tot.get(r["name"], (0, 0.0))
            tot[r["name"]] = (n + 1, us + r["end"] - r["start"])
    busy = sum(us for _, us in tot.values())
    rows = [dict(name=k, per_step=n / len(steps), us_each=us / n, us_per_step=us / len(steps),
                 share=us / busy) for k, (n, us) in tot.items()]
    return sorted(rows, key=lambda r: -r["us_per_step"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--kv", choices=["bf16", "fp8"], default="bf16")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--smoke", action="store_true", help="CPU dry run (no GPU activity to show)")
    ap.add_argument("--marker", default="_argmax_pick",
                    help="substring of the graph's last kernel's name (batches > 32: ArgMax, torch's)")
    args = ap.parse_args()
    eng = eb.make_engine("fp8_e4m3" if args.kv == "fp8" else "auto", args.ctx + 256)
    eb.fill_cache_random(eng)
    rng = np.random.default_rng(0)
    n = 3 * args.steps + 10
    params = SamplingParams(max_tokens=n + 4, ignore_eos=True)
    for i in range(args.batch):
        rid = f"trace-{i}"
        eng.reserve_remote(rng.integers(2, eng.arch.vocab_size, args.ctx - n).tolist(), params, rid)
        eng.commit_remote(rid, int(rng.integers(2, eng.arch.vocab_size)))
    for _ in range(3):
        eng.step()
    sync()
    walls = []
    for _ in range(args.steps):
        t = time.perf_counter()
        eng.step()
        walls.append(time.perf_counter() - t)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            eng.step()
        sync()
    ev = gpu_events(prof)
    steps = split_steps(ev, args.marker)[1:-1]      # whole steps only
    rows, others = [], {}
    for s in steps:
        span = s[-1]["end"] - s[0]["start"]
        busy = sum(r["end"] - r["start"] for r in s)
        gaps = [(b["start"] - a["end"], a["name"][:60], b["name"][:60]) for a, b in zip(s, s[1:])]
        big = sorted(gaps, reverse=True)[:6]
        rows.append(dict(span_us=span, busy_us=busy, idle_us=span - busy, kernels=len(s),
                         biggest_gaps=big))
    # activities that are not graph kernels: those whose names occur once per step at most
    counts: dict = {}
    for s in steps:
        for r in s:
            counts.setdefault(r["name"], []).append(r["end"] - r["start"])
    per_step = {k: (len(v) / max(1, len(steps)), statistics.median(v)) for k, v in counts.items()}
    rare = {k: v for k, v in per_step.items() if v[0] <= 3}
    kernels = kernel_table(steps)
    res = dict(batch=args.batch, ctx=args.ctx, kv=args.kv, wall_step_ms=statistics.median(walls) * 1e3,
               steps=rows, per_step_rare_activities=rare, kernels=kernels,
               layer0=[(r["name"][:80], round(r["end"] - r["start"], 2)) for r in steps[0][:40]]
               if steps else [])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"step-trace-b{args.batch}-{args.kv}.json").write_text(json.dumps(res, indent=1))
    print(f"engine.step() wall median {res['wall_step_ms']:.3f} ms (no profiler)")
    for r in rows:
        print(f"step span {r['span_us']:.1f} us, busy {r['busy_us']:.1f}, idle {r['idle_us']:.1f}, "
              f"{r['kernels']} activities; biggest gaps: "
              + "; ".join(f"{g:.1f} us {a} -> {b}" for g, a, b in r["biggest_gaps"][:4]))
    print("GPU time per step by kernel name (count/step, us/step, share of busy):")
    for k in kernels[:16]:
        print(f"  {k['per_step']:5.1f} x {k['us_each']:7.2f} us = {k['us_per_step']:8.1f} us "
              f"({k['share']:.1%})  {k['name'][:100]}")
    print("activities seen <= 3 times per step (count/step, median us):")
    for k, (c, d) in sorted(rare.items(), key=lambda kv: -kv[1][1] * kv[1][0]):
        print(f"  {c:4.1f} x {d:8.1f} us  {k[:110]}")


if __name__ == "__main__":
    main()
