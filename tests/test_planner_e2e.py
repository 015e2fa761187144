"""The planner on a real local Ray cluster (SmolLM2 on CPU, 1P+1D): with an impossible TPOT SLO
it asks Ray for a second decode worker, which joins and serves; when the load is gone it drains
that pool back to its minimum. Every request completes in full throughout."""
from __future__ import annotations

import concurrent.futures
import threading
import time

import pytest

from splitserve.config import Config
from splitserve.router.planner import Action

from .test_cluster_e2e import SHORT, LiveCluster, _run_many

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

NEW = 16


def _wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _done(live, action):
    return any(d.action is action and outcome == "done" for d, outcome in live.cluster.autoscaler.history)


def test_planner_grows_the_decode_pool_through_ray_and_drains_it_back():
    cfg = (Config().replace("model", device="cpu")
           .replace("cluster", num_prefill=1, num_decode=1, drain_timeout_s=60.0)
           # TPOT of 0.01 ms cannot be met; TTFT of 10 min always is
           .replace("router", grpc_port=0, metrics_port=0, slo_tpot_ms=0.01, slo_ttft_ms=600_000.0)
           .replace("planner", enabled=True, interval_s=0.5, patience=1, cooldown=0,
                    min_prefill=1, max_prefill=1, min_decode=1, max_decode=2))
    live = LiveCluster(cfg)
    try:
        assert live.live("decode") == ["decode-0"]
        results, stop = [], threading.Event()

        def load():       # waves of requests until told to stop
            while not stop.is_set():
                results.extend(_run_many(live.address, SHORT * 2, NEW))

        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            bg = ex.submit(load)
            _wait_for(lambda: _done(live, Action.ADD_DECODE) or bg.done(), 150, "the planner to add a decode worker")
            assert _done(live, Action.ADD_DECODE), bg.result()
            added = [n for n in live.live("decode") if n != "decode-0"]
            assert len(added) == 1 and live.call(added[0], "ping") == added[0]     # a real new actor
            # it serves: the least-loaded decode worker is the new one while the waves run on decode-0
            extra = _run_many(live.address, SHORT, NEW)
            stop.set()
            bg.result(timeout=120)
        assert any(r.info["decode_worker"] == added[0] for r in extra)
        every = results + extra
        assert len(every) >= len(SHORT) * 3
        assert all(r.finish_reason == "length" and len(r.token_ids) == NEW for r in every)
        # idle: slack on both pools -> the decode pool drains back to its minimum, within the bounds
        _wait_for(lambda: _done(live, Action.REMOVE_DECODE), 60, "the planner to remove a decode worker")
        assert len(live.live("decode")) == 1 and live.live("prefill") == ["prefill-0"]
        m = live.cluster.metrics.registry.get_sample_value
        assert m("splitserve_planner_decisions_total", {"action": "add_decode", "outcome": "done"}) == 1
        live.check_integrity()
    finally:
        live.stop()
