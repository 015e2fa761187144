"""kernels/step_io.py (a decode step's inputs in, tokens out) against its references: every
staged byte arrives, the gathered rows take the previous step's tokens (and win over the
staged placeholders), nothing past the staged prefix is written, and the tokens reach both
the device copy and the host buffer. On CUDA the host buffers are pinned (read and written by
the kernels through the mapping), as in engine/cuda_graph.py."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before any kernel module is imported

import pytest  # noqa: E402

from splitserve.kernels.testing import setup_kernel_tests  # noqa: E402

DEVICE = setup_kernel_tests()

from splitserve.kernels.step_io import (stage_inputs, stage_inputs_ref, tokens_out,  # noqa: E402
                                        tokens_out_ref)

PIN = DEVICE == "cuda"


def _staging(top: int, width: int, seed: int):
    """A filled host staging buffer laid out as DecodeGraphRunner's, and a poisoned device one."""
    gen = torch.Generator().manual_seed(seed)
    nbytes = 5 * top * 8 + top * 4 + top * width * 4
    host = torch.randint(0, 256, (nbytes,), generator=gen, dtype=torch.uint8)
    host = host.pin_memory() if PIN else host
    return host, torch.full((nbytes,), 0xAB, dtype=torch.uint8, device=DEVICE), gen


@pytest.mark.parametrize("top,width,b,m", [(8, 5, 3, 2), (16, 33, 16, 16), (4, 1, 1, 0), (256, 12, 7, 5)])
def test_stage_inputs_matches_reference(top, width, b, m):
    host, dev, gen = _staging(top, width, seed=top + m)
    i64 = host[:40 * top].view(torch.int64).view(5, top)
    i64[3, :m] = torch.randperm(b, generator=gen)[:m]           # distinct destination rows
    i64[4, :m] = torch.randint(0, 9, (m,), generator=gen)       # rows of the previous step
    prev = torch.randint(10 ** 6, 10 ** 7, (9,), generator=gen).to(DEVICE)
    used = 5 * top * 8 + top * 4 + b * width * 4
    want = dev.cpu().clone()
    stage_inputs_ref(host, want, used, top, prev.cpu(), m)
    stage_inputs(host, dev, used, top, prev if m else None, m)
    assert torch.equal(dev.cpu(), want)
    ids = dev.cpu()[:8 * top].view(torch.int64)
    for j in range(m):                                          # the gather itself, spelled out
        assert ids[int(i64[3, j])] == int(prev.cpu()[int(i64[4, j])])


def test_tokens_out_writes_device_and_host():
    toks = torch.randint(0, 128256, (37,), device=DEVICE)
    host = torch.full((64,), -1, dtype=torch.int64)
    host = host.pin_memory() if PIN else host
    out = tokens_out(toks, host)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    want_host = torch.full((64,), -1, dtype=torch.int64)
    want = tokens_out_ref(toks.cpu(), want_host)
    assert out.data_ptr() != toks.data_ptr() and torch.equal(out.cpu(), want)
    assert torch.equal(host, want_host)


def test_step_io_refuses_bad_arguments():
    host, dev, _ = _staging(4, 2, 0)
    with pytest.raises(ValueError, match="multiple of 4"):
        stage_inputs(host, dev, 10, 4, None, 0)
    with pytest.raises(ValueError, match="previous step"):
        stage_inputs(host, dev, 5 * 4 * 8 + 16, 4, None, 1)
    with pytest.raises(ValueError, match="int64"):
        tokens_out(torch.zeros(3, dtype=torch.int32, device=DEVICE), torch.zeros(3, dtype=torch.int64))
