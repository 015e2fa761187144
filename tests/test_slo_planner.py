"""Planner: hysteresis (patience, dead band, cooldown), bounds, moves between pools."""
from __future__ import annotations

import pytest

from splitserve.router.planner import Action, Planner, PlannerConfig, PoolMetrics
from splitserve.router.slo_policy import SLO

SLO_ = SLO(2.0, 0.05)


def m(ttft=1.0, tpot=0.03, pq=0, dq=0, p=2, d=2):
    return PoolMetrics(ttft, tpot, pq, dq, p, d)


def planner(**kw):
    return Planner(PlannerConfig(slo=SLO_, patience=3, cooldown=2, **kw))


def test_acts_only_after_patience_then_cools_down():
    pl = planner()
    acts = [pl.observe(m(ttft=3.0)).action for _ in range(6)]
    assert acts[:2] == [Action.NONE, Action.NONE]
    assert acts[2] == Action.ADD_PREFILL
    assert acts[3:5] == [Action.NONE, Action.NONE]       # cooldown
    assert acts[5] == Action.NONE                         # streak restarts after the action


def test_flapping_signal_never_acts():
    pl = planner()
    for i in range(20):
        assert pl.observe(m(ttft=3.0 if i % 2 else 1.5)).action is Action.NONE


def test_dead_band_holds_still():
    pl = planner()
    assert all(pl.observe(m(ttft=1.5, tpot=0.04)).action is Action.NONE for _ in range(10))


def test_decode_short_adds_decode_and_targets_sizes():
    pl = planner()
    for _ in range(2):
        pl.observe(m(tpot=0.08))
    d = pl.observe(m(tpot=0.08))
    assert d.action is Action.ADD_DECODE and (d.num_prefill, d.num_decode) == (2, 3)


def test_at_bound_moves_capacity_from_the_pool_with_slack():
    pl = planner(max_prefill=2)
    for _ in range(2):
        pl.observe(m(ttft=3.0, tpot=0.01))
    d = pl.observe(m(ttft=3.0, tpot=0.01))
    assert d.action is Action.DECODE_TO_PREFILL and (d.num_prefill, d.num_decode) == (3, 1)


def test_at_bound_without_slack_does_nothing():
    pl = planner(max_prefill=2)
    for _ in range(3):
        d = pl.observe(m(ttft=3.0, tpot=0.045))
    assert d.action is Action.NONE and "bounds" in d.reason


def test_growing_prefill_queue_is_a_signal():
    pl = planner()
    acts = [pl.observe(m(ttft=1.2, pq=q)).action for q in (1, 2, 3, 4, 5, 6)]
    assert Action.ADD_PREFILL in acts


def test_slack_removes_but_not_below_minimum():
    pl = planner(min_prefill=1, min_decode=1)
    acts = [pl.observe(m(ttft=0.2, tpot=0.01, p=1, d=1)).action for _ in range(5)]
    assert set(acts) == {Action.NONE}
    pl = planner()
    acts = [pl.observe(m(ttft=0.2, tpot=0.01)).action for _ in range(3)]
    assert acts[-1] in (Action.REMOVE_PREFILL, Action.REMOVE_DECODE)


def test_bad_bounds_raise():
    with pytest.raises(ValueError, match="bounds"):
        PlannerConfig(slo=SLO_, min_decode=0)
