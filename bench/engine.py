#!/usr/bin/env python3
"""The engine on the GPU, side by side with its ceilings and with transformers, in one process.

    python3 bench/engine.py [--out DIR] [--budget-s 300]      # H200, dummy:llama3-8b bf16
    python3 bench/engine.py --smoke                          # CPU dry run (TRITON_INTERPRET, tiny)

Sections (each prints as it goes; the JSON under --out is rewritten after every section, so a
timeout still leaves data):
  ceiling   D2D copy bandwidth (bytes read + written) and a bf16 8192^3 matmul
  correct   greedy tokens of the engine (Triton + CUDA graphs, bf16) for mixed-length prompts vs
            an independent float32 eager torch forward of the same weights, teacher-forced on
            the engine's tokens; a mismatch whose float32 margin is < NEAR_TIE is a near-tie
  ttft      one request end to end through the engine API (TTFT, TPOT, per-phase breakdown)
  prefill   tokens/s of 1k, 8k, 32k prompts vs the tensor-core ceiling (matmul + causal attn FLOPs)
  engine32  decode steps through the whole engine (scheduler + runner), 32 requests at ~1k
  decode    runner decode steps (host inputs -> padded static buffers -> graph replay -> tokens
            on the host) at B in 1,8,32,128,256 x context 1k, 8k x KV bf16, fp8, on a randomly
            filled cache, beside the roofline (weight bytes + KV bytes) / copy bandwidth; at the
            same points, LLMEngine.step() in a loop of decode steps with scheduler.overlap_decode
            on and off (requests joined through reserve_remote/commit_remote: they hold their
            context in the random cache, no prefill); the host work alone: bench/engine_host.py
  hf        transformers LlamaForCausalLM on the same weights, generate(cache_implementation=
            "static"), eager (auto-compile disabled), per-step time from two generate lengths;
            runs right after decode-bf16 on that engine's weights (B=1, 32, then 8, at 1k)

This file holds the ceiling, ttft, prefill, engine32 and decode sections, the table, the markdown
and main; the shared setup, the replay timer and R are in bench/engine_common.py (the wall timer in bench/timing.py), the float32 reference
(correct) and the transformers baseline (hf) in bench/engine_ref.py.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

# bench/ is not a package: its siblings must import both when this runs as a script and when
# it is loaded by path or as bench.engine (bench/profile_step.py does, and reads its names off it)
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from engine_common import (BATCHES, CONTEXTS, DEV, DTYPE, PREFILLS, REPO, SHAPE,  # noqa: E402
                           SMOKE, R, now_s, rand_prompt, replay_time, section, sync,
                           write_json)
from engine_ref import bench_correct, bench_hf  # noqa: E402
from timing import timed  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402  (after engine_common: --smoke sets TRITON_INTERPRET first)

from splitserve.config import Config  # noqa: E402
from splitserve.engine.cuda_graph import DecodeInputs  # noqa: E402
from splitserve.engine.engine import LLMEngine  # noqa: E402
from splitserve.engine.loader import load_dummy  # noqa: E402
from splitserve.engine.request import SamplingParams  # noqa: E402


# ------------------------------------------------------------------ ceilings
def bench_ceiling(args) -> None:
    n = (64 << 20) if SMOKE else (1 << 30)
    a = torch.randn(n, dtype=torch.bfloat16, device=DEV)
    b = torch.empty_like(a)
    t = timed(lambda: (b.copy_(a), sync()), 5 if SMOKE else 20)
    R["copy_tbps"] = 2 * a.numel() * 2 / t / 1e12
    m = 1024 if SMOKE else 8192
    x = torch.randn(m, m, dtype=torch.bfloat16, device=DEV)
    y = torch.randn(m, m, dtype=torch.bfloat16, device=DEV)
    t = timed(lambda: (x @ y, sync()), 3 if SMOKE else 20)
    R["matmul_tflops"] = 2 * m ** 3 / t / 1e12
    print(f"copy {R['copy_tbps']:.2f} TB/s (read+write), bf16 matmul {R['matmul_tflops']:.0f} TFLOP/s")
    a = b = x = y = None   # free them (the timing lambdas hold them; not del: pyflakes)


# ------------------------------------------------------------------ engine construction
def make_engine(kv_dtype: str, max_model_len: int) -> LLMEngine:
    cfg = Config().replace("model", model=f"dummy:{SHAPE}", device=DEV.type, dtype=DTYPE, seed=0)
    cache = dict(kv_dtype=kv_dtype, enable_prefix_caching=False, memory_fraction=0.9)
    if SMOKE:
        cache["num_blocks"] = 700
    cfg = cfg.replace("cache", **cache)
    cfg = cfg.replace("scheduler", max_num_seqs=max(BATCHES), max_model_len=max_model_len,
                      max_num_batched_tokens=256 if SMOKE else 8192)
    t = time.perf_counter()
    loaded = load_dummy(SHAPE, getattr(torch, DTYPE), DEV.type, 0)
    eng = LLMEngine(cfg, loaded, DEV, attention="triton")
    R.setdefault("engines", {})[kv_dtype] = {"start_s": time.perf_counter() - t,
                                              "graph_capture_s": getattr(eng, "graph_capture_s", 0.0),
                                              "kv_cache": eng.kv_report}
    print(f"engine kv={kv_dtype}: {eng.kv_report} start {time.perf_counter() - t:.1f}s", flush=True)
    return eng


def free_engine(eng) -> None:
    eng.runner = eng.kv_cache = eng.model = eng.pipeline = None   # the pipeline holds the runner
    gc.collect()
    if DEV.type == "cuda":
        torch.cuda.empty_cache()


def weight_bytes(model) -> int:
    """Bytes a decode step reads: every layer weight, the final norm and the LM head."""
    n = sum(t.numel() * t.element_size() for lw in model.layers for t in lw.values() if t is not None)
    return n + model.lm_head.numel() * model.lm_head.element_size() + model.w["model.norm.weight"].nbytes


# ------------------------------------------------------------------ TTFT / TPOT, prefill, engine decode
def bench_ttft(args) -> None:
    eng = args.eng
    gen = torch.Generator().manual_seed(2)
    phases: dict[str, list[float]] = {"schedule": [], "execute": []}
    sched, execute = eng.scheduler.schedule, eng.runner.execute

    def wrap(name, fn):
        def inner(*a):
            t = time.perf_counter()
            r = fn(*a)
            phases[name].append(time.perf_counter() - t)
            return r
        return inner
    eng.scheduler.schedule, eng.runner.execute = wrap("schedule", sched), wrap("execute", execute)
    new = 16 if SMOKE else 128
    plen = 50 if SMOKE else 1000
    for run in range(2):                      # the first run warms up the prefill kernels
        for v in phases.values():
            v.clear()
        rid = eng.add_request(rand_prompt(gen, plen, eng.arch.vocab_size),
                              SamplingParams(max_tokens=new, ignore_eos=True))
        t0, steps, final = time.perf_counter(), [], None
        while eng.has_unfinished():
            t = time.perf_counter()
            for o in eng.step():
                final = o if o.request_id == rid and o.finished else final
            steps.append(time.perf_counter() - t)
    eng.scheduler.schedule, eng.runner.execute = sched, execute
    total = time.perf_counter() - t0
    step_sum = sum(steps)
    phases["update+detokenize"] = [s - a - b for s, a, b in zip(steps, phases["schedule"], phases["execute"])]
    R["ttft"] = {"prompt_len": plen, "new_tokens": new, **final.timings,
                 "first_step_s": steps[0], "decode_step_median_s": statistics.median(steps[1:]),
                 "breakdown_median_s": {k: statistics.median(v[1:]) for k, v in phases.items() if len(v) > 1},
                 "prefill_execute_s": phases["execute"][0], "outside_step_s": total - step_sum}
    print(f"ttft: {json.dumps(R['ttft'])}", flush=True)


def prefill_flops(arch, n: int) -> float:
    """Matmul FLOPs of an n-token prompt (sampling only the last token) + causal attention."""
    a = arch
    per_tok = 2 * (a.hidden_size * (a.q_size + 2 * a.kv_size) + a.q_size * a.hidden_size
                   + 3 * a.hidden_size * a.intermediate_size) * a.num_layers
    attn = 2 * 2 * a.num_heads * a.head_dim * a.num_layers * n * n / 2
    return per_tok * n + attn + 2 * a.hidden_size * a.vocab_size


def bench_prefill(args) -> None:
    eng = args.eng
    gen = torch.Generator().manual_seed(3)
    R["prefill"] = []
    for n in (PREFILLS[0],) + PREFILLS:       # the first is a warm-up
        eng.generate([rand_prompt(gen, n, eng.arch.vocab_size)], SamplingParams(max_tokens=1))
        sync()
        t = time.perf_counter()
        eng.generate([rand_prompt(gen, n, eng.arch.vocab_size)], SamplingParams(max_tokens=1))
        sync()
        dt = time.perf_counter() - t
        fl = prefill_flops(eng.arch, n)
        row = {"prompt_len": n, "s": dt, "tok_s": n / dt, "tflops": fl / dt / 1e12,
               "ceiling_tok_s": R["matmul_tflops"] * 1e12 / fl * n,
               "chunk": eng.config.scheduler.max_num_batched_tokens}
        row["fraction_of_ceiling"] = row["tok_s"] / row["ceiling_tok_s"]
        R["prefill"] = [r for r in R["prefill"] if r["prompt_len"] != n] + [row]
        print(f"prefill {n}: {dt * 1e3:.1f} ms, {row['tok_s']:.0f} tok/s, {row['tflops']:.0f} TFLOP/s "
              f"({row['fraction_of_ceiling']:.0%} of the matmul ceiling)", flush=True)


def bench_engine32(args) -> None:
    """Decode steps of the full engine loop (scheduler + inputs + graph + detokenize)."""
    eng = args.eng
    b, plen, new = (4, 40, 8) if SMOKE else (32, 1000, 48)
    gen = torch.Generator().manual_seed(4)
    for _ in range(b):
        eng.add_request(rand_prompt(gen, plen, eng.arch.vocab_size), SamplingParams(max_tokens=new, ignore_eos=True))
    steps = []
    while eng.has_unfinished():
        t = time.perf_counter()
        eng.step()
        steps.append(time.perf_counter() - t)
    dec = steps[-(new - 2):]
    R["engine_decode"] = {"batch": b, "context": plen, "step_median_s": statistics.median(dec),
                          "tok_s": b / statistics.median(dec), "overlap": eng.pipeline.enabled}
    print(f"engine loop decode B={b} ctx~{plen}: {statistics.median(dec) * 1e3:.2f} ms/step", flush=True)


# ------------------------------------------------------------------ runner decode vs roofline
def fill_cache_random(eng) -> None:
    kv = eng.kv_cache.kv
    for layer in range(kv.shape[0]):
        for j in range(2):
            if kv.dtype.is_floating_point and kv.element_size() >= 2:
                kv[layer, j].normal_()
            else:
                kv[layer, j].copy_(torch.randn(kv.shape[2:], dtype=torch.bfloat16, device=DEV))
    sync()


def decode_inputs(eng, b: int, ctx: int, rng: np.random.Generator) -> DecodeInputs:
    bs = eng.kv_cache.block_size
    nb = -(-ctx // bs)
    blocks = rng.permutation(eng.kv_cache.num_blocks)[:b * nb].reshape(b, nb).astype(np.int32)
    slots = [int(blocks[i, (ctx - 1) // bs]) * bs + (ctx - 1) % bs for i in range(b)]
    ids = rng.integers(2, eng.arch.vocab_size, b).tolist()
    return DecodeInputs(ids, [ctx - 1] * b, slots, [ctx] * b, [row.tolist() for row in blocks])


def engine_step_time(eng, b: int, ctx: int, overlap: bool, rng: np.random.Generator) -> float:
    """Median wall seconds of one LLMEngine.step() (schedule, inputs, graph, read tokens, update,
    detokenize, outputs) over decode steps of b requests at ~ctx tokens, overlap on or off."""
    warm, steps = (1, 2) if SMOKE else (3, 20)
    new = warm + steps + 2                      # the last steps may drain the overlap pipeline
    plen = max(ctx - new, 1)
    eng.pipeline.enabled = overlap              # the bench flips the config switch in place
    params = SamplingParams(max_tokens=new + 4, ignore_eos=True)
    rids = [f"dec-{overlap}-{b}-{ctx}-{i}" for i in range(b)]
    for rid in rids:
        if eng.reserve_remote(rng.integers(2, eng.arch.vocab_size, plen).tolist(), params, rid) is None:
            raise RuntimeError(f"no KV room for B={b} ctx={ctx}")
        eng.commit_remote(rid, int(rng.integers(2, eng.arch.vocab_size)))
    ts = []
    for _ in range(warm + steps):
        t = time.perf_counter()
        eng.step()
        ts.append(time.perf_counter() - t)
    for rid in rids:
        eng.abort(rid)
    while eng.has_unfinished():
        eng.step()
    eng.pipeline.enabled = eng.config.scheduler.overlap_decode
    return statistics.median(ts[warm:])


def bench_decode(args) -> None:
    eng, kv_name = args.eng, args.kv_name
    fill_cache_random(eng)
    wbytes = weight_bytes(eng.model)
    a = eng.arch
    kv_tok = a.num_layers * 2 * a.num_kv_heads * a.head_dim * eng.kv_cache.kv.element_size()
    rng = np.random.default_rng(5)
    runner = eng.runner.decode_graphs
    for ctx in CONTEXTS:
        for b in BATCHES:
            row = {"kv": kv_name, "batch": b, "context": ctx}
            if b * -(-ctx // eng.kv_cache.block_size) > eng.kv_cache.num_blocks:
                row["skipped"] = f"needs {b * ctx} KV tokens, the cache holds {eng.kv_report['num_tokens']}"
                R["decode"].append(row)
                print(f"decode {kv_name} B={b} ctx={ctx}: {row['skipped']}", flush=True)
                continue
            inp = decode_inputs(eng, b, ctx, rng)
            t = timed(lambda: runner.run(inp)[1].tolist(), 5 if SMOKE else 20, warmup=3)
            replay = replay_time(runner, b)
            if replay is not None:      # GPU time of the graph alone: the rest is host + sync
                row["replay_s"] = replay
            nbytes = wbytes + b * ctx * kv_tok
            roof = nbytes / (R["copy_tbps"] * 1e12)
            row.update(step_s=t, tok_s=b / t, roofline_step_s=roof, roofline_tok_s=b / roof,
                       bytes_per_step=nbytes, step_over_roofline=t / roof, achieved_tbps=nbytes / t / 1e12)
            if not SMOKE or (b, ctx) == (BATCHES[-1], CONTEXTS[0]):    # the interpreter: one point
                for overlap in (True, False):
                    row["engine_overlap_s" if overlap else "engine_sync_s"] = engine_step_time(eng, b, ctx, overlap, rng)
            R["decode"].append(row)
            eng_ms = (f" | engine.step() {row['engine_overlap_s'] * 1e3:.2f} ms overlapped, "
                      f"{row['engine_sync_s'] * 1e3:.2f} ms sync" if "engine_sync_s" in row else "")
            print(f"decode {kv_name} B={b:3d} ctx={ctx:5d}: {t * 1e3:7.2f} ms/step {b / t:8.0f} tok/s | "
                  f"roofline {roof * 1e3:6.2f} ms ({t / roof:.2f}x) | {nbytes / t / 1e12:.2f} TB/s{eng_ms}", flush=True)


# ------------------------------------------------------------------ table
TABLE_LEGEND = (
    "Columns: *graph replay* = the CUDA graph alone, back to back, CUDA-event timed; *runner step* = "
    "DecodeGraphRunner.run (host inputs -> staging -> copies -> replay) + reading the tokens on the host; "
    "*engine.step()* = one LLMEngine.step() in a loop of decode steps (schedule, inputs, replay, read "
    "tokens, update requests, detokenize, outputs), median wall time, with scheduler.overlap_decode on "
    "(the next step is launched before this one's tokens are read) and off (synchronous); runner tok/s, "
    "roofline and HF ratios are against the runner step; *engine / roofline* is the engine's default "
    "(overlapped) step against the same roofline. The runner step's host part varies 0.07-0.45 ms "
    "between the device's machines (engine-2026-11-30-s14.md); the overlapped step hides most of it.")


def table() -> str:
    lines = ["| KV | B | context | graph replay ms | runner step ms | engine.step() ms, overlap | "
             "engine.step() ms, sync | runner tok/s | roofline ms | runner / roofline | engine / roofline | "
             "HF static ms/step | HF / runner |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    hf = {(h["batch"], h["context"]): h["step_s"] for h in R.get("hf", [])}

    def ms(r, k):
        return f"{r[k] * 1e3:.2f}" if k in r else "-"
    for r in R.get("decode", []):
        if "skipped" in r:
            lines.append(f"| {r['kv']} | {r['batch']} | {r['context']} | - | - | - | - | - | - | does not fit | | | |")
            continue
        h = hf.get((r["batch"], r["context"])) if r["kv"] == "bf16" else None
        hf_cells = " | " if h is None else f"{h * 1e3:.2f} | {h / r['step_s']:.2f}x"
        eng_ratio = (f"{r['engine_overlap_s'] / r['roofline_step_s']:.2f}x" if "engine_overlap_s" in r else "-")
        lines.append(f"| {r['kv']} | {r['batch']} | {r['context']} | {ms(r, 'replay_s')} | {ms(r, 'step_s')} | "
                     f"{ms(r, 'engine_overlap_s')} | {ms(r, 'engine_sync_s')} | {r['tok_s']:.0f} | "
                     f"{r['roofline_step_s'] * 1e3:.2f} | {r['step_over_roofline']:.2f}x | {eng_ratio} | {hf_cells} |")
    return "\n".join(lines)


def markdown() -> str:
    c, t, e = R.get("correctness", {}), R.get("ttft", {}), R.get("engine_decode", {})
    lines = [f"# Engine on the GPU: {R['shape']} {R['dtype']} ({R['date']}, commit {R['commit']}, {R['device']})", "",
             f"Command: `{R['command']}`  ",
             f"Ceilings measured in the same run: D2D copy {R.get('copy_tbps', 0):.2f} TB/s (read + write), "
             f"bf16 matmul {R.get('matmul_tflops', 0):.0f} TFLOP/s.  ",
             f"KV caches: {json.dumps({k: v['kv_cache'] for k, v in R.get('engines', {}).items()})}", "",
             f"Correctness (greedy, float32 reference): {c.get('match')}/{c.get('tokens')} equal, "
             f"{c.get('near_ties')} near-ties, {c.get('mismatches')} mismatches; prompts {c.get('prompt_lens')}.", "",
             "## Decode steps", "", TABLE_LEGEND, "", table(), ""]
    if e:
        lines += [f"Whole engine loop (scheduler + inputs + graph + detokenize; overlap_decode "
                  f"{'on' if e.get('overlap') else 'off'}), requests prefilled first, B={e['batch']}, context "
                  f"~{e['context']}: {e['step_median_s'] * 1e3:.2f} ms/step, {e['tok_s']:.0f} tok/s.", ""]
    if R.get("prefill"):
        lines += ["## Prefill (one prompt, chunked by max_num_batched_tokens)", "",
                  "| prompt | ms | tok/s | TFLOP/s | ceiling tok/s | fraction |", "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['prompt_len']} | {r['s'] * 1e3:.1f} | {r['tok_s']:.0f} | {r['tflops']:.0f} | "
                  f"{r['ceiling_tok_s']:.0f} | {r['fraction_of_ceiling']:.0%} |" for r in R["prefill"]]
        lines.append("")
    if t:
        lines += [f"## One request end to end ({t['prompt_len']}-token prompt, {t['new_tokens']} tokens)", "",
                  f"TTFT {t['ttft_s'] * 1e3:.1f} ms, TPOT {t['tpot_s'] * 1e3:.2f} ms; median decode step "
                  f"{t['decode_step_median_s'] * 1e3:.2f} ms = "
                  + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in t["breakdown_median_s"].items()), ""]
    lines += [f"Errors / skipped: {R['errors']}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", str(REPO / "bench" / "results")))
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip sections started after this")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--kv", nargs="*", default=["bf16", "fp8"], choices=["bf16", "fp8"],
                    help="KV dtypes to run (bf16 also runs correctness, TTFT, prefill and HF)")
    args = ap.parse_args()
    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True).strip()
    except Exception:
        sha = os.environ.get("GIT_COMMIT", "unknown")
    R.update(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), commit=sha,
             command="python3 bench/engine.py " + " ".join(sys.argv[1:]), shape=SHAPE, dtype=DTYPE,
             device=torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu", decode=[])
    if SMOKE:
        from splitserve.kernels.testing import patch_interpreter_bf16_dot
        patch_interpreter_bf16_dot()
    section("ceiling", bench_ceiling, args)
    longest = max(PREFILLS + CONTEXTS) + 64
    for kv_dtype, kv_name in (("auto", "bf16"), ("fp8_e4m3", "fp8")):
        if kv_name not in args.kv:
            continue
        if now_s() > args.budget_s:
            break
        args.eng, args.kv_name = make_engine(kv_dtype, longest), kv_name
        if kv_name == "bf16":
            for name, fn in (("correct", bench_correct), ("ttft", bench_ttft), ("prefill", bench_prefill),
                             ("engine32", bench_engine32)):
                section(name, fn, args)
        section(f"decode-{kv_name}", bench_decode, args)
        if kv_name == "bf16":
            # the baseline runs here, on the bf16 engine's weights, before anything else can eat
            # the time budget (v1 lost it); the KV cache and graphs go first to free memory
            args.model, args.arch = args.eng.model, args.eng.arch
            args.eng.runner = args.eng.kv_cache = args.eng.pipeline = None
            gc.collect()
            if DEV.type == "cuda":
                torch.cuda.empty_cache()
            section("hf", bench_hf, args)
            args.model = None
        free_engine(args.eng)
        args.eng = None
    R["table"] = table()
    write_json(args)
    try:
        (Path(args.out) / "engine-gpu.md").write_text(markdown())
    except Exception:
        traceback.print_exc()
    print(f"\n[{now_s():.0f}s] {R['shape']} {R['dtype']} on {R['device']}, commit {R['commit']}; "
          f"copy {R.get('copy_tbps', 0):.2f} TB/s, matmul {R.get('matmul_tflops', 0):.0f} TFLOP/s")
    print(json.dumps({k: R.get(k) for k in ("correctness", "ttft", "engine_decode")}, default=str)[:1500])
    print(R["table"])
    print("errors:", R["errors"])


if __name__ == "__main__":
    main()
