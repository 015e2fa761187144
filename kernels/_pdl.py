"""Programmatic dependent launch (PDL, sm_90+) for the kernels of a decode step.

A one-token decode step is a chain of ~200 small kernels (kernels/gemv.py's linears, RoPE + KV
write, decode attention per layer); between two of them the GPU idles for the next kernel's
launch. Launched with PDL, a kernel may start while its predecessor finishes: its programs
wait at `pdl_wait` (griddepcontrol.wait: the predecessor has completed and its writes are
visible) before reading anything. Where it lets its own successor launch is the trigger: at
once after the wait (EARLY) or after its main loop (LATE), so the successor's waiting
programs do not hold SM slots while this kernel still streams. A kernel waits before its first
load, so a predecessor that is not PDL-aware (cuBLAS, torch) only loses the overlap, never the
ordering; every kernel launched with PDL must call `pdl_wait` first. Ordering is transitive:
a kernel triggers only after its own wait, so when it starts, everything before its
predecessor has completed.

Off under the Triton interpreter, on GPUs before sm_90 and with SPLITSERVE_PDL=0. Measured on
the H200 (Llama-3-8B decode step graphs): with the early trigger PDL made batch 1 slower (4443
vs 4390 us, session 6; 4376 vs 4334, session 9) and batches 8 and 32 faster (4894 vs 5103, 5945
vs 6120 us), so one-row launches ran without it; with the late trigger batch 1 gains
(bench/results/engine-2026-11-30-s11.md: 4127 vs 4218 us without PDL), so every launch now
uses PDL, late for one row and early for more (`trigger_mode`).
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
    SPLITSERVE_PDL_MIN_ROWS (default 1) is the fewest rows that do (bench/pdl_ab.py: one row
    gains only with the late trigger)."""
    if (rows < int(os.environ.get("SPLITSERVE_PDL_MIN_ROWS", "1")) or device.type != "cuda"
            or interpreting() or os.environ.get("SPLITSERVE_PDL", "1") == "0"):
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


EARLY, LATE = 1, 2      # where a PDL kernel lets its successor launch (PDL constexpr values)


def trigger_mode(rows: int) -> int:
    """SPLITSERVE_PDL_TRIGGER: `early` (right after the wait), `late` (after the kernel's main
    loop) or `auto` (the default: late for one row, early for more). Measured on the H200
    (bench/pdl_ab.py --ab trigger, bench/results/engine-2026-11-30-s11.md): the batch-1 step
    replays 4127 us late vs 4304 early (4218 without PDL); at batches 8-128 early is as fast or
    up to 20 us faster."""
    mode = os.environ.get("SPLITSERVE_PDL_TRIGGER", "auto")
    if mode not in ("early", "late", "auto"):
        raise ValueError(f"SPLITSERVE_PDL_TRIGGER must be early, late or auto, got {mode!r}")
    return LATE if mode == "late" or (mode == "auto" and rows <= 1) else EARLY


def launch_kwargs(device: torch.device, rows: int) -> dict:
    """Extra launch arguments for a launch over `rows` tokens / sequences on `device`: the
    kernel's PDL constexpr (0 off, EARLY, LATE) and Triton's launch_pdl flag."""
    if not use_pdl(device, rows):
        return dict(PDL=0)
    return dict(PDL=trigger_mode(rows), launch_pdl=True)


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
