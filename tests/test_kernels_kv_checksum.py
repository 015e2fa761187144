"""kernels/kv_checksum.py (the transfer checksum fused with the staging gather / scatter) against
its reference, kvtransfer.pool.layer_checksum (numpy on CPU): random pools of every KV dtype, id
lists with runs and scattered ids, some positions staged, one or several layers per launch. The
checksums are integers (sums mod 2^64) and must be equal exactly; the copied bytes too."""
from __future__ import annotations

import os
import random

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before any kernel module is imported

import pytest  # noqa: E402

from splitserve.kernels.testing import setup_kernel_tests  # noqa: E402

DEVICE = setup_kernel_tests()

from splitserve.kernels.kv_checksum import region_sums  # noqa: E402
from splitserve.kvtransfer import pool  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16, torch.float8_e4m3fn]


def random_pool(layers, blocks, region, dtype, seed):
    """Random bytes (never zeros) viewed as `dtype`: [layers, 2, blocks, *region]."""
    g = torch.Generator().manual_seed(seed)
    width = region[-1] * torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(1, 255, (layers, 2, blocks, *region[:-1], width), generator=g, dtype=torch.uint8)
    return raw.view(dtype)


def reference(kv, layers, ids, scales=None):
    idx = torch.tensor(ids)
    return [int(pool.layer_checksum(kv, l, idx, scales)) for l in layers]


CASES = [  # (blocks in the pool, ids, staged positions)
    (20, [3], []),
    (20, [5, 6, 7, 1, 19, 3], [1, 3, 4]),
    (64, list(range(10, 30)), list(range(20))),                  # all staged
    (64, random.Random(1).sample(range(64), 33), list(range(0, 33, 2))),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_sum_gather_scatter_match_reference(dtype, case):
    blocks, ids, staged = CASES[case]
    L, region = 4, (4, 2, 8)          # region: block_size, kv heads, head_dim
    kv = random_pool(L, blocks, region, dtype, seed=case).to(DEVICE)
    ref = reference(kv.cpu(), range(L), ids)
    dev_ids = torch.tensor(ids, device=DEVICE)
    slots = torch.full((len(ids),), -1, dtype=torch.int64)
    slots[staged] = torch.arange(len(staged))
    slots = slots.to(DEVICE)

    sums = torch.full((L,), 0, dtype=torch.int64, device=DEVICE)
    region_sums(kv, 0, L, dev_ids, sums)
    assert sums.tolist() == ref

    if not staged:
        return
    # gather layers 1..2 into a bundle buffer, poisoned first
    buf = torch.empty((2, 2, len(staged), *kv.shape[3:]), dtype=dtype, device=DEVICE)
    buf.view(torch.uint8).fill_(7)
    s2 = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    region_sums(kv, 1, 2, dev_ids, s2, "gather", slots, buf)
    assert s2.tolist() == ref[1:3]
    want = kv[1:3, :, [ids[p] for p in staged]]
    assert torch.equal(buf.view(torch.uint8), want.contiguous().view(torch.uint8))

    # scatter it back into a pool whose staged destination regions were wiped
    kv2 = kv.clone()
    kv2.view(torch.uint8)[1:3, :, [ids[p] for p in staged]] = 0
    s3 = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    region_sums(kv2, 1, 2, dev_ids, s3, "scatter", slots, buf)
    assert s3.tolist() == ref[1:3]
    assert torch.equal(kv2.view(torch.uint8), kv.view(torch.uint8))


def test_fused_sums_with_fp8_scales():
    """pool.FusedSums (what the transfer agent uses) adds the FP8 scales' term like
    layer_checksum does."""
    L, blocks, ids, staged = 3, 16, [4, 9, 2, 3], [0, 2]
    kv = random_pool(L, blocks, (4, 2, 8), torch.float8_e4m3fn, seed=9).to(DEVICE)
    scales = torch.rand(L, 2, 2, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    ref = reference(kv.cpu(), range(L), ids, scales.cpu())
    f = pool.FusedSums(kv, ids, staged, scales)
    sums = torch.zeros(L, dtype=torch.int64, device=DEVICE)
    f.add(sums, 0, L)
    assert sums.tolist() == ref
    buf = torch.empty((2, 2, len(staged), 4, 2, 8), dtype=kv.dtype, device=DEVICE)
    s2 = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    f.add(s2, 1, 2, "gather", buf)
    assert s2.tolist() == ref[1:]


def test_fused_sums_uploads_zeroed_accumulators_with_the_ids():
    """The agent takes its checksum accumulators from FusedSums' one upload (`sums=`): zeros
    beside the ids and slots, not aliasing them, summing as a fresh zeros tensor does."""
    L, blocks, ids, staged = 3, 16, [4, 9, 2, 3], [1, 3]
    kv = random_pool(L, blocks, (4, 2, 8), torch.bfloat16, seed=5).to(DEVICE)
    ref = reference(kv.cpu(), range(L), ids, None)
    f = pool.FusedSums(kv, ids, staged, None, sums=2 * L)
    assert f.sums.tolist() == [0] * (2 * L)
    assert f.ids.tolist() == ids and f.slots.tolist() == [-1, 0, -1, 1]
    rows = f.sums.view(2, L)
    buf = torch.empty((L, 2, len(staged), 4, 2, 8), dtype=kv.dtype, device=DEVICE)
    f.add(rows[0], 0, L, "gather", buf)
    f.add(rows[1, 1:], 1, 2)
    assert rows[0].tolist() == ref and rows[1].tolist() == [0] + ref[1:]
    assert f.ids.tolist() == ids and f.slots.tolist() == [-1, 0, -1, 1]   # untouched


def test_errors_are_clear():
    kv = random_pool(2, 8, (4, 2, 8), torch.bfloat16, seed=1).to(DEVICE)
    ids = torch.tensor([1, 2], device=DEVICE)
    sums = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="mode"):
        region_sums(kv, 0, 2, ids, sums, "copy")
    with pytest.raises(ValueError, match="outside the pool"):
        region_sums(kv, 1, 2, ids, sums)
    with pytest.raises(ValueError, match="int64"):
        region_sums(kv, 0, 2, ids.to(torch.int32), sums)
    with pytest.raises(ValueError, match="needs slots and buf"):
        region_sums(kv, 0, 2, ids, sums, "gather")
    with pytest.raises(ValueError, match="buf"):
        region_sums(kv, 0, 2, ids, sums, "gather", torch.tensor([0, -1], device=DEVICE),
                    torch.empty((2, 2, 1, 4, 2, 4), dtype=torch.bfloat16, device=DEVICE))
