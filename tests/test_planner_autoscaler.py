"""The planner wired to the cluster, without Ray: the planner config section, the router's latency
samples, pool_metrics (pure), scaling_steps (pure), the Autoscaler against a fake cluster, and
WorkerPool.remove's drain (waits for the router's flights; hands over what is left on timeout)."""
from __future__ import annotations

import asyncio
import math
import time

import pytest

from splitserve.config import Config, PlannerConfig, config_from_dict, field_docs
from splitserve.deploy.autoscaler import Autoscaler, scaling_steps
from splitserve.router.metrics import RouterMetrics
from splitserve.router.planner import Action, Decision
from splitserve.router.planner_signals import IntervalSamples, LatencyWindow, p90, pool_metrics
from splitserve.router.router import Flight, Router
from splitserve.router.slo_policy import SLO
from splitserve.router.workers import WorkerPool

BOUNDS = PlannerConfig(enabled=True, min_prefill=1, max_prefill=2, min_decode=1, max_decode=2)


def snap(name, role, running=0, waiting=0, transferring=0, draining=False):
    return {"name": name, "role": role, "num_running": running, "num_waiting": waiting,
            "num_transferring": transferring, "draining": draining, "free_blocks": 10, "total_blocks": 10}


# ---------------------------------------------------------------- config
def test_planner_section_loads_and_validates():
    cfg = config_from_dict({"planner": {"enabled": True, "interval_s": 2.5, "max_decode": 3}})
    assert cfg.planner.enabled and cfg.planner.interval_s == 2.5 and cfg.planner.max_decode == 3
    assert Config().planner.enabled is False
    for bad, field in (({"low": 0.9, "high": 0.8}, "planner.low/high"), ({"interval_s": 0}, "planner.interval_s"),
                       ({"min_prefill": 3, "max_prefill": 2}, "planner.min_prefill/max_prefill"),
                       ({"patience": 0}, "planner.patience"), ({"cooldown": -1}, "planner.cooldown")):
        with pytest.raises(ValueError, match=field):
            config_from_dict({"planner": bad})
    with pytest.raises(ValueError, match="unknown field"):
        config_from_dict({"planner": {"max_workers": 3}})
    assert all(field_docs(PlannerConfig).values()), "every field has a doc line"


def test_enabled_planner_needs_the_start_pools_inside_its_bounds():
    with pytest.raises(ValueError, match="cluster.num_decode"):
        config_from_dict({"cluster": {"num_decode": 3}, "planner": {"enabled": True, "max_decode": 2}})
    with pytest.raises(ValueError, match="cluster.num_prefill"):
        Config().replace("planner", enabled=True, min_prefill=2)
    # off: the bounds do not constrain the start sizes
    assert config_from_dict({"cluster": {"num_decode": 3}, "planner": {"max_decode": 2}}).cluster.num_decode == 3


# ---------------------------------------------------------------- signals
def test_p90_nearest_rank_and_window():
    assert p90([]) == 0.0 and p90([5.0]) == 5.0
    assert p90(list(range(1, 11))) == 9 and p90(list(range(1, 101))) == 90
    w = LatencyWindow()
    w.record_ttft(1.0), w.record_tpot(0.1), w.record_tpot(0.2)
    s = w.take([3.0], 4)
    assert s == IntervalSamples((1.0,), (0.1, 0.2), (3.0,), 4)
    assert w.take() == IntervalSamples((), (), (), 0)          # taken samples are gone


def test_pool_metrics_p90_queues_and_sizes():
    samples = IntervalSamples(ttft_s=(0.5,) * 9 + (1.0,), tpot_s=(0.05, 0.2), waiting_ages_s=(0.1, 2.5, 3.0),
                              in_flight=5)
    prefill = [snap("p0", "prefill", waiting=2), snap("p1", "prefill", waiting=7, draining=True)]
    decode = [snap("d0", "decode", waiting=1, running=4), snap("d1", "decode", waiting=3)]
    m = pool_metrics(samples, 2.0, prefill, decode)
    # the two flights waiting past the 2 s SLO count with their ages; the young one does not
    assert m.ttft_p90_s == 2.5 and m.tpot_p90_s == 0.2
    assert (m.prefill_queue, m.decode_queue, m.num_prefill, m.num_decode) == (2, 4, 1, 2)


def test_no_sample_is_zero_when_idle_and_unknown_under_load():
    busy = IntervalSamples((0.3,), (), (0.1,), in_flight=1)        # first tokens, nothing completed
    m = pool_metrics(busy, 2.0, [], [snap("d0", "decode")])
    assert m.ttft_p90_s == 0.3 and math.isnan(m.tpot_p90_s)
    idle = IntervalSamples((), (), (), in_flight=0)
    m = pool_metrics(idle, 2.0, [], [snap("d0", "decode")])
    assert m.ttft_p90_s == 0.0 and m.tpot_p90_s == 0.0


