"""Unit tests of the checksum and staging helpers (no processes, no UCX)."""
from __future__ import annotations

import random

import pytest
import torch

from splitserve.kvtransfer import pool
from splitserve.kvtransfer.layout import BUNDLE_BYTES, STAGING_BUDGET, KVLayout, TransferPlan

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


@pytest.mark.parametrize("trial", range(12))
def test_batched_layer_sums_equal_the_per_layer_ones(trial):
    """Checksummer.layers' torch path (what CUDA runs: one set of kernels over consecutive layers,
    bounded by a byte budget) gives exactly the per-layer checksums; run here on CPU tensors."""
    kv, r = _kv(100 + trial), random.Random(trial)
    scales = torch.rand(3, 2, 2) if trial % 2 else None
    ids = r.sample(range(64), r.randint(1, 40)) if trial % 3 else list(range(3, 30)) + [50, 41]
    staged = [i for i in range(len(ids)) if r.random() < 0.4] if trial > 4 else []
    if trial >= 9:   # a fully staged transfer: the short path over the staging buffer alone
        staged = list(range(len(ids)))
    c = pool.Checksummer(kv, ids, scales, staged)
    assert c.all_staged == (trial >= 9 or (bool(staged) and len(staged) == len(ids)))
    c.short_pos = torch.as_tensor(c.short_pos, dtype=torch.long)    # the CUDA-side index types
    c.short_ids = torch.as_tensor(c.short_ids, dtype=torch.long)
    c.staged_pos_i = torch.as_tensor(c.staged_pos_i, dtype=torch.long)
    c.wts = torch.as_tensor(c.wts)
    stg = [None] * LAYOUT.num_layers
    for layer in range(LAYOUT.num_layers if staged else 0):
        stg[layer] = pool.staging_tensor(kv, len(staged))
        pool.gather_staged(kv, layer, pool.index_tensor([ids[p] for p in staged], kv.device), stg[layer])
    ref = [int(pool.layer_checksum(kv, l, pool.index_tensor(ids, kv.device), scales)) for l in range(3)]
    assert c._consecutive(0, 3, stg).tolist() == ref
    assert c._consecutive(1, 2, stg[1:]).tolist() == ref[1:]
    if staged:   # the same layers gathered as bundles (layers 0-1 in one buffer, 2 in another)
        idx = pool.index_tensor([ids[p] for p in staged], kv.device)
        b01, b2 = pool.staging_tensor(kv, len(staged), layers=2), pool.staging_tensor(kv, len(staged), layers=1)
        pool.gather_staged(kv, 0, idx, b01)
        pool.gather_staged(kv, 2, idx, b2)
        assert c._consecutive(0, 3, [b01[0], b01[1], b2[0]]).tolist() == ref
        assert c._consecutive(1, 2, [b01[1], b2[0]]).tolist() == ref[1:]


def test_direct_view_span_points_into_the_pool():
    """CUDA direct messages are raw spans (base pointer + offset); check the arithmetic against
    torch's own view on a CPU pool of the same shape."""
    kv = _kv(5)
    region = LAYOUT.region_bytes
    for layer, kvi, start, n in [(0, 0, 0, 1), (2, 1, 60, 4), (1, 1, 7, 13)]:
        ptr = kv.data_ptr() + ((layer * 2 + kvi) * LAYOUT.num_blocks + start) * region
        assert kv[layer, kvi, start:start + n].data_ptr() == ptr
        assert pool.CudaSpan(ptr, n * region).__cuda_array_interface__["shape"] == (n * region,)


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
    # a small transfer: every layer in one bundle, one message, its receive posted up front
    assert small.layers_per_bundle == LAYOUT.num_layers and small.bundles() == [(0, LAYOUT.num_layers)]
    assert small.staging_window(1) == 1
    big = KVLayout(num_layers=32, num_blocks=4096, block_size=16, num_kv_heads=8, head_dim=128)
    ids = random.Random(0).sample(range(4096), 2048)              # 128 MiB staged per layer
    plan = TransferPlan.build(big, ids, list(range(2048)), 4)
    assert plan.staged_bytes > STAGING_BUDGET and plan.staging_window(8) == 8
    assert plan.layers_per_bundle == 1 and len(plan.bundles()) == 32    # big: layer by layer
    mid = TransferPlan.build(big, ids[:24], list(range(24)), 4)          # 1.5 MiB per layer
    k = mid.layers_per_bundle
    assert k == BUNDLE_BYTES // mid.staged_bytes == 10
    assert mid.bundles() == [(0, 10), (10, 10), (20, 10), (30, 2)]
    assert mid.staging_window(8) == 4                                   # all fit the budget
    contiguous = TransferPlan.build(big, list(range(16)), list(range(16)), 4)
    assert contiguous.staging_window(8) == 32                     # nothing staged


