"""Plain-Python unit tests of kvtransfer's control plane: lease table, state machine, plan,
wire records. No UCX, no processes."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.kvtransfer.layout import KVLayout, TransferPlan, coalesce, compat_mismatch
from splitserve.kvtransfer.lease import LeaseError, LeaseState, LeaseTable
from splitserve.kvtransfer.state import TransferFSM, TransferState
from splitserve.kvtransfer.wire import HandoffRecord, data_tag, decode, encode, key_prefix, KEY_MASK

pytestmark = pytest.mark.timeout(60)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def table(timeout=5.0):
    freed: list[list[int]] = []
    clock = Clock()
    return LeaseTable(freed.append, timeout, clock=clock), freed, clock


def test_reserve_conflict_and_integrity():
    t, freed, _ = table()
    a = t.reserve([1, 2, 3])
    with pytest.raises(LeaseError, match="already under a lease"):
        t.reserve([3, 4])
    b = t.reserve([4, 5])
    assert a.lease_id != b.lease_id and a.tag_key != b.tag_key and a.epoch == 1
    t.check_integrity()
    with pytest.raises(LeaseError):
        t.reserve([7, 7])


def test_expiry_frees_exactly_once():
    t, freed, clock = table()
    lease = t.reserve([1, 2])
    assert t.expire_due() == []
    clock.t += 5.1
    assert [l.lease_id for l in t.expire_due()] == [lease.lease_id]
    assert t.expire_due() == []
    assert freed == [[1, 2]]
    with pytest.raises(LeaseError, match="expired"):
        t.cancel(lease.lease_id)
    assert freed == [[1, 2]] and t.freed_count == 1
    t.check_integrity()
    t.reserve([1, 2])   # blocks reusable after the free


def test_cancel_waits_for_inflight_writes():
    t, freed, _ = table()
    lease = t.reserve([9])
    assert t.begin_write(lease.lease_id, 1)
    assert t.begin_write(lease.lease_id, 1)
    t.cancel(lease.lease_id)
    assert freed == []                       # a receive still targets the blocks
    assert not t.begin_write(lease.lease_id, 1)   # resolved: no new writes
    t.end_write(lease.lease_id)
    assert freed == []
    t.end_write(lease.lease_id)
    assert freed == [[9]]
    with pytest.raises(LeaseError):
        t.end_write(lease.lease_id)
    assert freed == [[9]]


def test_complete_epoch_and_inflight_rules():
    t, freed, clock = table()
    lease = t.reserve([1])
    assert t.begin_write(lease.lease_id, 1)
    assert "in flight" in t.complete(lease.lease_id, 1)
    t.end_write(lease.lease_id)
    re = t.reissue(lease.lease_id)
    assert re.epoch == 2 and re.tag_key != re.old_tag_keys[0]
    assert not t.begin_write(lease.lease_id, 1)          # stale epoch write refused
    assert "stale epoch 1" in t.complete(lease.lease_id, 1)
    assert t.complete(lease.lease_id, 2) is None
    assert t.get(lease.lease_id).state is LeaseState.COMPLETED
    clock.t += 100
    assert t.expire_due() == []                          # completed leases never expire
    assert freed == []                                   # blocks belong to the request now
    assert "completed" in t.complete(lease.lease_id, 2)
    t.check_integrity()
    t.forget(lease.lease_id)
    assert t.get(lease.lease_id) is None


def test_finished_leases_are_forgotten_after_retention():
    clock = [100.0]
    freed = []
    t = LeaseTable(freed.extend, timeout_s=5.0, clock=lambda: clock[0])
    done = t.reserve([1, 2])
    assert t.complete(done.lease_id, 1) is None
    gone = t.reserve([3])
    t.cancel(gone.lease_id)                       # freed at once (no writes in flight)
    busy = t.reserve([4])
    assert t.begin_write(busy.lease_id, 1)
    t.cancel(busy.lease_id)                       # resolved, but a write is still in flight
    live = t.reserve([5])
    clock[0] += 30.0
    assert t.forget_resolved(60.0) == []          # not old enough yet
    clock[0] += 31.0
    assert sorted(t.forget_resolved(60.0)) == sorted([done.lease_id, gone.lease_id])
    assert t.get(done.lease_id) is None and t.get(gone.lease_id) is None
    assert t.get(busy.lease_id) is not None       # not freed yet: kept
    assert t.get(live.lease_id) is not None       # live (expiry is another matter)
    t.end_write(busy.lease_id)
    assert freed == [3, 4]
    assert t.forget_resolved(60.0) == [busy.lease_id]   # resolved long ago, freed now
    t.check_integrity()


def test_fsm_transitions():
    f = TransferFSM()
    assert f.poll().state is TransferState.BOOTSTRAPPING
    assert not f.to(TransferState.SUCCESS)               # must transfer first
    assert f.to(TransferState.TRANSFERRING)
    assert f.fail("boom")
    assert not f.to(TransferState.SUCCESS)               # terminal states stick
    assert f.poll().reason == "boom" and f.wait(0).done


def test_plan_coalesces_and_stages():
    lay = KVLayout(2, 64, 4, 2, 8)
    src = [0, 1, 2, 3, 4, 10, 20, 21]
    dst = [5, 6, 7, 8, 9, 30, 40, 41]
    assert coalesce(src, dst) == [(0, 5, 0, 5), (5, 1, 10, 30), (6, 2, 20, 40)]
    plan = TransferPlan.build(lay, src, dst, direct_min_blocks=4)
    assert [(d.kv, d.run.n) for d in plan.direct] == [(0, 5), (1, 5)]
    assert plan.staged_idx == (5, 6, 7)
    assert plan.msgs_per_layer == 3 and plan.staged_bytes == 2 * 3 * lay.region_bytes
    with pytest.raises(ValueError, match="distinct"):
        TransferPlan.build(lay, [1, 2], [3, 3], 4)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 200), min_size=1, max_size=60, unique=True),
       st.integers(1, 8), st.randoms())
def test_plan_covers_every_block_once(dst, min_blocks, rnd):
    src = list(range(len(dst)))
    rnd.shuffle(src)
    plan = TransferPlan.build(KVLayout(1, 256, 4, 1, 8), src, dst, min_blocks)
    covered = [i for d in plan.direct if d.kv == 0 for i in range(d.run.i0, d.run.i0 + d.run.n)]
    assert sorted(covered + list(plan.staged_idx)) == list(range(len(dst)))
    for d in plan.direct:
        assert d.run.n >= min_blocks
        assert list(src[d.run.i0:d.run.i0 + d.run.n]) == list(range(d.run.src0, d.run.src0 + d.run.n))
        assert list(dst[d.run.i0:d.run.i0 + d.run.n]) == list(range(d.run.dst0, d.run.dst0 + d.run.n))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 200), min_size=1, max_size=60, unique=True),
       st.integers(1, 8), st.randoms())
def test_preposted_plan_depends_on_dst_only(dst, min_blocks, rnd):
    """A pre-posted plan (receives posted before the src ids are known): the sender's plan, for
    any src list, has the same messages as the decode side's plan built from dst alone."""
    src = rnd.sample(range(300), len(dst))
    lay = KVLayout(1, 300, 4, 1, 8)
    ours = TransferPlan.build(lay, src, dst, min_blocks, dst_runs=True)
    theirs = TransferPlan.build(lay, dst, dst, min_blocks, dst_runs=True)
    assert ours.staged_idx == theirs.staged_idx and ours.msgs_per_layer == theirs.msgs_per_layer
    assert [(d.kv, d.run.i0, d.run.n, d.run.dst0) for d in ours.direct] == \
        [(d.kv, d.run.i0, d.run.n, d.run.dst0) for d in theirs.direct]
    for d in ours.direct:
        ids = src[d.run.i0:d.run.i0 + d.run.n]
        assert ours.src_contiguous(d.run) == (ids == list(range(ids[0], ids[0] + d.run.n)))
        assert d.run.src0 == ids[0]


