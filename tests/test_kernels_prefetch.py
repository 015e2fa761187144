"""kernels/prefetch.py: argument checks everywhere; on a GPU, every mode runs (eagerly and in
a CUDA graph) and leaves the weight and a GEMM on it unchanged. It is a hint with no output, so
there is no reference to compare against; what it buys is measured by bench/pdl_ab.py --ab l2w."""
from __future__ import annotations

import pytest
import torch

from splitserve.kernels.prefetch import MODES, l2_prefetch

CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("bad, match", [
    (dict(mode="evict_first"), "mode must be one of"),
    (dict(fraction=0.0), "fraction must be in"),
    (dict(fraction=1.5), "fraction must be in"),
])
def test_bad_arguments_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        l2_prefetch(torch.zeros(8, 64, dtype=torch.bfloat16), **bad)


def test_shape_checks():
    with pytest.raises(ValueError, match="2-D with contiguous rows"):
        l2_prefetch(torch.zeros(64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="2-D with contiguous rows"):
        l2_prefetch(torch.zeros(64, 8, dtype=torch.bfloat16).t())


def test_cpu_is_a_no_op():
    w = torch.randn(16, 256).to(torch.bfloat16)
    before = w.clone()
    l2_prefetch(w)            # nothing to prefetch into: returns without launching
    assert torch.equal(w, before)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_gpu_modes_leave_data_unchanged(mode, fraction):
    torch.manual_seed(0)
    w = torch.randn(1000, 4096, device="cuda", dtype=torch.bfloat16)   # 1000 rows: a partial program
    x = torch.randn(7, 4096, device="cuda", dtype=torch.bfloat16)
    want_w, want_y = w.clone(), torch.nn.functional.linear(x, w)
    l2_prefetch(w, fraction, mode)
    torch.cuda.synchronize()
    assert torch.equal(w, want_w)
    g = torch.cuda.CUDAGraph()
    y = torch.empty_like(want_y)
    with torch.cuda.graph(g):
        l2_prefetch(w, fraction, mode)
        torch.nn.functional.linear(x, w, out=y)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, want_y) and torch.equal(w, want_w)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_gpu_too_small_prefix_raises():
    with pytest.raises(ValueError, match="less than one"):
        l2_prefetch(torch.zeros(4, 32, device="cuda", dtype=torch.bfloat16), 0.5, "bulk")
