#!/usr/bin/env python3
"""One paged-decode case, called eagerly a few times, for a profiler to attach to (issues 3/4).

    ncu --kernel-name regex:_decode_kernel --launch-skip 3 --launch-count 1 \\
        python3 bench/decode_once.py --case 128x1024 --kv fp8 --page 32
    python3 bench/decode_once.py --case 128x1024 --kv fp8 --page 32 --set LARGE_BATCH_TILES=()

Prints the launch the plan chose (tiles, kv heads per program, splits) and, for every compiled
variant of the decode kernel, Triton's registers per thread, spills and shared memory.
--set ATTR=value changes a kernels/decode_plan.py setting first (as bench/decode_ab.py does).
"""
from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kbench import DECODE, HKV  # noqa: E402
from kernels import Paged  # noqa: E402  (bench/kernels.py)
import torch  # noqa: E402


# PTX instructions counted per compiled variant (--asm): which tensor-core path Triton chose
# and what surrounds it
PTX_OPS = ("wgmma.mma_async", "mma.sync", "ldmatrix", "cvt.rn.f16x2.e4m3x2", "cvt", "ld.shared",
           "st.shared", "cp.async", "ld.global", "bar.sync")


def compiled_kernels(fn) -> list:
    out = []
    for caches in getattr(fn, "device_caches", {}).values():
        cache = caches[0] if isinstance(caches, tuple) else caches
        out.extend(getattr(cache, "values", lambda: [])())
    return out


def compiled_variants(fn, asm_dir: str | None = None) -> list[dict]:
    """Registers, spills and shared bytes of each compiled specialization of a Triton kernel
    (best effort across Triton versions); with asm_dir, its PTX written there and the counts
    of PTX_OPS."""
    out = []
    for i, ck in enumerate(compiled_kernels(fn)):
        meta = getattr(ck, "metadata", None)
        row = {"n_regs": getattr(ck, "n_regs", None), "n_spills": getattr(ck, "n_spills", None),
               "shared": getattr(meta, "shared", None), "num_warps": getattr(meta, "num_warps", None),
               "num_stages": getattr(meta, "num_stages", None)}
        ptx = getattr(ck, "asm", {}).get("ptx") if asm_dir else None
        if ptx:
            Path(asm_dir).mkdir(parents=True, exist_ok=True)
            (Path(asm_dir) / f"decode-{i}.ptx").write_text(ptx)
            lines = [ln.strip() for ln in ptx.splitlines()]
            row["ptx"] = {op: sum(ln.startswith(op) for ln in lines) for op in PTX_OPS}
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", default="128x1024", help="BxL")
    ap.add_argument("--kv", default="fp8", choices=["bf16", "fp8"])
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--calls", type=int, default=8)
    ap.add_argument("--set", nargs="*", default=[], help="decode_plan ATTR=value")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run under the interpreter")
    ap.add_argument("--asm", default=None, help="write each variant's PTX here, count PTX_OPS")
    a = ap.parse_args()
    for item in a.set:
        key, _, value = item.partition("=")
        if not hasattr(DECODE, key):
            raise SystemExit(f"kernels/decode_plan.py has no setting {key!r}")
        setattr(DECODE, key, ast.literal_eval(value))
    b, length = (int(v) for v in a.case.split("x"))
    p = Paged(b, length, a.kv, page=a.page)
    fp8 = a.kv == "fp8"
    tiles, hpp = DECODE.launch_shape(b, HKV, fp8)
    splits = DECODE.plan_decode_splits(b, HKV, length, p.q.device, fp8)
    print(f"B={b} L={length} {a.kv} page {a.page}: tiles {tiles}, {hpp} kv heads per program, {splits} splits")
    out = torch.empty_like(p.q)
    for _ in range(a.calls):
        p.decode(0, out)
    if not a.smoke:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(a.calls):
        p.decode(0, out)
    if not a.smoke:
        torch.cuda.synchronize()
    print(f"eager {(time.perf_counter() - t) / a.calls * 1e6:.1f} us per call (host launch included)")
    from splitserve.kernels import decode_attention
    for v in compiled_variants(decode_attention._decode_kernel, a.asm):
        print("compiled:", v)


if __name__ == "__main__":
    main()
