"""Profile the real engine on CPU (SmolLM2-135M) and fit the `cpu-smollm2` cost profile.

Times LLMEngine prefill forwards of 32..1536 uncached tokens (one request, max_tokens=1, prefix
cache reset; also after a cached prefix) and decode steps at batch 1..16 over short and longer
contexts, with torch on --threads threads (default 1: a Ray worker actor with num_cpus=1 gets
OMP_NUM_THREADS=1, so this is the per-worker speed of the real cluster), then fits
router.cost_model on those samples (least squares) and writes router/profiles/cpu-smollm2.json
with the samples, the fit error, date, commit and command. Imports torch: it is a profiling
script, not the policy.

    python bench/profile_cpu.py [--repeat 3] [--threads 1] [--out router/profiles/cpu-smollm2.json]
"""
from __future__ import annotations

import argparse
import os
import json
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from splitserve.router.cost_model import (CostModel, DecodeCoeffs, DecodeSample, PrefillSample, TransferCoeffs,
                                          fit)


def _prompt(n: int, salt: int) -> list[int]:
    return [(1000 + 37 * i + 101 * salt) % 40000 + 100 for i in range(n)]


def time_prefill(eng, n: int, repeat: int, salt: int, cached: int = 0) -> float:
    """Median time of a prefill of n new tokens after `cached` prefix-cached tokens."""
    from splitserve.engine.request import SamplingParams
    times = []
    for r in range(repeat):
        eng.pool.reset_prefix_cache()
        if cached:   # put the prefix in the cache first (untimed)
            eng.add_request(_prompt(cached, salt + r), SamplingParams(max_tokens=1, ignore_eos=True))
            while eng.has_unfinished():
                eng.step()
        eng.add_request(_prompt(cached, salt + r)[:cached] + _prompt(n, salt + r + 1000),
                        SamplingParams(max_tokens=1, ignore_eos=True))
        t0 = time.perf_counter()
        while eng.has_unfinished():
            eng.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_decode(eng, batch: int, ctx: int, steps: int) -> float:
    """Median decode step time of `batch` sequences of about `ctx` tokens each."""
    from splitserve.engine.request import SamplingParams
    eng.pool.reset_prefix_cache()
    ids = [eng.add_request(_prompt(ctx, 7 * b + 3), SamplingParams(max_tokens=steps + 4, ignore_eos=True))
           for b in range(batch)]
    while len(eng.scheduler.running) < batch or any(r.num_computed_tokens < r.num_prompt_tokens
                                                    for r in eng.scheduler.running):
        eng.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t0)
    for i in ids:
        eng.abort(i)
    return statistics.median(times)


