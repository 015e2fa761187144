"""Paged decode attention vs its split count, in a CUDA graph (issue 3/4); batch 1 by default.

The engine plans a decode step's splits from the block table's width (the longest context it
can hold), not from the actual lengths (no host reads), so a short context in an engine with a
long max_model_len gets the long context's split count; past FUSED_MERGE_MAX_SPLITS the merge
is a second launch. This times B=1 Llama-3-8B heads (32 q / 8 kv, d=128, 16-token pages) at
several context lengths for every split count, against the bytes/bandwidth ideal, and prints
what plan_decode_splits picks for the context itself and for an 8k-token table.

    python bench/decode_splits.py --out $OUT        # writes decode-splits-b1-p16.json
    python bench/decode_splits.py --out $OUT --batch 32 --page 32 --lengths 1024  # engine FP8
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kbench import K, DECODE, bench, bench_graph  # noqa: E402
from kernels import Paged  # noqa: E402  (bench/kernels.py)
import torch  # noqa: E402

SPLITS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp")
    ap.add_argument("--kv", nargs="*", default=["bf16", "fp8"])
    ap.add_argument("--lengths", default="1024,4096,8192,32768,131072")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--page", type=int, default=16, help="tokens per KV block")
    args = ap.parse_args()
    B = args.batch
    a = torch.randn(2 ** 30, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    bw = 2 * a.numel() * 2 / bench(lambda: b.copy_(a)) / 1e6     # TB/s, read + write
    del a, b
    print(f"copy bandwidth {bw:.2f} TB/s", flush=True)
    rows = []
    for kv in args.kv:
        for L in (int(x) for x in args.lengths.split(",")):
            sets = max(1, (64 << 20) // (4096 * L * B))              # >= 64 MiB: past the L2
            p = Paged(B, L, kv, sets=sets, seed=L, page=args.page)
            ideal = p.kv_bytes / bw / 1e6                             # us at the copy rate
            plans = {m: K.plan_decode_splits(B, 8, m, p.q.device, fp8=kv == "fp8") for m in (L, 8448)}
            print(f"{kv} B={B} page={args.page} L={L}: ideal {ideal:.1f} us; plan {plans[L]} "
                  f"splits for this length, {plans[8448]} for an 8448-token table", flush=True)
            for s in SPLITS:
                if s > 1 and (L // s) < 64:
                    continue
                outs = [torch.empty_like(p.q) for _ in range(sets)]
                scr = K.alloc_split_kv_scratch(B, 32, 128, s, p.q.device) if s > 1 else None

                def run(i, s=s, scr=scr):
                    K.paged_decode_attention(p.q, p.k_cache, p.v_cache, p.tables[i], p.seq_lens,
                                             128 ** -0.5, p.k_scale, p.v_scale, out=outs[i],
                                             num_splits=s, scratch=scr)
                run(0)
                err = p.check(outs[0])
                us = bench_graph([lambda i=i: run(i) for i in range(sets)])
                fused = s <= DECODE.FUSED_MERGE_MAX_SPLITS
                rows.append(dict(kv=kv, B=B, page=args.page, L=L, splits=s, us=us, ideal_us=ideal,
                                 x_ideal=us / ideal, fused_merge=fused, rel_err=err,
                                 plan_len=plans[L], plan_8448=plans[8448]))
                print(f"  splits {s:>3} ({'fused' if fused else 'separate'} merge): {us:7.1f} us "
                      f"({us / ideal:.2f}x ideal), rel err {err:.1e}", flush=True)
            del p
            torch.cuda.empty_cache()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"decode-splits-b{B}-p{args.page}.json").write_text(
        json.dumps(dict(copy_TBps=bw, rows=rows), indent=1))


if __name__ == "__main__":
    main()
