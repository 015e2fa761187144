"""Router placement policies on crafted load snapshots (plain Python: no Ray, no torch)."""
from __future__ import annotations

import pytest

from splitserve.router.policy import ColocatedPolicy, LoadAwarePolicy, NoWorker, RoundRobinPolicy


def snap(name, role="decode", running=0, waiting=0, free=100, total=100, assigned=0, draining=False):
    return {"name": name, "role": role, "num_running": running, "num_waiting": waiting, "num_transferring": 0,
            "free_blocks": free, "total_blocks": total, "assigned": assigned, "draining": draining}


def test_short_prompt_prefills_locally_long_one_remotely():
    pol = LoadAwarePolicy(local_prefill_max_tokens=64)
    d, p = [snap("d0")], [snap("p0", "prefill")]
    assert pol.place(10, d, p).prefill is None
    assert pol.place(65, d, p).prefill == "p0"
    assert pol.place(1000, d, []).prefill is None, "no prefill worker: decode worker prefills"


def test_least_loaded_decode_and_prefill():
    pol = LoadAwarePolicy(0)
    d = [snap("d0", assigned=3), snap("d1", assigned=1), snap("d2", assigned=1, free=10)]
    p = [snap("p0", "prefill", assigned=2), snap("p1", "prefill", running=1)]
    place = pol.place(100, d, p)
    assert place.decode == "d1"          # same assigned count as d2, more free KV
    assert place.prefill == "p1"


def test_router_side_counts_spread_a_burst():
    pol = LoadAwarePolicy(0)
    counts = {"d0": 0, "d1": 0}
    for _ in range(10):
        d = [snap(n, assigned=c) for n, c in counts.items()]
        counts[pol.place(100, d, []).decode] += 1
    assert counts == {"d0": 5, "d1": 5}


def test_draining_dead_and_excluded_workers_are_skipped():
    pol = LoadAwarePolicy(0)
    d = [snap("d0", draining=True), snap("d1", assigned=9), snap("d2")]
    assert pol.place(5, d, [], exclude=frozenset({"d2"})).decode == "d1"
    with pytest.raises(NoWorker):
        pol.place(5, [snap("d0", draining=True)], [])


def test_baselines():
    rr = RoundRobinPolicy()
    d = [snap("d0"), snap("d1")]
    p = [snap("p0", "prefill"), snap("p1", "prefill")]
    got = [rr.place(1, d, p) for _ in range(4)]
    assert [g.decode for g in got] == ["d0", "d1", "d0", "d1"]
    assert all(g.remote for g in got), "round-robin always disaggregates"
    assert not ColocatedPolicy().place(10_000, d, p).remote
