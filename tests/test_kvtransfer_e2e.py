"""End-to-end KV transfers between separate processes over UCX loopback (TCP on CPU).

One decode process and one prefill process, each with its own random KV pool and agent; bytes
are compared block by block after every transfer, and the decode pool's free list and lease
table are checked for integrity.
"""
from __future__ import annotations

import os
import random
import time

import pytest
import torch

from splitserve.kvtransfer.testing import spawn_worker

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
pytestmark = pytest.mark.timeout(180)

LAYOUT = dict(num_layers=4, num_blocks=512, block_size=4, num_kv_heads=2, head_dim=8,
              dtype="bfloat16")


def path_config(path: str) -> dict:
    """tag: receives pre-posted at reservation (the default); classic: posted on the sender's
    `begin`; -buffer: staged bundles through staging buffers instead of descriptor lists."""
    name, _, staged = path.partition("-")
    return {"data_path": "tag" if name == "classic" else name, "prepost": name != "classic",
            "staged_path": staged or "auto"}


@pytest.fixture(scope="module", params=["tag", "tag-buffer", "classic", "rma"])
def pair(request):
    """Both data paths: tag messages (receives posted by the decode side, at reservation or on
    the sender's `begin`) and puts (rma); tag messages with staged bundles as descriptor lists in
    place (host pools' default) and through staging buffers (gather, ring, scatter: a CUDA pool's
    way, here on host memory)."""
    kw = path_config(request.param)
    d = spawn_worker(LAYOUT, seed=1, config_kw={"self_test": True, "direct_min_blocks": 4, **kw})
    p = spawn_worker(LAYOUT, seed=2, config_kw=kw)
    d.data_path = p.data_path = kw["data_path"]
    d.prepost = kw["prepost"] and kw["data_path"] == "tag"
    yield d, p
    d.close()
    p.close()


def same_bytes(p, src, d, dst) -> bool:
    a = p.call("blocks", src).view(torch.int16)
    b = d.call("blocks", dst).view(torch.int16)
    return torch.equal(a, b)


def transfer(d, p, dst, src, **kw):
    d.call("poison", dst)
    h = d.call("reserve", ids=dst)
    sent = p.call("send", h, src, **kw)
    got = d.call("wait_lease", h["lease_id"], 10)
    return h, sent, got


