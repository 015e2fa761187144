"""kernels/skinny_gemm.py (skinny tensor-core linear, optional K split) against gemv_linear_ref.

Tolerances as in test_kernels_gemv.py: both sides accumulate products of fp16/bf16 values (exact
in float32) in float32, so they differ only by the summation order -- a K split adds its partials
in float32 too -- far below an ulp of the dtype; that can flip the one final rounding. Every check
is within 2 ulps relative and >= 97% of elements bit-equal, which a wrong tile offset, a lost or
doubled split, or a missing bias cannot pass. Outputs are poisoned with NaN so an unwritten element
shows. Small shapes: CI runs them under the Triton interpreter.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before any kernel module is imported

import pytest  # noqa: E402

from splitserve.kernels.testing import setup_kernel_tests  # noqa: E402

DEVICE = setup_kernel_tests()

from splitserve.kernels import gemv_linear_ref, silu_and_mul_ref  # noqa: E402
from splitserve.kernels.skinny_gemm import LinearTile, skinny_linear as linear  # noqa: E402

ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _case(dtype, m, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 2).to(dtype)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to(dtype)
    b = (torch.randn(n, generator=g) * 0.5).to(dtype)
    return x.to(DEVICE), w.to(DEVICE), b.to(DEVICE)


def _check(got, want, dtype):
    g, w = got.float().cpu(), want.float().cpu()
    assert not g.isnan().any(), "unwritten (poisoned) elements remain"
    torch.testing.assert_close(g, w, rtol=2 * ULP[dtype], atol=2 * ULP[dtype] * 2.0 ** -6)
    frac = (g == w).float().mean().item()
    assert frac >= 0.97, f"only {frac:.1%} of elements bit-equal"


@pytest.mark.parametrize("dt", ["bf16", "fp16"])
@pytest.mark.parametrize("m, n, k, tile", [
    (1, 64, 128, LinearTile(64, 64, 4, 2, 1)),        # one token, one column tile
    (5, 128, 256, LinearTile(64, 64, 4, 2, 2)),       # odd M, K split in two
    (17, 96, 256, LinearTile(64, 32, 4, 2, 3)),       # N not a multiple of BLOCK_N, uneven split
    (32, 64, 320, LinearTile(32, 64, 4, 2, 1)),       # K not a multiple of BLOCK_K
    (33, 64, 192, LinearTile(64, 64, 4, 2, 4)),       # BLOCK_M 64, splits past K's end dropped
    (5, 128, 256, LinearTile(64, 64, 4, 2, 1, True)),     # TMA tiles
    (17, 96, 320, LinearTile(64, 64, 4, 2, 2, True)),     # TMA: N and the last split's K past the end
])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_reference(dt, m, n, k, tile, bias):
    dtype = DTYPES[dt]
    x, w, b = _case(dtype, m, n, k, seed=m * 31 + n + k)
    b = b if bias else None
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    linear(x, w, tile, bias=b, out=out)
    _check(out, gemv_linear_ref(x.cpu(), w.cpu(), None if b is None else b.cpu()), dtype)


@pytest.mark.parametrize("dt", ["bf16", "fp16"])
@pytest.mark.parametrize("m, i, k, tile", [
    (3, 64, 128, LinearTile(64, 64, 4, 2, 1)),
    (17, 96, 192, LinearTile(64, 64, 4, 2, 1)),           # I not a multiple of BLOCK_N
    (8, 64, 256, LinearTile(32, 64, 4, 2, 1, True)),      # TMA
    (9, 96, 128, LinearTile(64, 32, 4, 2, 1, True)),      # TMA, gate tile running into up rows
])
def test_silu_epilogue_matches_unfused(dt, m, i, k, tile):
    """silu=True: gate_up [2I, K] GEMM + silu_and_mul in one launch, rounded as the two."""
    dtype = DTYPES[dt]
    x, w, _ = _case(dtype, m, 2 * i, k, seed=m + i + k)
    out = torch.full((m, i), float("nan"), dtype=dtype, device=DEVICE)
    linear(x, w, tile, out=out, silu=True)
    _check(out, silu_and_mul_ref(gemv_linear_ref(x.cpu(), w.cpu())), dtype)


def test_silu_refuses_split_and_bias():
    x, w, b = _case(torch.bfloat16, 4, 128, 128, 7)
    with pytest.raises(ValueError, match="silu needs"):
        linear(x, w, LinearTile(64, 64, 4, 2, 2), silu=True)
    with pytest.raises(ValueError, match="silu needs"):
        linear(x, w, LinearTile(64, 64, 4, 2, 1), bias=b[:64], silu=True)


def test_split_counters_rearm_across_calls():
    """The last split program re-arms its tile's counter: a second call (other data, the same
    scratch) is right too, and so is a third with another shape sharing nothing."""
    tile = LinearTile(64, 64, 4, 2, 2)
    for seed in (1, 2):
        x, w, _ = _case(torch.bfloat16, 9, 128, 256, seed)
        _check(linear(x, w, tile), gemv_linear_ref(x.cpu(), w.cpu()), torch.bfloat16)
    x, w, _ = _case(torch.bfloat16, 3, 64, 384, 3)
    _check(linear(x, w, LinearTile(64, 64, 4, 2, 3)), gemv_linear_ref(x.cpu(), w.cpu()), torch.bfloat16)


def test_strided_rows():
    """x and out as row slices of wider buffers (the engine's views): strides honoured."""
    x, w, _ = _case(torch.bfloat16, 6, 64, 128, 4)
    xb = torch.zeros(6, 200, dtype=torch.bfloat16, device=DEVICE)
    xb[:, 8:136] = x
    ob = torch.full((6, 100), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    linear(xb[:, 8:136], w, LinearTile(64, 64, 4, 2, 2), out=ob[:, 4:68])
    _check(ob[:, 4:68], gemv_linear_ref(x.cpu(), w.cpu()), torch.bfloat16)
    assert ob[:, :4].isnan().all() and ob[:, 68:].isnan().all(), "wrote outside out"


@pytest.mark.parametrize("args, match", [
    (lambda x, w: (x[0], w), "x must be 2-D"),
    (lambda x, w: (x, w[:, :64]), "features"),
    (lambda x, w: (x, w.half()), "dtype"),
    (lambda x, w: (x.float(), w.float()), "float32"),
    (lambda x, w: (torch.zeros(257, 128, dtype=x.dtype, device=x.device), w), "1..256"),
])
def test_bad_inputs_raise(args, match):
    x, w, _ = _case(torch.bfloat16, 4, 64, 128, 5)
    a, b = args(x, w)
    with pytest.raises(ValueError, match=match):
        linear(a, b, LinearTile(64, 64, 4, 2, 1))


def test_bad_tile_and_bias_raise():
    x, w, b = _case(torch.bfloat16, 4, 64, 128, 6)
    with pytest.raises(ValueError, match="bad tile"):
        linear(x, w, LinearTile(48, 64, 4, 2, 1))
    with pytest.raises(ValueError, match="bias"):
        linear(x, w, LinearTile(64, 64, 4, 2, 1), bias=b[:32])
