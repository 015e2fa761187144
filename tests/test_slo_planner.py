"""Planner: hysteresis (patience, dead band, cooldown), bounds, moves between pools."""
from __future__ import annotations

import pytest

from splitserve.config import PlannerConfig
from splitserve.router.planner import Action, Planner, PoolMetrics
from splitserve.router.slo_policy import SLO

SLO_ = SLO(2.0, 0.05)


def m(ttft=1.0, tpot=0.03, pq=0, dq=0, p=2, d=2):
    return PoolMetrics(ttft, tpot, pq, dq, p, d)


def planner(**kw):
    kw = {"max_prefill": 8, "max_decode": 8, **kw}
    return Planner(PlannerConfig(enabled=True, patience=3, cooldown=2, **kw), SLO_)


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


def test_short_pool_takes_a_worker_from_the_pool_with_slack():
    pl = planner()
    for _ in range(2):
        pl.observe(m(ttft=3.0, tpot=0.01))
    d = pl.observe(m(ttft=3.0, tpot=0.01))
    assert d.action is Action.DECODE_TO_PREFILL and (d.num_prefill, d.num_decode) == (3, 1)
    pl = planner()
    for _ in range(3):
        d = pl.observe(m(ttft=0.5, tpot=0.2))
    assert d.action is Action.PREFILL_TO_DECODE and (d.num_prefill, d.num_decode) == (1, 3)


def test_no_move_from_a_pool_at_its_minimum_or_without_slack():
    pl = planner(min_decode=2)
    for _ in range(3):
        d = pl.observe(m(ttft=3.0, tpot=0.01))
    assert d.action is Action.ADD_PREFILL                 # D has slack but is at its minimum
    pl = planner()
    for _ in range(3):
        d = pl.observe(m(ttft=3.0, tpot=0.045))
    assert d.action is Action.ADD_PREFILL                 # D has no slack


def test_at_bound_does_nothing():
    pl = planner(max_prefill=2)
    for _ in range(3):
        d = pl.observe(m(ttft=3.0, tpot=0.01))
    assert d.action is Action.NONE and "bounds" in d.reason


@pytest.mark.parametrize("kw", [dict(max_prefill=3, max_decode=3), dict(min_prefill=2, min_decode=2),
                                dict(max_prefill=2, max_decode=2, min_prefill=2, min_decode=2)])
def test_targets_stay_within_bounds(kw):
    import random
    rnd = random.Random(5)
    pl = planner(**kw)
    c = pl.config
    p, d = 2, 2
    for _ in range(300):
        dec = pl.observe(m(ttft=rnd.choice([0.2, 1.5, 3.0]), tpot=rnd.choice([0.01, 0.04, 0.08]),
                           pq=rnd.randint(0, 3), dq=rnd.randint(0, 3), p=p, d=d))
        p, d = dec.num_prefill, dec.num_decode
        assert c.min_prefill <= p <= c.max_prefill and c.min_decode <= d <= c.max_decode


def test_both_short_grows_never_moves():
    pl = planner()
    for _ in range(3):
        d = pl.observe(m(ttft=4.0, tpot=0.06))
    assert d.action is Action.ADD_PREFILL


def test_unknown_p90_is_neither_short_nor_slack():
    nan = float("nan")
    pl = planner()
    assert {pl.observe(m(ttft=nan, tpot=nan)).action for _ in range(5)} == {Action.NONE}
    pl = planner()
    assert {pl.observe(m(ttft=0.1, tpot=nan)).action for _ in range(5)} == {Action.NONE}   # no slack
    pl = planner()
    for _ in range(3):
        d = pl.observe(m(ttft=3.0, tpot=nan))
    assert d.action is Action.ADD_PREFILL        # short on TTFT; D's slack is unknown: no move
    pl = planner()
    acts = [pl.observe(m(ttft=nan, tpot=nan, dq=q)).action for q in range(1, 8)]
    assert Action.ADD_DECODE in acts             # a growing decode queue needs no latency sample



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
    with pytest.raises(ValueError, match="planner.min_decode"):
        PlannerConfig(min_decode=0)