def test_wire_round_trip_and_tags():
    rec = HandoffRecord("10.0.0.1", 1234, 2**40, 3, (5, 6, 9), 77, 30.0, 4)
    assert HandoffRecord.from_json(rec.to_json()) == rec
    pre = HandoffRecord("10.0.0.1", 1234, 5, 1, (5,), 77, 30.0, 4, preposted=True, nonce=9)
    assert HandoffRecord.from_json(pre.to_json()) == pre
    assert decode(encode("ready", lease=1, epoch=2)) == {"t": "ready", "lease": 1, "epoch": 2}
    t = data_tag(77, 1023, (1 << 14) - 1, 255)
    assert t & KEY_MASK == key_prefix(77) and data_tag(78, 0, 0) & KEY_MASK != key_prefix(77)
    # every field is its own: no two (layer, msg, nonce) share a tag
    tags = {data_tag(77, l, m, n) for l in (0, 1, 1023) for m in (0, 1, (1 << 14) - 1) for n in (0, 1, 255)}
    assert len(tags) == 27 and all(x & KEY_MASK == key_prefix(77) for x in tags)
    for bad in ((77, 1024, 0, 0), (77, 0, 1 << 14, 0), (77, 0, 0, 256), (0, 0, 0, 0)):
        with pytest.raises(ValueError):
            data_tag(*bad)


def test_compat_mismatch_names_fields():
    a = KVLayout(2, 64, 16, 8, 128).compat_record("llama")
    assert compat_mismatch(a, KVLayout(2, 999, 16, 8, 128).compat_record("llama")) is None
    why = compat_mismatch(a, KVLayout(2, 64, 32, 8, 128, "float16").compat_record("llama"))
    assert "block_size" in why and "dtype" in why
    minor = KVLayout(2, 64, 16, 8, 128, "fp8_e4m3", True, v_token_minor=True).compat_record("llama")
    major = KVLayout(2, 64, 16, 8, 128, "fp8_e4m3", True).compat_record("llama")
    assert "v_token_minor" in compat_mismatch(minor, major)   # same bytes, different meaning


def test_bundle_bytes_for_grows_to_max_bundles_within_half_the_budget():
    from splitserve.kvtransfer.layout import bundle_bytes_for
    mib = 1 << 20
    assert bundle_bytes_for(512 * mib, 16 * mib, 0, 256 * mib) == 16 * mib       # off
    assert bundle_bytes_for(32 * mib, 16 * mib, 8, 256 * mib) == 16 * mib        # small: the floor
    assert bundle_bytes_for(512 * mib, 16 * mib, 8, 256 * mib) == 64 * mib       # 8 messages
    assert bundle_bytes_for(513 * mib, 16 * mib, 8, 256 * mib) == -(-513 * mib // 8)
    assert bundle_bytes_for(8192 * mib, 16 * mib, 8, 256 * mib) == 128 * mib     # half the budget
    assert bundle_bytes_for(8192 * mib, 16 * mib, 8, 8 * mib) == 16 * mib        # never below the floor
