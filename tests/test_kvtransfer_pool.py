"""Unit tests of the checksum and staging helpers (no processes, no UCX)."""
from __future__ import annotations

import random

import pytest
import torch

from splitserve.kvtransfer import pool
from splitserve.kvtransfer.layout import STAGING_BUDGET, KVLayout, TransferPlan

LAYOUT = KVLayout(num_layers=3, num_blocks=64, block_size=4, num_kv_heads=2, head_dim=8)


def _kv(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = LAYOUT.num_layers * 2 * LAYOUT.num_blocks * LAYOUT.region_bytes // 4
    return torch.randint(-2**31, 2**31 - 1, (n,), generator=g, dtype=torch.int32) \
        .view(torch.bfloat16).view(LAYOUT.shape)


@pytest.mark.parametrize("trial", range(12))
@pytest.mark.parametrize("with_scales", [False, True])
def test_checksummer_matches_layer_checksum(trial, with_scales):
    """The precomputed/staged checksum path gives exactly the reference per-layer checksum."""
    kv, r = _kv(trial), random.Random(trial)
    scales = torch.rand(3, 2, 2) if with_scales else None
    ids = {0: lambda: [r.randrange(64)],
           1: lambda: list(range(5, 5 + r.randint(2, 40))),
           2: lambda: r.sample(range(64), r.randint(2, 40))}[trial % 3]()
    ids += [] if trial < 6 else r.sample([i for i in range(64) if i not in ids], 5)
    staged = [i for i in range(len(ids)) if r.random() < 0.5] if trial % 2 else []
    c = pool.Checksummer(kv, ids, scales, staged)
    for layer in range(LAYOUT.num_layers):
        stg = None
        if staged:
            stg = pool.staging_tensor(kv, len(staged))
            pool.gather_staged(kv, layer, pool.index_tensor([ids[p] for p in staged], kv.device), stg)
        ref = int(pool.layer_checksum(kv, layer, pool.index_tensor(ids, kv.device), scales))
        assert c.layer(layer, stg) == ref


def test_checksum_catches_a_flipped_byte_and_a_swapped_block():
    kv = _kv(1)
    ids = [3, 9, 10, 11, 12, 13, 40]
    c = pool.Checksummer(kv, ids)
    base = c.layer(1)
    kv2 = kv.clone()
    kv2.view(torch.uint8)[1, 0, 11, 0, 0, 3] ^= 1
    assert pool.Checksummer(kv2, ids).layer(1) != base
    assert pool.Checksummer(kv, [9, 3, 10, 11, 12, 13, 40]).layer(1) != base


def test_staging_window_by_bytes():
    small = TransferPlan.build(LAYOUT, [1, 5, 9], [2, 6, 10], 4)
    assert small.staging_window(1) == LAYOUT.num_layers          # fits the budget: all layers
    big = KVLayout(num_layers=32, num_blocks=4096, block_size=16, num_kv_heads=8, head_dim=128)
    ids = random.Random(0).sample(range(4096), 2048)              # 128 MiB staged per layer
    plan = TransferPlan.build(big, ids, list(range(2048)), 4)
    assert plan.staged_bytes > STAGING_BUDGET and plan.staging_window(8) == 8
    contiguous = TransferPlan.build(big, list(range(16)), list(range(16)), 4)
    assert contiguous.staging_window(8) == 32                     # nothing staged


def test_buffer_pool_reuses_and_caps():
    kv = _kv()
    bp = pool.BufferPool(kv, cap_bytes=2 * 2 * 4 * LAYOUT.region_bytes)
    a = bp.get(4)
    bp.put(a)
    assert bp.get(4) is a
    b, c, d = bp.get(2), bp.get(2), bp.get(2)
    for t in (b, c, d):
        bp.put(t)
    assert bp._idle <= bp.cap