def robust_fit(samples: list, max_rel: float = 0.5):
    """Least squares, then drop the samples off by more than `max_rel` (a contention spike on this
    shared VM: a 1536-token prefill once took 53 s instead of ~7) and refit, at most a quarter of
    each kind. Returns (FitResult, dropped samples)."""
    res = fit(samples)
    model = CostModel("tmp", res.prefill, res.decode or DecodeCoeffs(0, 0, 0), TransferCoeffs(0, 1.0), 0, 0, 1 << 30)

    def rel(s) -> float:
        if isinstance(s, PrefillSample):
            pred = model.prefill_forward_time(sum(n for n, _ in s.seqs), sum(CostModel.pairs(n, c) for n, c in s.seqs))
        else:
            pred = model.decode_step_time(s.batch, s.kv_tokens)
        return abs(pred - s.seconds) / s.seconds
    dropped = []
    for kind in (PrefillSample, DecodeSample):
        mine = sorted((s for s in samples if isinstance(s, kind)), key=rel, reverse=True)
        dropped += [s for s in mine[:len(mine) // 4] if rel(s) > max_rel]
    if not dropped:
        return res, []
    return fit([s for s in samples if s not in dropped]), dropped


def neighbour(threads: int, seconds: float) -> int:
    """Keep one core busy the way the other worker of a 1P+1D cluster does: 256-token prefills."""
    import torch
    from splitserve.config import Config
    from splitserve.engine.engine import LLMEngine
    torch.set_num_threads(threads)
    eng = LLMEngine.from_config(Config().replace("model", device="cpu"))
    t_end, n = time.monotonic() + seconds, 0
    while time.monotonic() < t_end:
        time_prefill(eng, 256, 1, n)
        n += 1
    return n


def measure(repeat: int, steps: int, threads: int) -> dict:
    """Time the engine (in this process); plain tuples so that a Ray actor can return them."""
    import os

    import torch
    from splitserve.config import Config
    from splitserve.engine.engine import LLMEngine
    torch.set_num_threads(threads)
    eng = LLMEngine.from_config(Config().replace("model", device="cpu"))   # the workers' config (2048-token steps)
    time_prefill(eng, 32, 1, 99)  # warm-up
    load0 = os.getloadavg()
    pre = [(n, 0, time_prefill(eng, n, repeat, n)) for n in (16, 64, 128, 256, 512, 1024, 1536)]
    pre += [(n, c, time_prefill(eng, n, repeat, n + c, c)) for n, c in ((64, 512), (256, 1024))]
    dec = [(b, b * (ctx + 2), time_decode(eng, b, ctx, steps)) for b in (1, 4, 8, 16) for ctx in (64, 512)]
    a = eng.arch
    return {"pre": pre, "dec": dec, "load0": load0, "nice": os.nice(0),
            "kvb": 2 * a.num_layers * a.num_kv_heads * a.head_dim * 4,   # fp32 on CPU
            "capacity": eng.pool.num_blocks * eng.pool.block_size,
            "chunk": eng.config.scheduler.max_num_batched_tokens}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a Ray worker with 1 CPU gets 1)")
    ap.add_argument("--out", default="router/profiles/cpu-smollm2.json")
    ap.add_argument("--ray", action="store_true", help="measure inside a Ray actor (as the workers run)")
    ap.add_argument("--neighbour", action="store_true",
                    help="with --ray: a second 1-CPU actor prefills nonstop meanwhile (the other worker of 1P+1D)")
    ap.add_argument("--refit", default="", help="refit the samples stored in this profile JSON (no timing)")
    args = ap.parse_args()
    if args.refit:
        return refit(args)
    if args.ray:   # inside a Ray actor with 1 CPU: the niceness, env and thread count of a real worker
        import ray
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        busy = ray.remote(num_cpus=1)(neighbour).remote(args.threads, 3600) if args.neighbour else None
        m = ray.get(ray.remote(num_cpus=1)(measure).remote(args.repeat, args.steps, args.threads))
        if busy is not None:
            ray.cancel(busy, force=True)
        ray.shutdown()
    else:
        m = measure(args.repeat, args.steps, args.threads)
    pre = [PrefillSample(((n, c),), t) for n, c, t in m["pre"]]
    dec = [DecodeSample(b, k, t) for b, k, t in m["dec"]]
    load0 = m["load0"]
    res, dropped = robust_fit(pre + dec)
    model = CostModel(
        name="cpu-smollm2", prefill=res.prefill, decode=res.decode or DecodeCoeffs(0, 0, 0),
        transfer=TransferCoeffs(2e-3, 1.0e9), kv_bytes_per_token=m["kvb"],
        kv_capacity_tokens=m["capacity"], prefill_chunk_tokens=m["chunk"],
        notes=(f"Fitted by least squares from real LLMEngine timings of SmolLM2-135M on this dev machine's CPU "
               f"(2 shared cores, torch threads {args.threads} = one Ray worker's share"
               f"{', measured inside a Ray actor (num_cpus=1, niced like the workers)' if args.ray else ''}"
               f"{' while a second actor prefilled nonstop (both workers busy)' if args.neighbour else ''}; load average "
               f"{load0[0]:.1f} at the start: other jobs share the cores, so noisy). Transfer: 1 GB/s + 2 ms "
               "assumed (UCX over TCP loopback order of magnitude, bench/results/transfer-cpu.md), not fitted "
               "here; bench/validate_sim.py fits it from the real cluster's transfer timings."),
        source={"date": date.today().isoformat(),
                "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                         text=True).stdout.strip(),
                "command": "python " + " ".join(sys.argv), "rel_rmse": res.rel_rmse,
                "threads": args.threads, "ray_actor": args.ray, "neighbour": args.neighbour, "nice": m["nice"], "loadavg_start": [round(x, 2) for x in load0],
                "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                "prefill_samples": [[s.seqs[0][0], s.seqs[0][1], round(s.seconds, 5)] for s in pre],
                "decode_samples": [[s.batch, s.kv_tokens, round(s.seconds, 5)] for s in dec],
                "dropped_outliers": _describe(dropped)})
    model.save(args.out)
    print(json.dumps(model.to_dict()["source"], indent=1))
    print("prefill", res.prefill, "\ndecode", res.decode)


def _describe(dropped: list) -> list:
    return [["prefill", *s.seqs[0], round(s.seconds, 5)] if isinstance(s, PrefillSample)
            else ["decode", s.batch, s.kv_tokens, round(s.seconds, 5)] for s in dropped]


def refit(args) -> None:
    """Refit a saved profile's samples (robust fit) and write it back to --out."""
    d = json.loads(Path(args.refit).read_text())
    src = d["source"]
    pre = [PrefillSample(((int(n), int(c)),), t) for n, c, t in src["prefill_samples"]]
    dec = [DecodeSample(int(b), int(k), t) for b, k, t in src["decode_samples"]]
    res, dropped = robust_fit(pre + dec)
    d["prefill"] = {"fixed_s": res.prefill.fixed_s, "per_token_s": res.prefill.per_token_s,
                    "per_pair_s": res.prefill.per_pair_s}
    d["decode"] = {"fixed_s": res.decode.fixed_s, "per_seq_s": res.decode.per_seq_s,
                   "per_kv_token_s": res.decode.per_kv_token_s}
    src.update(rel_rmse=res.rel_rmse, dropped_outliers=_describe(dropped),
               refit_command="python " + " ".join(sys.argv))
    Path(args.out).write_text(json.dumps(d, indent=2) + "\n")
    print(json.dumps({k: d[k] for k in ("prefill", "decode")}), res.rel_rmse, "dropped", _describe(dropped))


if __name__ == "__main__":
    main()
