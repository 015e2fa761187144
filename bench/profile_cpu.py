"""Profile the real engine on CPU (SmolLM2-135M) and fit the `cpu-smollm2` cost profile.

Times LLMEngine prefill forwards of 32..512 uncached tokens (one request, max_tokens=1, prefix
cache reset) and decode steps at batch 1..16 over short and longer contexts, then fits
router.cost_model on those samples (least squares) and writes router/profiles/cpu-smollm2.json
with the samples, the fit error, date, commit and command. Imports torch: it is a profiling
script, not the policy.

    python bench/profile_cpu.py [--repeat 3] [--out router/profiles/cpu-smollm2.json]
"""
from __future__ import annotations

import argparse
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


def time_prefill(eng, n: int, repeat: int, salt: int) -> float:
    from splitserve.engine.request import SamplingParams
    times = []
    for r in range(repeat):
        eng.pool.reset_prefix_cache()
        eng.add_request(_prompt(n, salt + r), SamplingParams(max_tokens=1, ignore_eos=True))
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default="router/profiles/cpu-smollm2.json")
    args = ap.parse_args()
    import torch
    from splitserve.config import Config
    from splitserve.engine.engine import LLMEngine
    torch.set_num_threads(2)
    eng = LLMEngine.from_config(Config().replace("model", device="cpu")
                                .replace("scheduler", max_num_batched_tokens=1024))
    time_prefill(eng, 32, 1, 99)  # warm-up
    pre = [PrefillSample(((n, 0),), time_prefill(eng, n, args.repeat, n)) for n in (32, 64, 128, 256, 512)]
    dec = [DecodeSample(b, b * (ctx + 2), time_decode(eng, b, ctx, args.steps))
           for b in (1, 4, 8, 16) for ctx in (64, 512)]
    res = fit(pre + dec)
    kvb = 2 * eng.arch.num_layers * eng.arch.num_kv_heads * eng.arch.head_dim * 4  # fp32 on CPU
    model = CostModel(
        name="cpu-smollm2", prefill=res.prefill, decode=res.decode or DecodeCoeffs(0, 0, 0),
        transfer=TransferCoeffs(2e-3, 1.0e9), kv_bytes_per_token=kvb,
        kv_capacity_tokens=eng.pool.num_blocks * eng.pool.block_size, prefill_chunk_tokens=1024,
        notes=("Fitted by least squares from real LLMEngine timings of SmolLM2-135M on this dev machine's CPU "
               "(2 shared cores, torch threads 2; noisy). Transfer: 1 GB/s + 2 ms assumed (UCX over TCP loopback "
               "order of magnitude, bench/results/transfer-cpu.md), not fitted."),
        source={"date": date.today().isoformat(),
                "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                         text=True).stdout.strip(),
                "command": "python " + " ".join(sys.argv), "rel_rmse": res.rel_rmse,
                "prefill_samples": [[s.seqs[0][0], round(s.seconds, 5)] for s in pre],
                "decode_samples": [[s.batch, s.kv_tokens, round(s.seconds, 5)] for s in dec]})
    model.save(args.out)
    print(json.dumps(model.to_dict()["source"], indent=1))
    print("prefill", res.prefill, "\ndecode", res.decode)


if __name__ == "__main__":
    main()
