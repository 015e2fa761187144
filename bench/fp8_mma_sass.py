#!/usr/bin/env python3
"""What an FP8 (e4m3) mma.sync becomes on sm_90: compiled, not run (no GPU needed).

    python3 bench/fp8_mma_sass.py          # needs Triton >= 3.6 (Gluon); prints SASS op counts

Issue 3's FP8 decode converts K and V to fp16 in registers before mma.sync (session 16: 128
conversions per warp and tile). This compiles one Gluon `mma_v2` m16n8k32 with e4m3 operands
for sm_90 (PTX `mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32`) and counts the SASS
ptxas makes of it: if the e4m3 mma.sync were native on Hopper, an FP8 decode could skip the
conversions with q and p split into two e4m3 terms each; if ptxas lowers it to conversions
plus fp16 HMMAs, only wgmma (64-row tiles, asynchronous) consumes e4m3 directly.
"""
from __future__ import annotations

import sys
from pathlib import Path

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sm90_sass import compile_sm90, sass_ops  # noqa: E402


@gluon.jit
def _one_mma(a_ptr, b_ptr, c_ptr):
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1],
                                                   instr_shape=[16, 8])
    la: gl.constexpr = gl.DotOperandLayout(0, mma, 4)
    lb: gl.constexpr = gl.DotOperandLayout(1, mma, 4)
    ra = gl.arange(0, 16, layout=gl.SliceLayout(1, la))
    ka = gl.arange(0, 32, layout=gl.SliceLayout(0, la))
    a = gl.load(a_ptr + ra[:, None] * 32 + ka[None, :])
    kb = gl.arange(0, 32, layout=gl.SliceLayout(1, lb))
    nb = gl.arange(0, 8, layout=gl.SliceLayout(0, lb))
    b = gl.load(b_ptr + kb[:, None] + nb[None, :] * 32)
    acc = mma_v2(a, b, gl.zeros([16, 8], gl.float32, mma))
    rc = gl.arange(0, 16, layout=gl.SliceLayout(1, mma))
    nc = gl.arange(0, 8, layout=gl.SliceLayout(0, mma))
    gl.store(c_ptr + rc[:, None] * 8 + nc[None, :], acc)


def main() -> None:
    src = GluonASTSource(_one_mma, {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "c_ptr": "*fp32"})
    ck, sass, _ = compile_sm90(src, num_warps=1)
    ptx_mma = [ln.strip() for ln in ck.asm["ptx"].splitlines() if ln.strip().startswith("mma.")]
    print(f"triton {triton.__version__}, PTX:", *ptx_mma, sep="\n  ")
    keep = {k: v for k, v in sass_ops(sass).items() if k.startswith(("HMMA", "F2FP", "QMMA", "IMMA"))}
    print("SASS tensor-core and conversion ops (sm_90):", keep)
    if not any(k.startswith("QMMA") for k in keep) and any(k.startswith("F2FP") for k in keep):
        print("-> the e4m3 mma.sync is lowered to e4m3->f16 conversions + fp16 HMMA on sm_90")


if __name__ == "__main__":
    main()
