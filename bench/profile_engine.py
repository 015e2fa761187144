"""Profile the real engine and fit a cost profile for router.cost_model (issue 7).

Times LLMEngine prefill forwards (one request, max_tokens=1, prefix cache reset; also after a
cached prefix) and decode steps at several batches over short and longer contexts, then fits
router.cost_model on those samples (robust least squares) and writes the profile JSON with the
samples, the fit error, date, commit and command. Imports torch: a profiling script, not policy.

CPU (SmolLM2-135M, the dev machine): torch on --threads threads (default 1: a Ray worker actor
with num_cpus=1 gets OMP_NUM_THREADS=1, so this is the per-worker speed of the real cluster).
    python bench/profile_engine.py [--repeat 3] [--threads 1] [--out router/profiles/cpu-smollm2.json]
GPU (a dummy model at a real shape, the engine configured as bench/cluster_gpu.py's workers:
bf16, the same step token budget and batch cap, CUDA graphs for decode):
    python bench/profile_engine.py --device cuda --model dummy:llama3-8b --chunk 2048 --max-seqs 64 \
        --name h200-llama3-8b-profiled --out router/profiles/h200-llama3-8b-profiled.json
"""
from __future__ import annotations

import argparse
import os
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

from splitserve.router.cost_model import (CostModel, DecodeCoeffs, DecodeSample, PrefillSample, TransferCoeffs,
                                          fit, fit_prefill_floor)


def _prompt(n: int, salt: int) -> list[int]:
    return [(1000 + 37 * i + 101 * salt) % 40000 + 100 for i in range(n)]


def time_prefill(eng, n: int, repeat: int, salt: int, cached: int = 0) -> float:
    """Median time of a prefill of n new tokens after `cached` prefix-cached tokens."""
    return sum(t for _, _, t in time_prefill_steps(eng, n, repeat, salt, cached))


def time_prefill_steps(eng, n: int, repeat: int, salt: int, cached: int = 0) -> list[tuple[int, int, float]]:
    """Per engine step of one prefill of n new tokens after `cached` cached ones: (new tokens of
    the step, tokens before it, median seconds). A prompt longer than the step budget is chunked
    by the engine (one forward per step), so each step is one sample of the forward model."""
    from splitserve.engine.request import SamplingParams
    runs = []
    for r in range(repeat):
        eng.pool.reset_prefix_cache()
        if cached:   # put the prefix in the cache first (untimed)
            eng.add_request(_prompt(cached, salt + r), SamplingParams(max_tokens=1, ignore_eos=True))
            while eng.has_unfinished():
                eng.step()
        eng.add_request(_prompt(cached, salt + r)[:cached] + _prompt(n, salt + r + 1000),
                        SamplingParams(max_tokens=1, ignore_eos=True))
        steps = []
        while eng.has_unfinished():
            t0 = time.perf_counter()
            eng.step()
            steps.append(time.perf_counter() - t0)
        runs.append(steps)
    chunk = eng.config.scheduler.max_num_batched_tokens
    k = min(len(s) for s in runs)
    return [(min(chunk, n - i * chunk), cached + i * chunk, statistics.median(s[i] for s in runs))
            for i in range(k)]


