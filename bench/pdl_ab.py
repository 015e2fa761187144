"""A/B of decode-step variants on the step's CUDA graphs: programmatic dependent launch
(kernels/_pdl.py; --ab pdl, and where it triggers: --ab trigger), the decode attention's large-grid
tiles (--ab largetiles), its K/V L2 prefetch and split length (--ab kvprefetch), RoPE + KV
write in the QKV GEMV's epilogue (--ab rope), the GEMMs' BLAS library (--ab blas), the
skinny Triton GEMM (--ab skinny), the greedy argmax (torch's vs kernels/argmax.py; --ab argmax) or
the logits' dtype (float32 vs the LM head's; --ab logits).

One engine (dummy Llama-3-8B on the GPU, bf16 or FP8 KV; tiny float16 under --smoke), its
decode graphs captured under each variant in turn, twice, interleaved (a variant sets
environment variables, read at each launch, and attributes of the fused forward, read at
capture); each capture's graph replay time per batch, back to back, timed by CUDA events, and
the greedy tokens and logits of one step against the first variant's, which must not change.

    python bench/pdl_ab.py --out $OUT [--ab pdl|trigger|largetiles|kvprefetch|fp8splits|rope|
                                         blas|skinny|argmax|logits] [--kv bf16|fp8] [--batches 1,8,32]
                           [--variants a,b] [--context 1024] [--table-tokens 8448]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_common import DEV, DTYPE, SHAPE, SMOKE, replay_time  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402  (after engine_common: --smoke sets TRITON_INTERPRET first)

from splitserve.config import Config  # noqa: E402
from splitserve.engine.engine import LLMEngine  # noqa: E402
from splitserve.engine.loader import load_dummy  # noqa: E402
from splitserve.kernels import decode_plan  # noqa: E402

BATCHES = (1, 2) if SMOKE else (1, 8, 32)
# pdl: PDL off; PDL from two rows; PDL at one row too. (Sessions 9 and 11 also timed GEMVs
# loading / L2-prefetching their first weight tiles before the PDL wait: slower or no gain,
# removed; bench/results/pdl-ab-v2-2026-11-29.md, engine-2026-11-30-s11.md. Session 12 timed
# lm_head writing float32 logits itself (torch.mm out_dtype) instead of a cast kernel: 4147 vs
# 4145 us at batch 1, removed; and splits past a short sequence's end skipping the fused
# merge's stores and count: 4120 vs 4124 us, removed; engine-2026-11-30-s12.md. The RoPE
# kernel's slot/v loads before vs after its rotation, --ab ropeloads at 6893ee0, decided for
# "before", its switch removed. Session 14 timed an L2 prefetch of the o weight before attention
# and of the next layer's qkv before the down GEMM (prefetch.global.L2 / cp.async.bulk, --ab l2w
# at c4a6bfa): every variant slower, +90-600 us per step; removed; engine-2026-11-30-s14.md.)
# (name, environment, attributes "fused.<name>" of the FusedForward / "runner.<name>" of the
# DecodeGraphRunner / "decode.<name>" of kernels/decode_plan.py)
AB = {
    "pdl": [("off", {"SPLITSERVE_PDL": "0", "SPLITSERVE_PDL_MIN_ROWS": "2"}, {}),
            ("pdl", {"SPLITSERVE_PDL": "1", "SPLITSERVE_PDL_MIN_ROWS": "2"}, {}),
            ("pdl1", {"SPLITSERVE_PDL": "1", "SPLITSERVE_PDL_MIN_ROWS": "1"}, {})],
    # where a PDL kernel lets its successor launch: right after its wait, or after its main loop
    "trigger": [("off", {"SPLITSERVE_PDL": "0", "SPLITSERVE_PDL_MIN_ROWS": "2",
                         "SPLITSERVE_PDL_TRIGGER": "early"}, {}),
                ("early-from2", {"SPLITSERVE_PDL": "1", "SPLITSERVE_PDL_TRIGGER": "early",
                                 "SPLITSERVE_PDL_MIN_ROWS": "2"}, {}),
                ("early-from1", {"SPLITSERVE_PDL": "1", "SPLITSERVE_PDL_TRIGGER": "early",
                                 "SPLITSERVE_PDL_MIN_ROWS": "1"}, {}),
                ("late-from1", {"SPLITSERVE_PDL": "1", "SPLITSERVE_PDL_TRIGGER": "late",
                                "SPLITSERVE_PDL_MIN_ROWS": "1"}, {}),
                ("late-from2", {"SPLITSERVE_PDL": "1", "SPLITSERVE_PDL_TRIGGER": "late",
                                "SPLITSERVE_PDL_MIN_ROWS": "2"}, {}),
                ("auto-from1", {"SPLITSERVE_PDL": "1", "SPLITSERVE_PDL_TRIGGER": "auto",
                                "SPLITSERVE_PDL_MIN_ROWS": "1"}, {})],
    # the RoPE + KV-write kernel per layer vs the same work in the QKV GEMV's epilogue
    "rope": [("rope-kernel", {}, {"fused.fuse_rope_epilogue": False}),
             ("rope-epilogue", {}, {"fused.fuse_rope_epilogue": True})],
    # the decode attention's large-grid tiles (kernels/decode_plan.py) vs the defaults
    "largetiles": [("default-tiles", {}, {"decode.LARGE_BATCH_TILES": ()}),
                   ("large-tiles", {}, {"decode.LARGE_BATCH_TILES": decode_plan.LARGE_BATCH_TILES})],
    # the decode attention's L2 prefetch of its K/V before the PDL wait, and shorter splits
    # (every variant sets all three: a pass runs them in turn and attributes persist)
    "kvprefetch": [(name, {}, {"decode.KV_PREFETCH_MAX_SEQS": pf, "decode.MIN_CHUNK": chunk,
                               "decode.BATCH_TILES": tiles})
                   for name, pf, chunk, tiles in (
                       ("no-prefetch", 0, 256, decode_plan.BATCH_TILES),   # before session 12
                       ("prefetch", 1, 256, decode_plan.BATCH_TILES),
                       ("chunk128", 0, 128, decode_plan.BATCH_TILES),
                       ("chunk128-prefetch", 1, 128, decode_plan.BATCH_TILES),   # the default
                       ("chunk64", 0, 64, tuple((m, f, (64,) + t[1:], h)
                                                for m, f, t, h in decode_plan.BATCH_TILES)),
                       ("chunk64-prefetch", 1, 64, tuple((m, f, (64,) + t[1:], h)
                                                         for m, f, t, h in decode_plan.BATCH_TILES)))],
    # FP8 batch-1 decode: up to 32 splits merged in the launch (bench/decode_ab.py: 4k 10.3 ->
    # 9.7 us, 8k 15.7 -> 14.9) vs the 16 of bf16
    "fp8splits": [("merge16", {}, {"decode.FUSED_MERGE_MAX_SPLITS_FP8": 16}),
                  ("merge32", {}, {"decode.FUSED_MERGE_MAX_SPLITS_FP8": 32})],
    # the GEMMs' BLAS library (torch.backends.cuda.preferred_blas_library, set before capture)
    "blas": [("cublas", {"SPLITSERVE_BLAS": "cublas"}, {}),
             ("cublaslt", {"SPLITSERVE_BLAS": "cublaslt"}, {})],
    # the GEMMs: cuBLAS everywhere vs the skinny Triton GEMM where its table has a tile
    # (skinny-silu: gate_up's SiLU fused too, with the module's SILU_TILES or those of
    # --silu-tiles FILE, {M: tile}, i.e. the default; skinny-cublas-qkv: the default but the QKV
    # projection at M <= 32 on cuBLAS, where the sweep found the two level)
    "skinny": [("cublas", {}, {"fused.skinny_gemm": False, "skinny.SILU_TILES": {}}),
               ("skinny", {}, {"fused.skinny_gemm": True, "skinny.SILU_TILES": {},
                               "skinny.TILES": "--tiles"}),
               ("skinny-silu", {}, {"fused.skinny_gemm": True, "skinny.SILU_TILES": "--silu-tiles",
                                    "skinny.TILES": "--tiles"}),
               ("skinny-cublas-qkv", {}, {"fused.skinny_gemm": True, "skinny.SILU_TILES": "--silu-tiles",
                                          "skinny.TILES": "--tiles-qkv"}),
               # the default table with the tiles of --extra-tiles FILE (linear_sweep.py's
               # linear-tiles.json) replacing or adding entries
               ("skinny-extra", {}, {"fused.skinny_gemm": True, "skinny.SILU_TILES": "--silu-tiles",
                                     "skinny.TILES": "--extra-tiles"})],
    "argmax": [("torch-argmax", {}, {"runner.split_argmax": False}),
               ("split-argmax", {}, {"runner.split_argmax": True})],
    # the graphs' logits: cast to float32 in the graph (before session 16) or left in the LM
    # head's dtype (the argmax reads half the bytes, no cast kernel)
    "logits": [("float-logits", {}, {"runner.float_logits": True}),
               ("model-dtype-logits", {}, {"runner.float_logits": False})],
}
CONTEXT = 64 if SMOKE else 1024


def build(kv_dtype: str, batches, table_tokens: int = 0) -> LLMEngine:
    cfg = Config().replace("model", model=f"dummy:{SHAPE}", device=DEV.type, dtype=DTYPE, seed=0)
    cfg = cfg.replace("cache", enable_prefix_caching=False, memory_fraction=0.5, kv_dtype=kv_dtype,
                      **({"num_blocks": 64} if SMOKE else {}))
    cfg = cfg.replace("scheduler", max_num_seqs=max(batches),
                      max_model_len=max(CONTEXT + 64, table_tokens),
                      max_num_batched_tokens=256)
    return LLMEngine(cfg, load_dummy(SHAPE, getattr(torch, DTYPE), DEV.type, 0), DEV, attention="triton")


def inputs(eng, b: int, batches) -> "DecodeInputs":
    """Batch b's step: random blocks, disjoint from every other batch size's, so one batch's
    KV write (its new token) never changes the context another batch reads: a variant's second
    pass then sees exactly the cache of its first (sessions 12-13 compared FP8 passes that
    shared blocks and saw near-tie flips from that alone)."""
    from splitserve.engine.cuda_graph import DecodeInputs
    rng = np.random.default_rng(b)
    bs = eng.kv_cache.block_size
    nb = -(-CONTEXT // bs)
    first = sum(x * nb for x in sorted(batches) if x < b)
    perm = np.random.default_rng(12345).permutation(eng.kv_cache.num_blocks)
    if first + b * nb > perm.size:
        raise SystemExit(f"{sum(batches) * nb} blocks needed for disjoint batches; the cache has {perm.size}")
    blocks = perm[first:first + b * nb].reshape(b, nb)
    slots = [int(blocks[i, -1]) * bs + (CONTEXT - 1) % bs for i in range(b)]
    ids = rng.integers(2, eng.arch.vocab_size, b).tolist()
    return DecodeInputs(ids, [CONTEXT - 1] * b, slots, [CONTEXT] * b, [r.tolist() for r in blocks])


def main() -> None:
    global CONTEXT
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run (no graphs, no timing)")
    ap.add_argument("--ab", choices=sorted(AB), default="pdl")
    ap.add_argument("--kv", choices=["bf16", "fp8"], default="bf16")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated")
    ap.add_argument("--variants", default="", help="comma-separated subset of the A/B's variants")
    ap.add_argument("--context", type=int, default=CONTEXT, help="tokens of context per sequence")
    ap.add_argument("--table-tokens", type=int, default=0,
                    help="max_model_len at least this (the split plan follows the table's width)")
    ap.add_argument("--silu-tiles", default="", help="JSON {M: tile} for gate_up + SiLU (--ab skinny)")
    ap.add_argument("--extra-tiles", default="", help="linear_sweep.py's linear-tiles.json (--ab skinny)")
    args = ap.parse_args()
    CONTEXT = args.context
    batches = [int(b) for b in args.batches.split(",")]
    eng = build("fp8_e4m3" if args.kv == "fp8" else "auto", batches, args.table_tokens)
    kv = eng.kv_cache.kv
    for i in range(kv.shape[0]):          # random KV (FP8: normal values cast, scales 1)
        kv[i] = torch.randn(kv[i].shape, device=kv.device).to(kv.dtype)
    runner = eng.runner.decode_graphs
    rows, tokens = [], {}
    variants = AB[args.ab][:2] if SMOKE else AB[args.ab]
    if args.variants:
        keep = args.variants.split(",")
        unknown = set(keep) - {n for n, _, _ in AB[args.ab]}
        if unknown:
            ap.error(f"unknown variants {sorted(unknown)} for --ab {args.ab}")
        variants = [v for v in AB[args.ab] if v[0] in keep]
    from splitserve.kernels import skinny_gemm
    objs = {"fused": eng.model._fused, "runner": runner, "decode": decode_plan, "skinny": skinny_gemm}
    launches = {"n": 0, "silu": 0}     # skinny GEMM launches per capture: proof the path ran
    plain_skinny = skinny_gemm.skinny_linear

    def counted(*a, **kw):
        launches["n"] += 1
        launches["silu"] += bool(kw.get("silu"))
        return plain_skinny(*a, **kw)
    skinny_gemm.skinny_linear = counted
    silu_tiles, tiles = dict(skinny_gemm.SILU_TILES), dict(skinny_gemm.TILES)
    qkv = tuple(eng.model.layers[0]["qkv"].shape)
    tiles_extra = {k: dict(v) for k, v in tiles.items()}
    if args.extra_tiles:
        from gemm_ab import SHAPES as GEMM_SHAPES
        for name, per in json.loads(Path(args.extra_tiles).read_text()).items():
            if name in GEMM_SHAPES:
                tiles_extra.setdefault(GEMM_SHAPES[name], {}).update(
                    {int(m): skinny_gemm.LinearTile(*t) for m, t in per.items()})
    elif args.ab == "skinny":
        variants = [v for v in variants if v[0] != "skinny-extra"]
    tiles_no_qkv = dict(tiles)
    tiles_no_qkv[qkv] = {c: t for c, t in tiles.get(qkv, {}).items() if c > 32}
    if args.silu_tiles:
        per = json.loads(Path(args.silu_tiles).read_text())
        w = eng.model.layers[0]["gate_up"]
        silu_tiles = {tuple(w.shape): {int(m): skinny_gemm.LinearTile(*t) for m, t in per.items()}}
    for trial in range(1 if SMOKE else 2):       # two passes, interleaved: drift shows
        for name, env, attrs in variants:
            os.environ.update(env)
            for k, v in attrs.items():
                if isinstance(v, str) and v.startswith("--"):
                    v = {"--silu-tiles": silu_tiles, "--tiles": tiles, "--tiles-qkv": tiles_no_qkv,
                         "--extra-tiles": tiles_extra}[v]
                obj, attr = k.split(".")
                setattr(objs[obj], attr, v)
            if "SPLITSERVE_BLAS" in env:
                torch.backends.cuda.preferred_blas_library(env["SPLITSERVE_BLAS"])
            runner._graphs, runner._outputs = {}, {}
            launches.update(n=0, silu=0)
            runner.capture()
            if launches["n"]:
                print(f"  {name}: {launches['n']} skinny GEMM launches ({launches['silu']} with SiLU) "
                      "in warm-up + capture", flush=True)
            for b in batches:
                logits, toks = runner.run(inputs(eng, b, batches))
                logits, toks = logits.float().cpu(), toks.tolist()
                same = diff = None
                if b in tokens:    # against the first variant's first capture: the same step's output
                    ref_logits, ref_toks = tokens[b]
                    same = toks == ref_toks
                    diff = float((logits - ref_logits).abs().max())
                    if not same:   # a near-tie flip (tiny logit change) or a real difference?
                        top2 = ref_logits.topk(2, dim=-1).values
                        gaps = (top2[:, 0] - top2[:, 1]).tolist()
                        bad = [i for i, (x, y) in enumerate(zip(toks, ref_toks)) if x != y]
                        print(f"  B={b} {name}: tokens differ at rows {bad}, reference top-2 gaps "
                              f"{[round(gaps[i], 5) for i in bad]}, max |logit diff| {diff:.5f}", flush=True)
                else:
                    tokens[b] = (logits, toks)
                t = replay_time(runner, b, reps=50)        # None without graphs (CPU)
                us = float("nan") if t is None else t * 1e6
                rows.append(dict(trial=trial, ab=args.ab, kv=args.kv, variant=name, env=env, attrs=attrs,
                                 batch=b, context=CONTEXT, replay_us=us, tokens_equal=same,
                                 max_logit_diff=diff))
                print(f"{name:>14} B={b} ctx={CONTEXT}: {us:.1f} us per step replay"
                      + ("" if same is None else f", tokens {'equal' if same else 'DIFFER'}, "
                         f"max |logit diff| {diff:.5f}"), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{args.ab}-ab-{args.kv}.json").write_text(json.dumps(rows, indent=1))
    for b in batches:
        best = {n: min(r["replay_us"] for r in rows if r["batch"] == b and r["variant"] == n)
                for n, _, _ in variants}
        print(f"B={b}: " + ", ".join(f"{n} {v:.1f}" for n, v in best.items()) + " us (best of passes)")


if __name__ == "__main__":
    main()