def test_multi_layer_gather_and_scatter_round_trip():
    """A bundle of layers gathers into one [k, 2, n, *region] buffer and scatters back exactly."""
    kv, r = _kv(7), random.Random(7)
    src = r.sample(range(64), 9)
    dst = r.sample(range(64), 9)
    buf = pool.staging_tensor(kv, 9, layers=2)
    pool.gather_staged(kv, 1, pool.index_tensor(src, kv.device), buf)
    for x in range(2):
        for i, b in enumerate(src):
            assert torch.equal(buf[x, :, i].view(torch.int16), kv[1 + x, :, b].view(torch.int16))   # bits (NaNs)
    out = torch.zeros_like(kv)
    pool.scatter_staged(out, 1, pool.index_tensor(dst, kv.device), buf)
    for x in range(2):
        for i, (a, b) in enumerate(zip(src, dst)):
            assert torch.equal(out[1 + x, :, b].view(torch.int16), kv[1 + x, :, a].view(torch.int16))
    assert not out[0].view(torch.int16).any()


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


def test_cpu_staging_buffer_waits_for_its_checksums():
    """On CPU the sender sums a staged bundle while it is being sent: the buffer (and its
    staging-window slot) goes back only once the send *and* the sums are done, never to a
    later gather while the sums still read it; a failed sum keeps the buffer out of the pool."""
    import asyncio
    from types import SimpleNamespace

    from splitserve.kvtransfer.sender import KVSender

    async def run(outcome: str):
        returned: list = []
        me = SimpleNamespace(agent=SimpleNamespace(staging=SimpleNamespace(put=returned.append)))
        window = asyncio.Semaphore(0)
        sums = asyncio.get_running_loop().create_future()
        buf = torch.zeros(4)
        KVSender._release_after(me, buf, window, sums)     # the send has completed
        await asyncio.sleep(0)
        assert returned == [] and window.locked()          # the sums still read it
        if outcome == "ok":
            sums.set_result([1, 2])
        else:
            sums.set_exception(RuntimeError("sum failed"))
            sums.exception()
        await asyncio.sleep(0)
        assert not window.locked()                         # the slot is free either way
        return returned

    assert [b.shape for b in asyncio.run(run("ok"))] == [torch.Size([4])]
    assert asyncio.run(run("failed")) == []


def test_staged_regions_are_the_gathered_bundle_in_place():
    """A descriptor list (plan.staged_regions, sent / received in place on host pools) carries
    exactly the bytes of the gathered staging buffer, in its order, from the source blocks, and
    lands them where the scatter would: so either side may use either path. Adjacent regions
    (consecutive ids, short runs below direct_min_blocks) merge into one descriptor."""
    kv, r = _kv(11), random.Random(11)
    src = r.sample(range(64), 6) + [40, 41, 42]        # a short run: staged, one region per layer/kv
    dst = r.sample(range(20, 64), 6) + [10, 11, 12]
    plan = TransferPlan.build(LAYOUT, src, dst, 4, bundle_bytes=2 * 2 * 9 * LAYOUT.region_bytes)
    assert plan.bundles()[0][1] == 2 and len(plan.staged_idx) == 9
    flat = kv.reshape(-1).view(torch.uint8)
    out = torch.zeros_like(kv)
    oflat = out.reshape(-1).view(torch.uint8)
    for l0, k in plan.bundles():
        buf = pool.staging_tensor(kv, len(plan.staged_idx), layers=k)
        pool.gather_staged(kv, l0, pool.index_tensor(src, kv.device), buf)
        regions = plan.staged_regions(l0, k, src, LAYOUT.num_blocks)
        assert len(regions) == k * 2 * 7                  # 6 lone blocks + the merged run of 3
        sent = torch.cat([flat[off:off + n] for off, n in regions])
        assert torch.equal(sent, buf.reshape(-1).view(torch.uint8))
        pos = 0
        for off, n in plan.staged_regions(l0, k, dst, LAYOUT.num_blocks):
            oflat[off:off + n] = sent[pos:pos + n]
            pos += n
        assert pos == sent.numel()
    want = torch.zeros_like(kv)
    for l0, k in plan.bundles():
        buf = pool.staging_tensor(kv, len(plan.staged_idx), layers=k)
        pool.gather_staged(kv, l0, pool.index_tensor(src, kv.device), buf)
        pool.scatter_staged(want, l0, pool.index_tensor(dst, kv.device), buf)
    assert torch.equal(out.view(torch.int16), want.view(torch.int16))


def test_bundle_descriptors_match_the_plan():
    """iov.Descriptors.bundle (numpy) lists exactly plan.staged_regions (the definition), at the
    pool's base address, for scattered, partly consecutive and single-block bundles."""
    from splitserve.kvtransfer import iov
    r = random.Random(5)
    big = KVLayout(num_layers=6, num_blocks=300, block_size=4, num_kv_heads=2, head_dim=8)
    for src in (r.sample(range(300), 40), list(range(10, 13)) + r.sample(range(20, 300), 9), [7]):
        dst = r.sample(range(300), len(src))
        plan = TransferPlan.build(big, src, dst, 4, bundle_bytes=3 * big.region_bytes * 2 * len(src))
        for ids in (src, dst):
            for l0, k in plan.bundles():
                want = [(1000 + off, n) for off, n in plan.staged_regions(l0, k, ids, 300)]
                desc = iov.Descriptors.bundle(plan, l0, k, ids, 300, 1000)
                assert [tuple(int(x) for x in row) for row in desc.pairs] == want
                assert desc.count == len(want) and desc.nbytes == sum(n for _, n in want)
