#!/usr/bin/env python3
"""The fixed cost of one kernel replayed from a CUDA graph on the GPU: the part of issue 3's
batch-1 rows ("within 2x of the bytes/bandwidth ideal") that no byte rate can hide.

    python3 bench/launch_floor.py --out DIR      # H200: seconds

Each row is the median us per call of a graph of `--calls` back-to-back launches:
  empty_P        a Triton kernel of P programs that does nothing
  empty_P_pdl    the same launched with PDL, waiting for its predecessor and triggering its
                 successor at the end (as the batch-1 decode launches: `kernels/_pdl.py` LATE)
  chain_P_pdl    P programs, each after the wait: seq_len -> block table -> one 256-byte KV
                 row at that block -> store (the decode's dependent loads, no math), over
                 rotated copies of a 64 MiB cache so the KV row comes from HBM
Compare with `bench/decode_ab.py --cases 1x16 ... --table-tokens 4096` (the decode with almost
no KV at the batch-1 split count). Writes DIR/launch-floor.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels._pdl import LATE, pdl_trigger, pdl_wait  # noqa: E402
from kernels.testing import graph_time_us  # noqa: E402


@triton.jit
def _empty(x_ptr, PDL: tl.constexpr):
    pdl_wait(PDL)
    pdl_trigger(PDL)


@triton.jit
def _chain(seq_lens_ptr, table_ptr, kv_ptr, out_ptr, ROW: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    pid = tl.program_id(0)
    n = tl.load(seq_lens_ptr)
    blk = tl.load(table_ptr + pid % n).to(tl.int64)
    offs = tl.arange(0, ROW)
    row = tl.load(kv_ptr + blk * ROW + offs)
    pdl_trigger(PDL)
    tl.store(out_ptr + pid * ROW + offs, row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--calls", type=int, default=256)
    ap.add_argument("--programs", type=int, nargs="*", default=[1, 128])
    args = ap.parse_args()
    dev = torch.device("cuda")
    x = torch.empty(1, device=dev)
    row_elems = 128                                  # 256 bytes of bf16: one token's K of a head
    blocks = (64 << 20) // (row_elems * 2)
    kv = torch.randn(blocks, row_elems, device=dev, dtype=torch.bfloat16)
    seq_lens = torch.tensor([1024], dtype=torch.int32, device=dev)
    tables = [torch.randperm(blocks, device=dev)[:1024].to(torch.int32) for _ in range(args.calls)]
    out = torch.empty(max(args.programs) * row_elems, device=dev, dtype=torch.bfloat16)
    rows = {}
    for p in args.programs:
        rows[f"empty_{p}"] = graph_time_us([lambda p=p: _empty[(p,)](x, PDL=0)] * args.calls)
        rows[f"empty_{p}_pdl"] = graph_time_us(
            [lambda p=p: _empty[(p,)](x, PDL=LATE, launch_pdl=True)] * args.calls)
        rows[f"chain_{p}_pdl"] = graph_time_us(
            [lambda p=p, t=t: _chain[(p,)](seq_lens, t, kv, out, ROW=row_elems, PDL=LATE,
                                           launch_pdl=True) for t in tables])
    for k, v in rows.items():
        print(f"{k:>16}: {v:6.2f} us per call", flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "launch-floor.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "commit": os.environ.get("GIT_COMMIT", ""),
         "calls": args.calls, "us_per_call": rows}, indent=1))


if __name__ == "__main__":
    main()
