"""Fault tests: processes killed mid-transfer, and many concurrent transfers.

Heavy (several processes on a 2-core machine), so marked slow; they still run in CI.
"""
from __future__ import annotations

import os
import random
import time

import pytest
import torch

from splitserve.kvtransfer.testing import spawn_worker

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

LAYOUT = dict(num_layers=8, num_blocks=512, block_size=4, num_kv_heads=2, head_dim=8,
              dtype="bfloat16")


def wait_for(pred, timeout: float, every: float = 0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(every)
    return pred()


# tag messages (receives pre-posted at reservation, or posted on `begin`: classic) with staged
# bundles as descriptor lists (host pools' default) or through staging buffers, and puts
PATHS = pytest.mark.parametrize("path", ["tag", "tag-buffer", "classic", "rma"])


def paths(path: str, **kw) -> dict:
    name, _, staged = path.partition("-")
    return {"data_path": "tag" if name == "classic" else name, "prepost": name != "classic",
            "staged_path": staged or "auto", **kw}


@PATHS
def test_receiver_killed_mid_transfer(path):
    d = spawn_worker(LAYOUT, seed=1, config_kw=paths(path))
    p = spawn_worker(LAYOUT, seed=2, config_kw=paths(path))
    try:
        h = d.call("reserve", ids=list(range(32)))
        p.call("send", h, list(range(100, 132)), layer_delay_s=0.25, wait=False)
        time.sleep(0.6)                    # a few layers are on the wire
        t0 = time.monotonic()
        d.kill()
        state, reason = p.call("sender_status", h, 25)
        took = time.monotonic() - t0
        assert state == "failed" and reason, reason
        assert took < h["ttl_s"]           # failed well within the deadline, no hang
        info = p.call("sender_side")
        assert info["active_senders"] == 0 and info["peers"] == 0   # its side is cleaned
    finally:
        d.kill()
        p.close()


@PATHS
def test_sender_killed_mid_transfer(path):
    """rma: the dead sender cannot answer the fence; its endpoint's loss (plus the grace period)
    ends its write, then the expired lease frees the blocks once."""
    d = spawn_worker(LAYOUT, seed=1, config_kw=paths(path, lease_timeout_s=3.0))
    p = spawn_worker(LAYOUT, seed=2, config_kw=paths(path))
    try:
        total = d.call("integrity")["free"]
        ids = random.Random(5).sample(range(512), 40)
        h = d.call("reserve", ids=ids)
        p.call("send", h, list(range(40)), layer_delay_s=0.25, wait=False)
        time.sleep(0.6)
        p.kill()
        state, reason = d.call("wait_lease", h["lease_id"], 10)
        assert state == "failed", reason
        # the lease outlives its sender until the deadline, then frees the blocks once
        info = wait_for(lambda: (lambda i: i if i["live"] == 0 and i["free"] == total else None)(
            d.call("integrity")), 10)
        assert info and info["free_calls"] == 1 and info["freed_count"] == 1, info
        # the pool is whole and reusable: a fresh transfer into the same blocks works
        p2 = spawn_worker(LAYOUT, seed=3, config_kw=paths(path))
        try:
            h2 = d.call("reserve", ids=ids)
            assert p2.call("send", h2, list(range(40))) == ("success", "")
            assert p2.call("sender_path", h2) == paths(path)["data_path"]
            a = p2.call("blocks", list(range(40))).view(torch.int16)
            assert torch.equal(a, d.call("blocks", ids).view(torch.int16))
        finally:
            p2.close()
        assert d.call("integrity")["free_calls"] == 1
    finally:
        p.kill()
        d.close()


@PATHS
def test_100_concurrent_transfers_two_pairs(path):
    small = {**LAYOUT, "num_layers": 4}
    cfg = paths(path)
    ds = [spawn_worker(small, seed=10 + i, config_kw=cfg) for i in range(2)]
    ps = [spawn_worker(small, seed=20 + i, config_kw=cfg) for i in range(2)]
    try:
        rnd = random.Random(0)
        jobs = []   # (decode, prefill, handoff, src)
        for k in range(100):
            d, p = ds[k % 2], ps[(k // 2) % 2]
            n = rnd.choice([1, 2, 5, 8])
            h = d.call("reserve", n=n, seed=k)
            src = rnd.sample(range(512), n)
            d.call("poison", h["block_ids"])
            jobs.append((d, p, h, src))
        for d, p, h, src in jobs:
            p.call("send", h, src, wait=False)
        for d, p, h, src in jobs:
            assert p.call("sender_status", h, 60) == ("success", ""), h["lease_id"]
            assert p.call("sender_path", h) == paths(path)["data_path"]
            assert d.call("wait_lease", h["lease_id"], 30) == ("success", "")
            a = p.call("blocks", src).view(torch.int16)
            assert torch.equal(a, d.call("blocks", h["block_ids"]).view(torch.int16))
        for d in ds:
            info = d.call("integrity")
            assert info["live"] == 0 and info["free_calls"] == 0
    finally:
        for w in ds + ps:
            w.close()
