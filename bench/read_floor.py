#!/usr/bin/env python3
"""How fast the H200 can read N bytes in one kernel replayed from a CUDA graph: the floor under
issue 3's "B=1..8 within 2x of the bytes/bandwidth ideal" rows.

    python3 bench/read_floor.py --out DIR        # H200: ~1 minute

For the KV bytes of the decode rows (B=1 x 4k: 16.8 MB, B=8 x 4k: 134 MB, B=1 x 128k: 537 MB),
each replayed from a CUDA graph over rotated copies (as bench/kernels.py times the decode
kernel), median us per call:
  stream_P   a Triton kernel of P programs, each summing its contiguous share (no dependent
             loads: the best case of a read), P in 128, 256, 512, 1024
  torch_sum  torch.sum of the bytes as bf16
  copy       a device-to-device copy of the bytes (reads + writes)
and the paged bf16 decode kernel on a cache of the same bytes (bench/kernels.py's Paged, timed
the way bench/kernels.py's graph rows are: preallocated split scratch, rotated cache copies).
The ideal of the kernels bench is bytes / copy bandwidth (4.25 TB/s); its target is 2x that.
Writes DIR/read-floor.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kbench import TESTING  # noqa: E402


@triton.jit
def _stream_sum(x_ptr, out_ptr, n_per_prog, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    base = x_ptr + pid.to(tl.int64) * n_per_prog
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(0, n_per_prog, BLOCK):
        acc += tl.load(base + i + tl.arange(0, BLOCK)).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc))


def stream(x: torch.Tensor, out: torch.Tensor, programs: int, block: int = 2048, warps: int = 8,
           stages: int = 4):
    n = x.numel() // programs
    assert n % block == 0, (x.numel(), programs, block)
    _stream_sum[(programs,)](x, out, n, BLOCK=block, num_warps=warps, num_stages=stages)


# 128 programs (the B=1 x 4k decode's grid) with more bytes in flight per program: (elements per
# load, warps, stages); session 16 read the 4 KB-per-load stream at 128 programs as latency-bound
WIDE_128 = ((8192, 8, 3), (16384, 8, 2), (16384, 16, 3), (32768, 16, 2))


def decode_us(tokens: int) -> float:
    from kernels import Paged   # bench/kernels.py
    b = 8 if tokens == 8 * 4096 else 1
    nbytes = tokens * 8 * 128 * 2 * 2
    p = Paged(b, tokens // b, "bf16", sets=max(1, min(16, math.ceil(256e6 / nbytes))), seed=1)
    outs = [torch.empty_like(p.q) for _ in range(p.sets)]
    scr = p.scratches()
    return TESTING.graph_time_us([lambda s=s: p.decode(s, outs[s], scr[s]) for s in range(p.sets)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    cases = {"B=1 x 4k": 1 * 4096, "B=8 x 4k": 8 * 4096, "B=1 x 128k": 131072}
    per_token = 8 * 128 * 2 * 2          # Llama-3-8B kv heads x d x (K, V) x bf16 bytes
    rows = []
    for name, tokens in cases.items():
        nbytes = tokens * per_token
        copies = max(4, math.ceil(400e6 / nbytes))
        xs = [torch.randn(nbytes // 2, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        ys = [torch.empty_like(x) for x in xs]
        part = torch.empty(1024, device="cuda", dtype=torch.float32)
        sums = [torch.empty((), device="cuda", dtype=torch.float32) for _ in xs]
        row = {"case": name, "MB": nbytes / 1e6, "ideal_us_at_4.25": nbytes / 4.25e6}
        for p in (128, 256, 512, 1024):
            row[f"stream_{p}"] = TESTING.graph_time_us([lambda x=x, p=p: stream(x, part, p) for x in xs])
        for blk, w, st in WIDE_128:
            if (nbytes // 2 // 128) % blk == 0:
                row[f"stream_128_b{blk}_w{w}_s{st}"] = TESTING.graph_time_us(
                    [lambda x=x, blk=blk, w=w, st=st: stream(x, part, 128, blk, w, st) for x in xs])
        row["torch_sum"] = TESTING.graph_time_us(
            [lambda x=x, s=s: torch.sum(x, 0, dtype=torch.float32, out=s) for x, s in zip(xs, sums)])
        row["copy"] = TESTING.graph_time_us([lambda x=x, y=y: y.copy_(x) for x, y in zip(xs, ys)])
        del xs, ys
        torch.cuda.empty_cache()
        row["decode_bf16"] = decode_us(tokens)
        rows.append(row)
        best = min(v for k, v in row.items() if k.startswith("stream_"))
        print(f"{name:>11} {row['MB']:7.1f} MB  ideal {row['ideal_us_at_4.25']:6.1f} us  best stream "
              f"{best:6.1f} us ({best / row['ideal_us_at_4.25']:.2f}x ideal)  "
              + "  ".join(f"{k} {v:.1f}" for k, v in row.items() if k.startswith(("stream", "torch", "copy")))
              + f"  decode {row['decode_bf16']:.1f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "read-floor.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "commit": os.environ.get("GIT_COMMIT", ""),
         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
