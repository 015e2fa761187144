"""Programmatic dependent launch (PDL, sm_90+) for the kernels of a decode step.

A one-token decode step is a chain of ~200 small kernels (kernels/gemv.py's linears, RoPE + KV
write, decode attention per layer); between two of them the GPU idles for the next kernel's
launch. Launched with PDL, a kernel may start while its predecessor finishes: its programs
wait at `pdl_wait` (griddepcontrol.wait: the predecessor has completed and its writes are
visible) before reading anything, then allow their own successor to launch. A kernel waits
before its first load, so a predecessor that is not PDL-aware (cuBLAS, torch) only loses the
overlap, never the ordering; every kernel launched with PDL must call `pdl_wait` first.

Off under the Triton interpreter, on GPUs before sm_90, with SPLITSERVE_PDL=0, and for launches
over a single row (token / sequence): measured on the H200 (bench/pdl_ab.py, 2026-11-29, two
captures each), the Llama-3-8B decode step's graph replay with PDL took 4443 vs 4390 us at batch
1 (worse), 4894 vs 5103 us at batch 8 and 5945 vs 6120 us at batch 32; again in session 9
(pdl-ab-v2-2026-11-29.md): batch 1 with PDL 4376 vs 4334 us, batch 8 4818-4950 vs 5029 us.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ._common import interpreting


@functools.lru_cache(maxsize=None)
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def use_pdl(device: torch.device, rows: int = 2) -> bool:
    """Whether a kernel over `rows` tokens / sequences on `device` launches with PDL (no sync).
    SPLITSERVE_PDL_MIN_ROWS (default 2) is the fewest rows that do (bench/pdl_ab.py)."""
    if (rows < int(os.environ.get("SPLITSERVE_PDL_MIN_ROWS", "2")) or device.type != "cuda"
            or interpreting() or os.environ.get("SPLITSERVE_PDL", "1") == "0"):
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


EARLY, LATE = 1, 2      # where a PDL kernel lets its successor launch (PDL constexpr values)


def trigger_mode() -> int:
    """SPLITSERVE_PDL_TRIGGER: `early` (default: right after the wait) or `late` (after the
    kernel's main loop, so the successor's waiting programs do not take SM slots while this
    kernel still streams; bench/pdl_ab.py --ab trigger)."""
    mode = os.environ.get("SPLITSERVE_PDL_TRIGGER", "early")
    if mode not in ("early", "late"):
        raise ValueError(f"SPLITSERVE_PDL_TRIGGER must be early or late, got {mode!r}")
    return LATE if mode == "late" else EARLY


def launch_kwargs(pdl: bool) -> dict:
    """Extra launch arguments: the kernel's PDL constexpr (0 off, EARLY, LATE) and Triton's
    launch_pdl flag."""
    return dict(PDL=trigger_mode(), launch_pdl=True) if pdl else dict(PDL=0)


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Wait for the predecessor kernel (PDL launches only); an EARLY kernel then lets its
    successor launch at once."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        if PDL == 1:
            tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def pdl_trigger(PDL: tl.constexpr):
    """A LATE kernel's point to let its successor launch (after its main loop). Only scheduling
    moves: the successor's `pdl_wait` still waits for this whole grid and its writes."""
    if PDL == 2:
        tl.extra.cuda.gdc_launch_dependents()
