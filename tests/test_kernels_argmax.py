"""kernels/argmax.py (split greedy argmax) against torch.argmax: random logits, ties across and
within chunks, -inf, a NaN, bf16 input, vocab sizes that are not multiples of the block, odd
row counts. The result must be equal exactly (an index, not a float)."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before any kernel module is imported

import pytest  # noqa: E402

from splitserve.kernels.testing import setup_kernel_tests  # noqa: E402

DEVICE = setup_kernel_tests()

from splitserve.kernels.argmax import BLOCK, SPLIT_MAX_ROWS, argmax_rows, plan_splits  # noqa: E402


@pytest.mark.parametrize("rows,n", [(1, 1), (1, 5000), (3, 1000), (17, 3 * BLOCK + 5), (1, 70001)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_matches_torch(rows, n, dtype):
    gen = torch.Generator().manual_seed(rows * 7 + n)
    x = (torch.randn(rows, n, generator=gen) * 5).to(dtype)
    if n > 2:                     # a tie: the row's max again later, and once in another chunk
        m = x.max(dim=1).values
        x[0, n - 1] = m[0]
        x[-1, n // 2] = m[-1]
    got = argmax_rows(x.to(DEVICE)).cpu()
    assert got.dtype == torch.int64
    assert torch.equal(got, x.argmax(dim=-1)), (got, x.argmax(dim=-1))


def test_argmax_ties_within_one_chunk():
    """One chunk per row, several blocks; the max again one block later (the same lane of the
    next block) and in the same block: the first index wins."""
    gen = torch.Generator().manual_seed(3)
    rows, n = 32, 18 * BLOCK + 3
    assert -(-n // plan_splits(rows, n)) > BLOCK
    x = torch.randn(rows, n, generator=gen)
    j = torch.randint(0, BLOCK, (rows,), generator=gen)
    r = torch.arange(rows)
    x[r, j] = 100.0
    x[r, j + BLOCK] = 100.0
    x[r[::2], (j[::2] + 1) % BLOCK] = 100.0
    got = argmax_rows(x.to(DEVICE)).cpu()
    assert torch.equal(got, x.argmax(dim=-1))


def test_argmax_special_values():
    x = torch.randn(4, 3000)
    x[0] = float("-inf")                 # all -inf: index 0, like torch
    x[1, 2500] = float("inf")
    x[2, 10] = float("nan")              # a NaN ranks first, like torch
    x[3] = -1e30
    x[3, 2999] = -1e29                   # negative values order by magnitude
    got = argmax_rows(x.to(DEVICE)).cpu()
    assert got.tolist() == x.argmax(dim=-1).tolist() == [0, 2500, 10, 2999]


def test_argmax_rows_with_a_stride_and_out():
    big = torch.randn(5, 4096)
    x = big[:, :3000]                    # row stride 4096
    out = torch.full((5,), -7, dtype=torch.int64, device=DEVICE)
    assert argmax_rows(x.to(DEVICE), out=out) is out
    # .to(DEVICE) on CPU keeps the strided view: the kernel reads through the row stride
    assert torch.equal(out.cpu(), x.argmax(dim=-1))


def test_many_rows_go_to_torch():
    x = torch.randn(SPLIT_MAX_ROWS + 1, 500)
    out = torch.empty(SPLIT_MAX_ROWS + 1, dtype=torch.int64, device=DEVICE)
    assert argmax_rows(x.to(DEVICE), out=out) is out and torch.equal(out.cpu(), x.argmax(-1))


def test_plan_splits_spreads_small_batches():
    assert plan_splits(1, 128256) == 64 and plan_splits(256, 128256) == 1
    assert plan_splits(1, 100) == 1 and plan_splits(8, 128256) == 32


def test_argmax_refuses_bad_input():
    with pytest.raises(ValueError, match="rows, vocab"):
        argmax_rows(torch.randn(10, device=DEVICE))
    with pytest.raises(ValueError, match="float32, bfloat16"):
        argmax_rows(torch.ones(2, 3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="int64"):
        argmax_rows(torch.randn(2, 3, device=DEVICE), out=torch.empty(2, dtype=torch.int32, device=DEVICE))
