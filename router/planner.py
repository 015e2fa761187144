"""Capacity planner: grow, shrink or rebalance the prefill and decode pools from SLO signals.

A pure state machine (no Ray): call `observe(metrics)` once per planning interval with the
interval's p90 TTFT/TPOT and queue depths; it returns a `Decision` (an action and the target
pool sizes) that the deployment layer carries out (Ray actors added, drained or re-roled).

Signals per interval (ratios to the SLO):
  prefill short  TTFT p90 > high x TTFT SLO, or the prefill queue grew for `patience` intervals
                 while TTFT p90 is above low x SLO
  decode short   TPOT p90 > high x TPOT SLO, or the decode queue (requests waiting for KV) grew
  slack          both p90s below low x SLO and no queue
A p90 is NaN when the interval had no sample of it while requests were in flight (no evidence):
every comparison with NaN is false, so it makes its pool neither short nor slack.
Hysteresis: a signal must hold for `patience` consecutive intervals before it acts (the band
between `low` and `high` holds no signal at all), and after any action the planner waits
`cooldown` intervals, so one burst does not flap the pools. A short pool first takes a worker
from the other pool when that pool has slack (a move: the total stays the same), else it grows
by one within its maximum; on slack the pool with the most slack shrinks by one, never below its
minimum. Every target the planner returns is within [min, max] for both pools.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from enum import Enum

from ..config import PlannerConfig
from .slo_policy import SLO


@dataclass(frozen=True)
class PoolMetrics:
    """One planning interval as the router measured it."""
    ttft_p90_s: float          # NaN: no sample while requests were in flight
    tpot_p90_s: float
    prefill_queue: int         # requests queued on prefill workers
    decode_queue: int          # requests waiting for KV room / local prefill on decode workers
    num_prefill: int
    num_decode: int


class Action(str, Enum):
    NONE = "none"
    ADD_PREFILL = "add_prefill"
    ADD_DECODE = "add_decode"
    REMOVE_PREFILL = "remove_prefill"
    REMOVE_DECODE = "remove_decode"
    DECODE_TO_PREFILL = "decode_to_prefill"
    PREFILL_TO_DECODE = "prefill_to_decode"


@dataclass(frozen=True)
class Decision:
    action: Action
    num_prefill: int           # target pool sizes after the action
    num_decode: int
    reason: str = ""


def _known(ratio: float) -> float:
    return 0.0 if math.isnan(ratio) else ratio


class Planner:
    def __init__(self, config: PlannerConfig, slo: SLO):
        """`config` is validated by splitserve.config (bounds, low < high, patience >= 1)."""
        self.config = config
        self.slo = slo
        self._history: deque[PoolMetrics] = deque(maxlen=config.patience + 1)
        self._signal: str | None = None
        self._streak = 0
        self._cooldown = 0

    def observe(self, m: PoolMetrics) -> Decision:
        """Feed one interval; returns the action to take now (usually NONE)."""
        self._history.append(m)
        signal = self._classify(m)
        self._streak = self._streak + 1 if signal is not None and signal == self._signal else int(signal is not None)
        self._signal = signal
        if self._cooldown > 0:  # the last action's effect is not visible yet: intervals do not count
            self._cooldown -= 1
            self._streak, self._signal = 0, None
            return Decision(Action.NONE, m.num_prefill, m.num_decode, "cooldown")
        if signal is None or self._streak < self.config.patience:
            return Decision(Action.NONE, m.num_prefill, m.num_decode, f"signal {signal} x{self._streak}")
        d = self._act(signal, m)
        if d.action is not Action.NONE:
            self._cooldown, self._streak, self._signal = self.config.cooldown, 0, None
        return d

    # ------------------------------------------------------------------ internals
    def _growing(self, attr: str) -> bool:
        h = list(self._history)
        if len(h) <= self.config.patience:
            return False
        vals = [getattr(x, attr) for x in h]
        return all(b > a for a, b in zip(vals, vals[1:]))

    def _classify(self, m: PoolMetrics) -> str | None:
        c, slo = self.config, self.slo
        rt, rp = m.ttft_p90_s / slo.ttft_s, m.tpot_p90_s / slo.tpot_s
        p_short = rt > c.high or (self._growing("prefill_queue") and rt > c.low)
        d_short = rp > c.high or self._growing("decode_queue")
        if p_short and d_short:
            return "both_short"
        if p_short:
            return "prefill_short"
        if d_short:
            return "decode_short"
        if rt < c.low and rp < c.low and m.prefill_queue == 0 and m.decode_queue == 0:
            return "slack"
        return None

    def _act(self, signal: str, m: PoolMetrics) -> Decision:
        c, slo = self.config, self.slo
        p, d = m.num_prefill, m.num_decode
        rt, rp = m.ttft_p90_s / slo.ttft_s, m.tpot_p90_s / slo.tpot_s
        both = signal == "both_short"      # no pool to take from: only grow
        if both:
            signal = "prefill_short" if _known(rt) >= _known(rp) else "decode_short"
        if signal == "prefill_short" and p < c.max_prefill:
            if not both and d > c.min_decode and rp < c.low:
                return Decision(Action.DECODE_TO_PREFILL, p + 1, d - 1, f"TTFT p90 {rt:.2f}x SLO, TPOT slack {rp:.2f}x")
            return Decision(Action.ADD_PREFILL, p + 1, d, f"TTFT p90 {rt:.2f}x SLO")
        if signal == "decode_short" and d < c.max_decode:
            if not both and p > c.min_prefill and rt < c.low:
                return Decision(Action.PREFILL_TO_DECODE, p - 1, d + 1, f"TPOT p90 {rp:.2f}x SLO, TTFT slack {rt:.2f}x")
            return Decision(Action.ADD_DECODE, p, d + 1, f"TPOT p90 {rp:.2f}x SLO")
        if signal == "slack":
            if rt <= rp and p > c.min_prefill:
                return Decision(Action.REMOVE_PREFILL, p - 1, d, f"slack: TTFT p90 {rt:.2f}x SLO")
            if d > c.min_decode:
                return Decision(Action.REMOVE_DECODE, p, d - 1, f"slack: TPOT p90 {rp:.2f}x SLO")
            if p > c.min_prefill:
                return Decision(Action.REMOVE_PREFILL, p - 1, d, f"slack: TTFT p90 {rt:.2f}x SLO")
        return Decision(Action.NONE, p, d, f"{signal} but at the bounds")