class _Tok:
    vocab_size = 100

    def decode(self, ids):
        return "x" * len(ids)


def test_router_records_first_tokens_completions_and_assignments():
    async def scenario():
        pool = WorkerPool()
        r = Router(Config().router, _Tok(), 128, pool, policy=None)
        assert pool.assigned == r.assigned_to
        a = Flight("a", [1, 2], {"max_tokens": 4}, asyncio.Queue(), time.monotonic() - 1.0, decode="d0", prefill="p0",
                   remote=True)
        b = Flight("b", [1], {"max_tokens": 4}, asyncio.Queue(), time.monotonic() - 3.0, decode="d0")
        r.flights.update(a=a, b=b)
        assert r.assigned_to("p0") == 1 and r.assigned_to("d0") == 2
        r._add_tokens(a, 0, [5])                 # a's first token: TTFT ~1 s; p0 is done with it
        assert r.assigned_to("p0") == 0
        r._add_tokens(a, 1, [6, 7])
        r._complete(a, "length")
        assert r.assigned_to("d0") == 1
        s = r.take_interval()
        assert len(s.ttft_s) == 1 and 0.9 < s.ttft_s[0] < 2.0
        assert len(s.tpot_s) == 1 and s.in_flight == 2     # a is still in flights until its stream ends
        assert len(s.waiting_ages_s) == 1 and s.waiting_ages_s[0] >= 3.0
        assert r.take_interval().ttft_s == ()
    asyncio.run(scenario())


# ---------------------------------------------------------------- steps
def test_scaling_steps_bounds_victims_and_moves():
    p1, d1 = [snap("p0", "prefill")], [snap("d0", "decode", running=3), snap("d1", "decode", running=1)]
    dec = lambda a: Decision(a, 0, 0)      # noqa: E731 (targets are not read by scaling_steps)
    assert scaling_steps(dec(Action.ADD_PREFILL), BOUNDS, p1, d1[:1]) == ("prefill", None, "")
    s = scaling_steps(dec(Action.ADD_DECODE), BOUNDS, p1, d1)
    assert s.add is None and "maximum" in s.skipped
    assert scaling_steps(dec(Action.REMOVE_DECODE), BOUNDS, p1, d1).remove == "d1"       # least loaded
    s = scaling_steps(dec(Action.REMOVE_PREFILL), BOUNDS, p1, d1)
    assert s.remove is None and "minimum" in s.skipped
    assert scaling_steps(dec(Action.DECODE_TO_PREFILL), BOUNDS, p1, d1) == ("prefill", "d1", "")
    s = scaling_steps(dec(Action.PREFILL_TO_DECODE), BOUNDS, p1, d1[:1])
    assert s.add is None and "prefill pool at its minimum" in s.skipped
    # a draining worker no longer counts: the pool may grow again, and it is never the victim
    d_drain = [snap("d0", "decode"), snap("d1", "decode", draining=True)]
    assert scaling_steps(dec(Action.ADD_DECODE), BOUNDS, p1, d_drain).add == "decode"
    ties = [snap("d0", "decode"), snap("d1", "decode")]
    assert scaling_steps(dec(Action.REMOVE_DECODE), BOUNDS, p1, ties).remove == "d1"    # newest on a tie


# ---------------------------------------------------------------- the autoscaler, fake cluster
class FakeCluster:
    """Records add/remove calls; the pool is a dict of snapshots, the router a script of samples."""

    def __init__(self, num_prefill=1, num_decode=1, fail_add=False):
        self.snaps = {f"prefill-{i}": snap(f"prefill-{i}", "prefill") for i in range(num_prefill)}
        self.snaps.update({f"decode-{i}": snap(f"decode-{i}", "decode") for i in range(num_decode)})
        self.samples: list[IntervalSamples] = []
        self.calls: list[tuple[str, str]] = []
        self.fail_add = fail_add
        self.pool, self.router = self, self

    def snapshots(self, role):
        return [s for s in self.snaps.values() if s["role"] == role]

    def take_interval(self):
        return self.samples.pop(0) if self.samples else IntervalSamples((), (), (), 0)

    async def add_worker(self, role):
        self.calls.append(("add", role))
        if self.fail_add:
            raise RuntimeError("no room in the Ray cluster")
        name = f"{role}-{len(self.snapshots(role)) + 10}"
        self.snaps[name] = snap(name, role)
        return name

    async def remove_worker(self, name):
        self.calls.append(("remove", name))
        del self.snaps[name]


def _autoscaler(cluster, **kw):
    cfg = PlannerConfig(**{"enabled": True, "interval_s": 0.01, "patience": 1, "cooldown": 0,
                           "max_prefill": 2, "max_decode": 2, **kw})
    metrics = RouterMetrics()
    return Autoscaler(cluster, cfg, SLO(2.0, 0.05), metrics), metrics