def time_decode(eng, batch: int, ctx: int, steps: int) -> float:
    """Median decode step time of `batch` sequences of about `ctx` tokens each."""
    from splitserve.engine.request import SamplingParams
    eng.pool.reset_prefix_cache()
    fill_steps = -(-batch * ctx // eng.config.scheduler.max_num_batched_tokens) + batch
    # long enough that none finishes while the others still prefill
    ids = [eng.add_request(_prompt(ctx, 7 * b + 3), SamplingParams(max_tokens=steps + fill_steps + 4, ignore_eos=True))
           for b in range(batch)]
    while len(eng.scheduler.running) < batch or any(r.num_computed_tokens < r.num_prompt_tokens
                                                    for r in eng.scheduler.running):
        if not eng.has_unfinished():
            raise RuntimeError(f"decode batch {batch} x {ctx}: requests finished before all were running")
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


def engine_config(device: str = "cpu", model: str = "", chunk: int = 0, max_seqs: int = 0,
                  memory_fraction: float = 0.85):
    """The workers' engine config: CPU as the default cluster runs it; CUDA as cluster_gpu's."""
    from splitserve.config import Config
    cfg = Config().replace("model", device=device)
    if model:
        cfg = cfg.replace("model", model=model)
    if device == "cuda":
        cfg = cfg.replace("model", dtype="bfloat16").replace("cache", memory_fraction=memory_fraction)
    if chunk or max_seqs:
        sc = cfg.scheduler
        cfg = cfg.replace("scheduler", max_num_batched_tokens=chunk or sc.max_num_batched_tokens,
                          max_num_seqs=max_seqs or sc.max_num_seqs,
                          max_model_len=max(sc.max_model_len, 32768 if device == "cuda" else 0))
    return cfg


# sample grids: (prefill new tokens), (new, cached), decode batches, decode contexts
GRIDS = {
    "cpu": ((16, 64, 128, 256, 512, 1024, 1536), ((64, 512), (256, 1024)), (1, 4, 8, 16), (64, 512)),
    "cuda": ((64, 256, 1024, 2048, 4096, 8192, 16384), ((512, 4096), (2048, 8192), (2048, 16384)),
             (1, 4, 16, 32, 64), (1024, 4096)),
}


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


def measure(repeat: int, steps: int, threads: int, cfg=None) -> dict:
    """Time the engine (in this process); plain tuples so that a Ray actor can return them."""
    import os

    import torch
    from splitserve.engine.engine import LLMEngine
    cfg = cfg or engine_config()
    if cfg.model.device == "cpu":
        torch.set_num_threads(threads)
    eng = LLMEngine.from_config(cfg)
    kind = "cuda" if eng.device.type == "cuda" else "cpu"
    news, cached, batches, ctxs = GRIDS[kind]
    t0 = time.monotonic()
    for n in (32, news[-1]):   # warm-up: kernels compiled, graphs captured
        time_prefill(eng, n, 1, 99 + n)
    time_decode(eng, batches[-1], ctxs[0], 2)
    print(f"engine up, warm-up {time.monotonic() - t0:.0f} s", flush=True)
    load0 = os.getloadavg()
    t0 = time.monotonic()
    pre, dec = [], []
    for n, c in [(n, 0) for n in news] + list(cached):
        got = time_prefill_steps(eng, n, repeat, n + c, c)
        pre += got
        print(f"prefill {n} new after {c}: {[round(t * 1e3, 2) for *_, t in got]} ms/step", flush=True)
    for b in batches:
        for ctx in ctxs:
            dec.append((b, b * (ctx + 2), time_decode(eng, b, ctx, steps)))
            print(f"decode batch {b} ctx {ctx}: {dec[-1][2] * 1e3:.2f} ms/step", flush=True)
    print(f"timed {len(pre)} prefill and {len(dec)} decode points in {time.monotonic() - t0:.0f} s", flush=True)
    a = eng.arch
    return {"pre": pre, "dec": dec, "load0": load0, "nice": os.nice(0),
            "kvb": eng.kv_cache.bytes_per_block(a.num_layers, 1, a.num_kv_heads, a.head_dim, eng.kv_cache.kv.dtype),
            "capacity": eng.pool.num_blocks * eng.pool.block_size,
            "chunk": eng.config.scheduler.max_num_batched_tokens,
            "device": torch.cuda.get_device_name() if kind == "cuda" else "cpu",
            "memory_report": getattr(eng, "memory_report", {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a Ray worker with 1 CPU gets 1)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default="", help="default: the config's (SmolLM2); e.g. dummy:llama3-8b")
    ap.add_argument("--chunk", type=int, default=0, help="scheduler token budget per step (0: the config's)")
    ap.add_argument("--max-seqs", type=int, default=0, help="scheduler batch cap (0: the config's)")
    ap.add_argument("--memory-fraction", type=float, default=0.85)
    ap.add_argument("--name", default="cpu-smollm2")
    ap.add_argument("--transfer-latency-ms", type=float, default=2.0, help="not fitted here (see the notes)")
    ap.add_argument("--transfer-gbps", type=float, default=1.0)
    ap.add_argument("--out", default="router/profiles/cpu-smollm2.json")
    ap.add_argument("--ray", action="store_true", help="measure inside a Ray actor (as the workers run)")
    ap.add_argument("--neighbour", action="store_true",
                    help="with --ray: a second 1-CPU actor prefills nonstop meanwhile (the other worker of 1P+1D)")
    ap.add_argument("--refit", default="", help="refit the samples stored in this profile JSON (no timing)")
    args = ap.parse_args()
    if args.refit:
        return refit(args)
    cfg = engine_config(args.device, args.model, args.chunk, args.max_seqs, args.memory_fraction)
    if args.ray:   # inside a Ray actor with 1 CPU: the niceness, env and thread count of a real worker
        import ray
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        busy = ray.remote(num_cpus=1)(neighbour).remote(args.threads, 3600) if args.neighbour else None
        m = ray.get(ray.remote(num_cpus=1)(measure).remote(args.repeat, args.steps, args.threads, cfg))
        if busy is not None:
            ray.cancel(busy, force=True)
        ray.shutdown()
    else:
        m = measure(args.repeat, args.steps, args.threads, cfg)
    pre = [PrefillSample(((n, c),), t) for n, c, t in m["pre"]]
    dec = [DecodeSample(b, k, t) for b, k, t in m["dec"]]
    load0 = m["load0"]
    res, dropped = robust_fit(pre + dec)
    if args.device == "cuda":   # eager prefill has a launch-bound floor: max(floor, linear)
        pc, err = fit_prefill_floor(pre)
        res = replace(res, prefill=pc, rel_rmse={**res.rel_rmse, "prefill": err, "prefill_linear": res.rel_rmse["prefill"]})
    model = CostModel(
        name=args.name, prefill=res.prefill, decode=res.decode or DecodeCoeffs(0, 0, 0),
        transfer=TransferCoeffs(args.transfer_latency_ms / 1e3, args.transfer_gbps * 1e9), kv_bytes_per_token=m["kvb"],
        kv_capacity_tokens=m["capacity"], prefill_chunk_tokens=m["chunk"],
        notes=_notes(args, m, load0),
        source={"date": date.today().isoformat(),
                "commit": os.environ.get("GIT_COMMIT") or subprocess.run(
                    ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
                "command": "python " + " ".join(sys.argv), "rel_rmse": res.rel_rmse, "device": m.get("device", "cpu"),
                "engine": {"model": cfg.model.model, "dtype": cfg.model.dtype, "chunk": m["chunk"],
                           "max_num_seqs": cfg.scheduler.max_num_seqs, "memory": m.get("memory_report", {})},
                "threads": args.threads, "ray_actor": args.ray, "neighbour": args.neighbour, "nice": m["nice"], "loadavg_start": [round(x, 2) for x in load0],
                "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                "prefill_samples": [[s.seqs[0][0], s.seqs[0][1], round(s.seconds, 6)] for s in pre],
                "decode_samples": [[s.batch, s.kv_tokens, round(s.seconds, 6)] for s in dec],
                "dropped_outliers": _describe(dropped)})
    model.save(args.out)
    print(json.dumps(model.to_dict()["source"], indent=1))
    print("prefill", res.prefill, "\ndecode", res.decode)


def _notes(args, m: dict, load0) -> str:
    xfer = (f"Transfer: {args.transfer_latency_ms:g} ms + bytes / {args.transfer_gbps:g} GB/s, given on the command line "
            "(not fitted here; bench/validate_sim.py fits it from a real cluster's transfer timings).")
    if args.device == "cuda":
        return (f"Fitted by least squares from real LLMEngine timings on {m.get('device')} of {args.model or 'the default model'} "
                f"(random weights at the real shape), engine as bench/cluster_gpu.py's workers run it: bf16, "
                f"{m['chunk']}-token steps (a longer prompt is one sample per step), CUDA-graph decode. " + xfer)
    return (f"Fitted by least squares from real LLMEngine timings of SmolLM2-135M on this dev machine's CPU "
            f"(2 shared cores, torch threads {args.threads} = one Ray worker's share"
            f"{', measured inside a Ray actor (num_cpus=1, niced like the workers)' if args.ray else ''}"
            f"{' while a second actor prefilled nonstop (both workers busy)' if args.neighbour else ''}; load average "
            f"{load0[0]:.1f} at the start: other jobs share the cores, so noisy). " + xfer)


def _describe(dropped: list) -> list:
    return [["prefill", *s.seqs[0], round(s.seconds, 5)] if isinstance(s, PrefillSample)
            else ["decode", s.batch, s.kv_tokens, round(s.seconds, 5)] for s in dropped]


def refit(args) -> None:
    """Refit a saved profile's samples (robust fit; on a GPU profile the prefill floor) -> --out."""
    d = json.loads(Path(args.refit).read_text())
    src = d["source"]
    pre = [PrefillSample(((int(n), int(c)),), t) for n, c, t in src["prefill_samples"]]
    dec = [DecodeSample(int(b), int(k), t) for b, k, t in src["decode_samples"]]
    res, dropped = robust_fit(pre + dec)
    prefill = {"fixed_s": res.prefill.fixed_s, "per_token_s": res.prefill.per_token_s,
               "per_pair_s": res.prefill.per_pair_s}
    if src.get("device", "cpu") != "cpu":
        pc, err = fit_prefill_floor(pre)
        prefill = {"fixed_s": pc.fixed_s, "per_token_s": pc.per_token_s, "per_pair_s": pc.per_pair_s,
                   "floor_s": pc.floor_s}
        res = replace(res, rel_rmse={**res.rel_rmse, "prefill": err, "prefill_linear": res.rel_rmse["prefill"]})
    d["prefill"] = prefill
    d["decode"] = {"fixed_s": res.decode.fixed_s, "per_seq_s": res.decode.per_seq_s,
                   "per_kv_token_s": res.decode.per_kv_token_s}
    src.update(rel_rmse=res.rel_rmse, dropped_outliers=_describe(dropped),
               refit_command="python " + " ".join(sys.argv))
    Path(args.out).write_text(json.dumps(d, indent=2) + "\n")
    print(json.dumps({k: d[k] for k in ("prefill", "decode")}), res.rel_rmse, "dropped", _describe(dropped))


if __name__ == "__main__":
    main()
