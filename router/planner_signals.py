"""What the planner observes each interval, gathered from the router (plain Python, no Ray).

    LatencyWindow      the router records each request's TTFT (at its first token) and TPOT (at
                       completion); `take()` hands over the interval's samples and starts a new one
    IntervalSamples    those samples plus the ages of flights still waiting for a first token
    pool_metrics()     samples + worker snapshots -> PoolMetrics (p90s, queues, pool sizes)

A flight that has waited longer than the TTFT SLO without a first token counts with its age so
far (a lower bound of its TTFT, and already a miss), so a stall shows before anything finishes.
A p90 with no sample is 0.0 when the router is idle (no load: slack) and NaN while requests are
in flight (no evidence either way: the planner reads it as neither short nor slack).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Sequence

from .planner import PoolMetrics

_MAX_SAMPLES = 10_000          # per interval; bounded when nothing takes them (planner off)


@dataclass(frozen=True)
class IntervalSamples:
    ttft_s: tuple[float, ...]          # first tokens that arrived in the interval
    tpot_s: tuple[float, ...]          # requests (of > 1 token) that completed in the interval
    waiting_ages_s: tuple[float, ...]  # flights in the router still without a first token
    in_flight: int                     # flights in the router when the interval ended


class LatencyWindow:
    def __init__(self) -> None:
        self._ttft: deque[float] = deque(maxlen=_MAX_SAMPLES)
        self._tpot: deque[float] = deque(maxlen=_MAX_SAMPLES)

    def record_ttft(self, seconds: float) -> None:
        self._ttft.append(seconds)

    def record_tpot(self, seconds: float) -> None:
        self._tpot.append(seconds)

    def take(self, waiting_ages_s: Sequence[float] = (), in_flight: int = 0) -> IntervalSamples:
        """The samples since the last take (which are then forgotten)."""
        s = IntervalSamples(tuple(self._ttft), tuple(self._tpot), tuple(waiting_ages_s), in_flight)
        self._ttft.clear()
        self._tpot.clear()
        return s


def p90(xs: Sequence[float]) -> float:
    """Nearest-rank 90th percentile; 0.0 for no samples."""
    if not xs:
        return 0.0
    return sorted(xs)[math.ceil(0.9 * len(xs)) - 1]


def _live(snaps: Sequence[dict]) -> list[dict]:
    return [s for s in snaps if not s.get("draining")]


def pool_metrics(samples: IntervalSamples, ttft_slo_s: float, prefill: Sequence[dict],
                 decode: Sequence[dict]) -> PoolMetrics:
    """One planning interval: p90 TTFT (first tokens, plus flights already waiting past the SLO),
    p90 TPOT (completions), waiting requests summed over each pool, pool sizes. Draining workers
    are on their way out: neither their queues nor themselves count."""
    overdue = [a for a in samples.waiting_ages_s if a > ttft_slo_s]
    ttft = list(samples.ttft_s) + overdue
    p, d = _live(prefill), _live(decode)
    return PoolMetrics(ttft_p90_s=_p90_or_unknown(ttft, samples.in_flight),
                       tpot_p90_s=_p90_or_unknown(samples.tpot_s, samples.in_flight),
                       prefill_queue=sum(s["num_waiting"] for s in p),
                       decode_queue=sum(s["num_waiting"] for s in d),
                       num_prefill=len(p), num_decode=len(d))


def _p90_or_unknown(xs: Sequence[float], in_flight: int) -> float:
    return math.nan if not xs and in_flight else p90(xs)