CASES = {
    "single": ([7], [300]),
    "contiguous": (list(range(100, 164)), list(range(0, 64))),
    "scattered": (random.Random(1).sample(range(512), 50), random.Random(2).sample(range(512), 50)),
    # a run of consecutive destination blocks from scattered sources: pre-posted plans send it
    # direct (gathered / a descriptor list on the sender), the others stage it
    "dst-run-src-scattered": (list(range(150, 190)), random.Random(5).sample(range(512), 40)),
    "hundreds-mixed": (list(range(200, 260)) + random.Random(3).sample(list(range(0, 200)) + list(range(300, 512)), 240),
                       random.Random(4).sample(range(512), 300)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_transfer_bytes_verified(pair, case):
    d, p = pair
    dst, src = CASES[case]
    h, sent, got = transfer(d, p, dst, src)
    assert sent == ("success", "") and got == ("success", "")
    assert p.call("sender_path", h) == d.data_path   # no silent fallback
    assert same_bytes(p, src, d, dst)
    d.call("release_completed", dst)
    assert d.call("integrity")["live"] == 0


def test_self_test_reports_transports(pair):
    d, _ = pair
    rep = d.call("self_test")
    assert rep["ok"] and rep["gbps"] > 0 and "tcp" in rep["transports"]


def test_wrong_checksum_rejected(pair):
    d, p = pair
    dst, src = [10, 11, 40], [1, 2, 3]
    h, sent, got = transfer(d, p, dst, src, corrupt="checksum")
    assert sent[0] == "failed" and "checksum mismatch" in sent[1]
    assert got[0] == "failed" and "checksum mismatch" in got[1]
    # the lease is still live (a retry could reuse it) until cancelled; then freed once
    before = d.call("integrity")
    assert d.call("cancel", h["lease_id"]) is True
    after = d.call("integrity")
    assert after["free_calls"] == before["free_calls"] + 1 and after["live"] == 0


def test_stale_epoch_completion_rejected(pair):
    d, p = pair
    dst, src = [50, 51], [60, 61]
    h, sent, got = transfer(d, p, dst, src, corrupt="epoch")
    assert sent[0] == "failed" and "epoch" in sent[1]
    assert d.call("cancel", h["lease_id"]) is True


def test_reissued_lease_refuses_old_epoch(pair):
    d, p = pair
    dst, src = [70, 71, 72], [1, 5, 9]
    h1 = d.call("reserve", ids=dst)
    h2 = d.call("reissue", h1["lease_id"])
    assert h2["epoch"] == h1["epoch"] + 1 and h2["tag_key"] != h1["tag_key"]
    sent = p.call("send", h1, src)
    assert sent[0] == "failed" and "stale epoch" in sent[1]
    assert p.call("send", h2, src) == ("success", "")
    assert same_bytes(p, src, d, dst)
    d.call("release_completed", dst)


def test_refused_sender_data_never_lands(pair):
    """Tag path: a sender's data goes out without waiting for `ready`. A second sender of the
    same live lease epoch (here with a wrong block list, refused at `begin`) posts data under the
    lease's tag key; it must not land in the blocks nor disturb the real sender, and is drained
    once the lease resolves. Put path: the refused sender never puts (it waits for `ready`)."""
    d, p = pair
    if d.prepost:
        return refused_sender_preposted(d, p)
    if d.data_path == "rma":
        dst, src = [120, 121, 122, 300], [5, 6, 7, 8]
        d.call("poison", dst)
        h = d.call("reserve", ids=dst)
        forged = {**h, "block_ids": [130, 131, 132, 133]}
        sent = p.call("send", forged, [1, 2, 3, 4])
        assert sent[0] == "failed" and "destination block list differs" in sent[1], sent
        assert p.call("sender_posted", forged) == 0
        assert d.call("blocks", dst).view(torch.int16).eq(0).all()
        assert p.call("send", h, src) == ("success", "")
        assert same_bytes(p, src, d, dst)
        d.call("release_completed", dst)
        return
    dst, src, bogus = [120, 121, 122, 300], [5, 6, 7, 8], [1, 2, 3, 4]
    d.call("poison", dst)
    h = d.call("reserve", ids=dst)
    forged = {**h, "block_ids": [130, 131, 132, 133]}
    before = d.call("dropped")
    d.call("delay_next_begin", 0.5)   # the forged sender's data goes out before the refusal
    sent = p.call("send", forged, bogus)
    assert sent[0] == "failed" and "destination block list differs" in sent[1], sent
    posted = p.call("sender_posted", forged)
    assert posted >= 1                # it did post data under the live lease's key
    assert d.call("blocks", dst).view(torch.int16).eq(0).all()   # still the poison
    assert p.call("send", h, src) == ("success", "")
    assert d.call("wait_lease", h["lease_id"], 10) == ("success", "")
    assert same_bytes(p, src, d, dst)
    # the key is tombstoned once the lease completes: every stray is drained, none landed
    assert wait_until(lambda: d.call("dropped") >= before + posted, 10), "refused data not drained"
    d.call("release_completed", dst)
    assert d.call("integrity")["live"] == 0


def refused_sender_preposted(d, p) -> None:
    """Pre-posted receives cannot tell senders apart before `complete`: a second holder of the
    record (here with a wrong block list) may land data, but only in this lease's own blocks,
    and is refused at `complete` (its destination digest differs). The attempt is dropped (the
    lease stays live), and a reissued epoch brings the real data in, verified."""
    dst, src, bogus, others = [120, 121, 122, 300], [5, 6, 7, 8], [1, 2, 3, 4], [130, 131, 132, 133]
    d.call("poison", dst)
    h = d.call("reserve", ids=dst)
    assert h["preposted"] and h["nonce"] > 0
    untouched = d.call("blocks", others)
    sent = p.call("send", {**h, "block_ids": others}, bogus)
    assert sent[0] == "failed" and "destination block list differs" in sent[1], sent
    assert d.call("wait_lease", h["lease_id"], 5)[0] == "failed"
    assert torch.equal(d.call("blocks", others).view(torch.int16), untouched.view(torch.int16))
    assert d.call("integrity")["live"] >= 1          # not freed: still this lease's blocks
    h2 = d.call("reissue", h["lease_id"])
    assert h2["epoch"] == h["epoch"] + 1 and h2["preposted"]
    assert p.call("send", h2, src) == ("success", "")
    assert d.call("wait_lease", h["lease_id"], 10) == ("success", "")
    assert same_bytes(p, src, d, dst)
    d.call("release_completed", dst)
    assert d.call("integrity")["live"] == 0


def wait_until(pred, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return bool(pred())


def test_incompatible_peer_refused(pair):
    d, _ = pair
    other = spawn_worker({**LAYOUT, "block_size": 8, "num_blocks": 64}, seed=3)
    try:
        h = d.call("reserve", ids=[90])
        sent = other.call("send", h, [1])
        assert sent[0] == "failed" and "incompatible KV peers" in sent[1] and "block_size" in sent[1]
        assert d.call("cancel", h["lease_id"]) is True
    finally:
        other.close()


def test_sender_cancel_is_acknowledged(pair):
    d, p = pair
    dst, src = [100, 101, 102, 103], [0, 1, 2, 3]
    h = d.call("reserve", ids=dst)
    p.call("send", h, src, layer_delay_s=0.3, wait=False)
    time.sleep(0.4)
    before = d.call("integrity")
    assert p.call("sender_cancel", h) is True
    assert p.call("sender_status", h, 5)[0] == "failed"
    assert d.call("wait_lease", h["lease_id"], 5)[0] == "failed"
    after = d.call("integrity")
    assert after["free_calls"] == before["free_calls"] + 1 and after["live"] == 0


@pytest.mark.parametrize("offset", [-0.05, 0.0, 0.02, 0.1])
def test_cancel_racing_last_write(pair, offset):
    """Decode cancels around the moment the last layer lands: either the cancel wins (blocks
    freed once, both sides Failed) or the completion wins (cancel refused, both Success,
    bytes exact). Never a mix."""
    d, p = pair
    dst, src = random.Random(offset).sample(range(400, 512), 20), list(range(20))
    d.call("poison", dst)
    h = d.call("reserve", ids=dst)
    before = d.call("integrity")
    delay = 0.05
    p.call("send", h, src, layer_delay_s=delay, wait=False)
    time.sleep(max(delay * LAYOUT["num_layers"] + offset, 0))
    cancelled = d.call("cancel", h["lease_id"])
    rx = d.call("wait_lease", h["lease_id"], 10)
    tx = p.call("sender_status", h, 10)
    after = d.call("integrity")
    if cancelled:
        assert rx[0] == "failed" and tx[0] == "failed"
        assert after["free_calls"] == before["free_calls"] + 1
    else:
        assert rx == ("success", "") and tx == ("success", "")
        assert after["free_calls"] == before["free_calls"]
        assert same_bytes(p, src, d, dst)
        d.call("release_completed", dst)
    assert after["live"] == 0


def test_finished_leases_are_forgotten():
    """A decode worker makes a lease per request: once finished (completed, or cancelled and
    freed) and older than transfer.lease_retention_s, its record and status are dropped by the
    sweeper; a live lease is kept."""
    d = spawn_worker(LAYOUT, seed=1, config_kw={"lease_retention_s": 0.3})
    p = spawn_worker(LAYOUT, seed=2)
    try:
        done = [transfer(d, p, [i], [i + 100]) for i in range(3)]
        assert all(sent == got == ("success", "") for _, sent, got in done)
        cancelled = d.call("reserve", ids=[40, 41])
        assert d.call("cancel", cancelled["lease_id"]) is True
        live = d.call("reserve", ids=[50])
        assert d.call("integrity")["records"] == 5
        assert wait_until(lambda: d.call("integrity")["records"] == 1, 10), d.call("integrity")
        info = d.call("integrity")
        assert info["statuses"] == 1 and info["live"] == 1
        state, reason = d.call("wait_lease", done[0][0]["lease_id"], 0)
        assert state == "failed" and "unknown lease" in reason
        assert d.call("wait_lease", live["lease_id"], 0)[0] == "bootstrapping"
        assert d.call("cancel", live["lease_id"]) is True
    finally:
        d.close()
        p.close()


def test_multi_layer_bundles_stream_through_a_one_slot_ring():
    """Staged bundles spanning several layers (here 3 + 1 of 4 layers: the decode side's
    bundle_kib carried in the handoff), a receive ring of one slot (a tiny staging budget: each
    bundle's receive is re-posted only after the previous one landed), the sender pushing layer
    by layer with a delay, and a cancelled send path not involved: bytes verified end to end.
    Staging buffers on both sides (host pools default to descriptor lists, which have no ring)."""
    ring = {"staged_path": "buffer", "staging_budget_kib": 1, "staging_layers": 1}
    h = bundled_transfer({**ring, "bundle_kib": 38, "direct_min_blocks": 8}, ring, seed=3,
                         layer_delay_s=0.05)
    assert h["bundle_bytes"] == 38 << 10


def bundled_transfer(d_cfg: dict, p_cfg: dict, seed: int, layer_delay_s: float) -> dict:
    """A fresh pair: 50 staged blocks and one direct run of 10, pushed layer by layer, bytes
    verified end to end and the lease released; returns the handoff record."""
    d = spawn_worker(LAYOUT, seed=seed, config_kw=d_cfg)
    p = spawn_worker(LAYOUT, seed=seed + 1, config_kw=p_cfg)
    try:
        r = random.Random(seed)
        src = r.sample(range(400), 50) + list(range(400, 410))
        dst = r.sample(range(300), 50) + list(range(450, 460))
        h, sent, got = transfer(d, p, dst, src, layer_delay_s=layer_delay_s)
        assert sent == ("success", "") and got == ("success", "")
        assert same_bytes(p, src, d, dst)
        d.call("release_completed", dst)
        assert d.call("integrity")["live"] == 0
        return h
    finally:
        d.close()
        p.close()


@pytest.mark.parametrize("path", ["buffer", "iov"])
def test_bundles_grow_to_max_bundles(path):
    """transfer.max_bundles: the decode side grows the bundle past bundle_kib (here 1 KiB, one
    layer per message) until the staged layers take at most 2 messages; the handoff record
    carries the size, the sender's plan and both of the decode side's (pre-posted and
    from `complete`) use it, and the bytes arrive verified."""
    from splitserve.kvtransfer.layout import bundle_bytes_for
    cfg = {"staged_path": path, "bundle_kib": 1, "max_bundles": 2, "direct_min_blocks": 8}
    h = bundled_transfer(cfg, {"staged_path": path}, seed=7, layer_delay_s=0.0)
    block_bytes = LAYOUT["num_layers"] * 2 * LAYOUT["block_size"] * LAYOUT["num_kv_heads"] * LAYOUT["head_dim"] * 2
    assert h["bundle_bytes"] == bundle_bytes_for(60 * block_bytes, 1 << 10, 2, 262144 << 10) == 30 << 10
    staged_layer = 50 * block_bytes // LAYOUT["num_layers"]   # the 50 staged blocks' K and V of a layer
    assert h["bundle_bytes"] // staged_layer == 2             # two layers per message, not one


@pytest.mark.parametrize("d_path,p_path", [("buffer", "iov"), ("iov", "buffer")])
def test_staged_paths_mix(d_path, p_path):
    """The staged path is each side's own choice: a descriptor list in place on one side and a
    staging buffer on the other carry the same bytes (multi-layer bundles, a direct run beside
    them, layer-by-layer pushes)."""
    bundled_transfer({"staged_path": d_path, "bundle_kib": 38, "direct_min_blocks": 8},
                     {"staged_path": p_path}, seed=5, layer_delay_s=0.01)


def test_verified_raw_baseline_checks_the_landed_bytes(pair):
    """bench/raw_parts.py's verified raw send (testing_raw): the receiver sums what landed and
    acks only on a match; a receiver whose sum disagrees (fault injected) fails the send.
    (Writes the pools' first bytes: last in the file.)"""
    d, p = pair
    if d.data_path != "tag" or not d.prepost:
        pytest.skip("the raw baseline does not depend on the handoff's data path")
    nbytes, tag = 64 << 10, 0x5E00_0000_0000_0000
    d.call("raw_connect", p.address)
    for i, (parts, verify) in enumerate([(1, "sent"), (4, "summed")]):
        d.call("raw_recv", nbytes, tag + 256 * i, parts, True)
        assert p.call("raw_send", d.address, nbytes, tag + 256 * i, parts, verify) > 0
        assert d.call("raw_sum", nbytes) == p.call("raw_sum", nbytes)
    d.call("exec", "f = self._landed_sum; self._landed_sum = lambda t: f(t) + 1")
    d.call("raw_recv", nbytes, tag + 1024, 1, True)
    with pytest.raises(Exception, match="does not match"):
        p.call("raw_send", d.address, nbytes, tag + 1024, 1, "sent")
