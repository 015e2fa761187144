"""Same-process A/B of the paged decode kernel's module settings, in CUDA graphs (issues 3/4).

Each variant sets attributes of kernels/decode_plan.py (read at launch), is checked
against the float32 reference, and is timed as a CUDA graph of one decode call per cache copy
(enough copies to defeat the L2, preallocated scratch as in the engine). Variants alternate,
`--passes` times over; the table keeps each variant's best pass and every pass is in the JSON.
`--table-tokens` plans the splits for a wider block table than the context (the engine plans
from its max_model_len: 8448 tokens in bench/engine.py).

    python3 bench/decode_ab.py --out $OUT --cases 1x1024 1x4096 8x4096 --kv bf16 fp8 \\
        --variants base: prefetch:KV_PREFETCH_MAX_SEQS=8 --table-tokens 8448
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kbench import DECODE, HKV, HQ, D, K, SMOKE, bench, bench_graph  # noqa: E402
from kernels import Paged  # noqa: E402  (bench/kernels.py)
import torch  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict]:
    """'name:ATTR=value;ATTR=value' (values as Python literals) -> (name, {attr: value})."""
    name, _, sets = text.partition(":")
    attrs = {}
    for item in filter(None, sets.split(";")):
        key, _, value = item.partition("=")
        if not hasattr(DECODE, key):
            raise SystemExit(f"kernels/decode_plan.py has no setting {key!r}")
        attrs[key] = ast.literal_eval(value)
    return name, attrs


def timed(p: Paged, B: int, table_tokens: int, kv: str) -> tuple[float, float, int]:
    """(graph us per call, relative error vs the reference, splits) under the current settings."""
    splits = K.plan_decode_splits(B, HKV, table_tokens, p.q.device, fp8=kv == "fp8")
    outs = [torch.empty_like(p.q) for _ in range(p.sets)]
    scratch = [K.alloc_split_kv_scratch(B, HQ, D, splits, p.q.device) if splits > 1 else None
               for _ in range(p.sets)]

    def run(i):
        K.paged_decode_attention(p.q, p.k_cache, p.v_cache, p.tables[i], p.seq_lens, D ** -0.5,
                                 p.k_scale, p.v_scale, out=outs[i], num_splits=splits,
                                 scratch=scratch[i])
    run(0)
    err = p.check(outs[0])
    us = bench(lambda: run(0)) if SMOKE else bench_graph([lambda i=i: run(i) for i in range(p.sets)])
    return us, err, splits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run under the interpreter")
    ap.add_argument("--cases", nargs="*", default=["1x1024", "1x4096", "8x4096"], help="BxL")
    ap.add_argument("--kv", nargs="*", default=["bf16", "fp8"])
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--table-tokens", type=int, default=0, help="plan splits for this table width")
    ap.add_argument("--variants", nargs="+", default=["base:"])
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--tag", default="decode-ab")
    args = ap.parse_args()
    variants = [parse_variant(v) for v in args.variants]
    defaults = {k: getattr(DECODE, k) for _, attrs in variants for k in attrs}
    rows = []
    for kv in args.kv:
        for case in args.cases:
            B, L = (int(x) for x in case.split("x"))
            if SMOKE:
                B, L = min(B, 2), min(L, 64)
            sets = 1 if SMOKE else max(1, (96 << 20) // (4096 * L * B))   # >= 96 MiB: past the L2
            p = Paged(B, L, kv, sets=sets, seed=B * 7 + L, page=args.page)
            table = max(args.table_tokens, L)
            for rep in range(args.passes):
                for name, attrs in variants:
                    for k, v in defaults.items():
                        setattr(DECODE, k, attrs.get(k, v))
                    us, err, splits = timed(p, B, table, kv)
                    rows.append(dict(kv=kv, B=B, L=L, page=args.page, table_tokens=table,
                                     variant=name, attrs=attrs, rep=rep, us=us, rel_err=err,
                                     splits=splits, kv_bytes=p.kv_bytes))
                    print(f"{kv} B={B} L={L} {name:>12} pass {rep}: {us:7.2f} us "
                          f"({splits} splits, rel err {err:.1e})", flush=True)
                    if err > 2e-2:
                        raise SystemExit(f"{name}: relative error {err:.2e} vs the reference")
            for k, v in defaults.items():
                setattr(DECODE, k, v)
            del p
            torch.cuda.empty_cache() if not SMOKE else None
    best = {}
    for r in rows:
        key = (r["kv"], r["B"], r["L"], r["variant"])
        best[key] = min(best.get(key, float("inf")), r["us"])
    lines = [f"| kv | B | L | " + " | ".join(n for n, _ in variants) + " |",
             "|---|---:|---:|" + "---:|" * len(variants)]
    for kv in args.kv:
        for case in args.cases:
            B, L = (int(x) for x in case.split("x"))
            if SMOKE:
                B, L = min(B, 2), min(L, 64)
            lines.append(f"| {kv} | {B} | {L} | "
                         + " | ".join(f"{best[(kv, B, L, n)]:.2f}" for n, _ in variants) + " |")
    table = "\n".join(lines)
    print(table, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag}.json").write_text(json.dumps(dict(args=vars(args), rows=rows), indent=1))
    (out / f"{args.tag}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