def _count(metrics, action, outcome):
    return metrics.registry.get_sample_value("splitserve_planner_decisions_total",
                                             {"action": action, "outcome": outcome}) or 0


def test_autoscaler_adds_on_slow_tpot_then_holds_at_the_bound():
    c = FakeCluster()
    a, metrics = _autoscaler(c)
    slow = IntervalSamples((0.5,), (0.2, 0.3), (), 2)       # TPOT p90 6x the SLO; P is at its minimum: no move
    c.samples = [slow, slow]
    d = asyncio.run(a.step())
    assert d.action is Action.ADD_DECODE and c.calls == [("add", "decode")]
    c.samples = [slow]     # the first was dropped: measured while the pool changed
    d = asyncio.run(a.step())
    assert d.action is Action.NONE and c.calls == [("add", "decode")]      # 2 decode = max
    assert _count(metrics, "add_decode", "done") == 1 and _count(metrics, "none", "hold") == 1
    assert metrics.registry.get_sample_value("splitserve_planner_target_workers", {"role": "decode"}) == 2
    assert metrics.registry.get_sample_value("splitserve_planner_signal", {"signal": "tpot_p90_s"}) == 0.3
    assert [(x.action, o) for x, o in a.history] == [(Action.ADD_DECODE, "done")]


def test_autoscaler_moves_add_first_and_removes_on_slack():
    c = FakeCluster(num_prefill=2, num_decode=1)
    a, _ = _autoscaler(c)
    c.samples = [IntervalSamples((0.1,), (0.5,), (), 1)]     # TPOT short, TTFT slack: move P -> D
    assert asyncio.run(a.step()).action is Action.PREFILL_TO_DECODE
    assert c.calls == [("add", "decode"), ("remove", "prefill-1")]
    c.calls.clear()
    assert asyncio.run(a.step()).action is Action.REMOVE_DECODE     # idle router: slack
    assert c.calls == [("remove", "decode-11")]
    c.calls.clear()
    assert asyncio.run(a.step()).action is Action.NONE                # both pools at their minimum
    assert c.calls == []


def test_failed_add_removes_nothing():
    c = FakeCluster(num_prefill=2, num_decode=1, fail_add=True)
    a, metrics = _autoscaler(c)
    c.samples = [IntervalSamples((0.1,), (0.5,), (), 1)]
    asyncio.run(a.step())
    assert c.calls == [("add", "decode")] and "prefill-1" in c.snaps
    assert _count(metrics, "prefill_to_decode", "failed") == 1


def test_loop_runs_on_its_interval_and_stops():
    async def scenario():
        c = FakeCluster(num_prefill=1, num_decode=2)
        a, _ = _autoscaler(c)
        a.start()
        await asyncio.sleep(0.2)
        await a.stop()
        return c
    c = asyncio.run(scenario())
    assert c.calls == [("remove", "decode-1")]      # idle: down to the minimum, then it holds


# ---------------------------------------------------------------- drain without Ray
class FakeActor:
    """A worker actor whose methods are called as `actor.method.remote(...)`."""

    def __init__(self, name, role):
        self.name, self.role, self.busy, self.calls = name, role, 0, []

    def __getattr__(self, method):
        actor = self

        class _M:
            @staticmethod
            async def remote(*args):
                actor.calls.append(method)
                if method == "take_outputs":
                    await asyncio.sleep(0.05)
                    return []
                if method == "snapshot":
                    return snap(actor.name, actor.role, running=actor.busy)
                return None
        return _M


def test_remove_waits_for_the_routers_flights_then_stops():
    async def scenario():
        pool = WorkerPool()
        actor = FakeActor("decode-0", "decode")
        await pool.add("decode-0", "decode", actor)
        left = {"n": 1}
        pool.assigned = lambda name: left["n"]          # one flight placed here, not yet on the worker
        died = []
        pool.on_decode_died = died.append
        asyncio.get_running_loop().call_later(0.3, left.update, {"n": 0})
        t0 = time.monotonic()
        await pool.remove("decode-0", timeout=5.0)
        return time.monotonic() - t0, actor.calls, died, pool
    waited, calls, died, pool = asyncio.run(scenario())
    assert waited >= 0.3 and died == [] and "drain" in calls and calls[-1] == "shutdown"
    assert "decode-0" not in pool.workers


def test_remove_hands_over_what_is_left_after_the_timeout():
    async def scenario():
        pool = WorkerPool()
        actor = FakeActor("decode-0", "decode")
        await pool.add("decode-0", "decode", actor)
        actor.busy = 1                       # a request that will not finish in time
        died = []
        pool.on_decode_died = died.append    # the router migrates the worker's flights here
        await pool.remove("decode-0", timeout=0.3)
        return died, pool
    died, pool = asyncio.run(scenario())
    assert died == ["decode-0"] and "decode-0" not in pool.workers
