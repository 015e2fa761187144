"""The planner wired to the cluster: every `planner.interval_s`, gather -> observe -> carry out.

    gather     the router's latency samples of the interval (Router.take_interval) and the
               workers' snapshots -> PoolMetrics (router/planner_signals.pool_metrics, pure)
    observe    Planner.observe -> Decision (router/planner.py: hysteresis, bounds)
    carry out  scaling_steps(decision, ...) -> Steps (pure: bounds re-checked against the live
               pools, victim = least-loaded worker), then ServingCluster.add_worker / remove_worker.
               A move adds to the short pool first and only then drains a worker of the other,
               so capacity never dips; a removal drains (WorkerPool.remove: no request is lost).

One step at a time: the loop waits for a step's Ray calls (a drain may take a while) before the
next interval starts, and the samples gathered while the pools changed are dropped. The cluster
is duck-typed (`router`, `pool`, `add_worker`, `remove_worker`) so tests drive it without Ray.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import NamedTuple, Sequence

from ..config import PlannerConfig
from ..router.metrics import RouterMetrics
from ..router.planner import Action, Decision, Planner
from ..router.planner_signals import pool_metrics
from ..router.slo_policy import SLO

log = logging.getLogger("splitserve.planner")

# action -> (pool to add to, pool to remove from)
_EFFECT: dict[Action, tuple[str | None, str | None]] = {
    Action.ADD_PREFILL: ("prefill", None), Action.ADD_DECODE: ("decode", None),
    Action.REMOVE_PREFILL: (None, "prefill"), Action.REMOVE_DECODE: (None, "decode"),
    Action.DECODE_TO_PREFILL: ("prefill", "decode"), Action.PREFILL_TO_DECODE: ("decode", "prefill"),
}


class Steps(NamedTuple):
    add: str | None            # role to add a worker to
    remove: str | None         # name of the worker to drain and remove (after the add)
    skipped: str = ""          # why nothing is done although the decision asked for something


def _load(s: dict) -> int:
    return s["num_running"] + s["num_waiting"] + s["num_transferring"]


def scaling_steps(d: Decision, config: PlannerConfig, prefill: Sequence[dict], decode: Sequence[dict]) -> Steps:
    """What to ask Ray for, with the bounds checked again against the live (non-draining) pools."""
    add, remove_from = _EFFECT.get(d.action, (None, None))
    live = {"prefill": [s for s in prefill if not s.get("draining")],
            "decode": [s for s in decode if not s.get("draining")]}
    bounds = {"prefill": (config.min_prefill, config.max_prefill), "decode": (config.min_decode, config.max_decode)}
    if add is not None and len(live[add]) >= bounds[add][1]:
        return Steps(None, None, f"{add} pool at its maximum {bounds[add][1]}")
    if remove_from is not None and len(live[remove_from]) <= bounds[remove_from][0]:
        return Steps(None, None, f"{remove_from} pool at its minimum {bounds[remove_from][0]}")
    victim = None
    if remove_from is not None:     # the least-loaded worker drains fastest; the newest on a tie
        victim = min(reversed(live[remove_from]), key=_load)["name"]
    return Steps(add, victim)


class Autoscaler:
    def __init__(self, cluster, config: PlannerConfig, slo: SLO, metrics: RouterMetrics):
        self.cluster = cluster
        self.config = config
        self.slo = slo
        self.planner = Planner(config, slo)
        self.metrics = metrics
        self.history: deque[tuple[Decision, str]] = deque(maxlen=100)   # (decision, outcome), NONE left out
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:       # the loop outlives one bad interval
                log.exception("planner step failed")

    async def step(self) -> Decision:
        """One interval: gather, observe, carry out. Returns the planner's decision."""
        pool = self.cluster.pool
        m = pool_metrics(self.cluster.router.take_interval(), self.slo.ttft_s,
                         pool.snapshots("prefill"), pool.snapshots("decode"))
        for key in ("ttft_p90_s", "tpot_p90_s", "prefill_queue", "decode_queue"):
            self.metrics.planner_signal.labels(key).set(getattr(m, key))
        d = self.planner.observe(m)
        self.metrics.planner_target.labels("prefill").set(d.num_prefill)
        self.metrics.planner_target.labels("decode").set(d.num_decode)
        if d.action is Action.NONE:
            self.metrics.planner_decisions.labels(d.action.value, "hold").inc()
            log.debug("planner holds (%s): %s", d.reason, m)
            return d
        log.info("planner: %s (%s) -> %dP+%dD; seen %s", d.action.value, d.reason, d.num_prefill, d.num_decode, m)
        outcome = await self.carry_out(d)
        self.metrics.planner_decisions.labels(d.action.value, outcome).inc()
        self.history.append((d, outcome))
        self.cluster.router.take_interval()     # samples taken while the pools changed: dropped
        return d

    async def carry_out(self, d: Decision) -> str:
        """Add, then drain and remove; returns the outcome: done, skipped or failed."""
        pool = self.cluster.pool
        steps = scaling_steps(d, self.config, pool.snapshots("prefill"), pool.snapshots("decode"))
        if steps.add is None and steps.remove is None:
            log.warning("planner: %s skipped: %s", d.action.value, steps.skipped)
            return "skipped"
        try:
            if steps.add is not None:
                name = await self.cluster.add_worker(steps.add)
                log.info("planner: %s worker %s joined", steps.add, name)
            if steps.remove is not None:
                await self.cluster.remove_worker(steps.remove)
                log.info("planner: worker %s drained and removed", steps.remove)
        except Exception as exc:    # e.g. Ray has no room for another worker: the pools stay as they are
            log.error("planner: %s failed: %r", d.action.value, exc)
            return "failed"
        return "done"
