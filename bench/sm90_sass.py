"""Compile a Triton or Gluon kernel for sm_90 without a GPU, and read what ptxas made of it.

Used by bench/fp8_mma_sass.py and bench/gluon_b1_decode.py --compile-only (Triton >= 3.6: its
bundled ptxas and cuobjdump; no driver needed).
"""
from __future__ import annotations

import collections
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

_OP = re.compile(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def compile_sm90(src, num_warps: int = 4):
    """(compiled kernel, SASS text, cuobjdump's resource line) of an ASTSource/GluonASTSource."""
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        out = [subprocess.run([str(cuobjdump), flag, f.name], capture_output=True, text=True,
                              check=True).stdout for flag in ("-sass", "-res-usage")]
    return ck, out[0], out[1].strip().splitlines()[-1].strip()


def sass_ops(sass: str, base: bool = False) -> collections.Counter:
    """Instruction counts by opcode (base: without its modifiers, HMMA.16816.F32 -> HMMA)."""
    return collections.Counter(m.group(1).split(".")[0] if base else m.group(1)
                               for m in _OP.finditer(sass))
