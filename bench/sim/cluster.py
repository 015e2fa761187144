"""The event loop: arrivals -> policy (the router's own classes) -> simulated workers -> results.

The policy sees fresh snapshots built from the simulated workers (the same keys WorkerRuntime
reports, plus the optional SLO keys of router.slo_policy); each request's prefix hit on every
worker comes from the cluster-wide PrefixIndex. A policy with `admit()` may reject a request:
it then counts as an SLO miss (goodput counts requests served within SLO, not requests refused).
"""
from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass
from typing import Callable

from splitserve.router.cost_model import CostModel
from splitserve.router.slo_policy import SLO, RequestHint

from ..workloads import Request
from .cache import PrefixIndex
from .workers import DecodeWorkerSim, Flight, PrefillWorkerSim


@dataclass(frozen=True)
class ClusterSpec:
    num_prefill: int
    num_decode: int
    local_chunk_tokens: int = 512          # prefill tokens a decode worker computes per step
    transfer_bw: float | None = None       # override of the profile's transfer bandwidth (B/s)
    max_new_tokens: int | None = 512       # the policy's hint (a client's max_tokens); None = true output (oracle)
    engine_lock: bool = False              # remote start/commit wait for D's step in progress (the real engine loop)
    push_waits_forward: bool = False       # P's push waits for P's next forward (when the lock race is lost)
    overlap_reserve: bool = False          # P starts while D reserves (router.overlap_reserve; with engine_lock)
    # CPU sharing (workers sharing cores, as the 2-core dev VM): a step or forward started while no
    # other worker is busy runs at `solo_cost`'s speed, else at the main cost model's (measured with
    # the neighbours busy). None: every step at the main model's speed (dedicated accelerators).
    solo_cost: CostModel | None = None
    # seats of a decode worker's batch (the engine's max_num_seqs): a local prefill starts only on a
    # free seat; running and prefilling requests hold one. None: unlimited (KV is the only bound).
    max_seqs: int | None = None


@dataclass(frozen=True)
class RequestResult:
    rid: int
    ttft_s: float
    tpot_s: float
    rejected: bool
    remote: bool
    cached_tokens: int
    prompt_tokens: int

    def meets(self, slo: SLO) -> bool:
        return not self.rejected and self.ttft_s <= slo.ttft_s and self.tpot_s <= slo.tpot_s


@dataclass(frozen=True)
class SimResult:
    requests: tuple[RequestResult, ...]
    makespan_s: float
    prefill_busy: float                    # mean busy fraction of prefill workers
    decode_busy: float

    def attainment(self, slo: SLO) -> float:
        return sum(r.meets(slo) for r in self.requests) / max(len(self.requests), 1)

    def summary(self, slo: SLO) -> dict:
        served = [r for r in self.requests if not r.rejected]
        ttft = sorted(r.ttft_s for r in served)
        tpot = sorted(r.tpot_s for r in served)
        prompt = sum(r.prompt_tokens for r in served)
        return {"requests": len(self.requests), "rejected": len(self.requests) - len(served),
                "attainment": round(self.attainment(slo), 4),
                "ttft_p50": _pct(ttft, 50), "ttft_p90": _pct(ttft, 90),
                "tpot_p50": _pct(tpot, 50), "tpot_p90": _pct(tpot, 90),
                "remote_frac": round(sum(r.remote for r in served) / max(len(served), 1), 3),
                "prefix_hit": round(sum(r.cached_tokens for r in served) / max(prompt, 1), 3),
                "prefill_busy": round(self.prefill_busy, 3), "decode_busy": round(self.decode_busy, 3)}


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return math.nan
    return round(xs[min(int(len(xs) * q / 100), len(xs) - 1)], 4)


class Simulator:
    """Simulates one cluster under one policy. `run()` once per instance."""

    def __init__(self, spec: ClusterSpec, cost: CostModel, policy, max_events: int = 50_000_000):
        self.spec, self.cost, self.policy = spec, cost, policy
        self.index = PrefixIndex()
        self.prefill_workers = {f"p{i:03d}": PrefillWorkerSim(f"p{i:03d}", cost, self.index, self, spec.push_waits_forward)
                                for i in range(spec.num_prefill)}
        self.decode_workers = {f"d{i:03d}": DecodeWorkerSim(f"d{i:03d}", cost, self.index, self,
                                                            spec.local_chunk_tokens, spec.transfer_bw,
                                                            spec.engine_lock, spec.max_seqs, spec.overlap_reserve)
                               for i in range(spec.num_decode)}
        self._events: list = []
        self._seq = itertools.count()
        self.now = 0.0
        self.done: list[Flight] = []
        self.max_events = max_events
        if not self.decode_workers:
            raise ValueError("a cluster needs at least one decode worker")

    def step_cost(self, me) -> CostModel:
        """The cost model timing a step `me` starts now (see ClusterSpec.solo_cost)."""
        if self.spec.solo_cost is None:
            return self.cost
        others = itertools.chain(self.prefill_workers.values(), self.decode_workers.values())
        return self.cost if any(w.busy for w in others if w is not me) else self.spec.solo_cost

    def at(self, t: float, fn: Callable, *args) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn, args))

    def on_done(self, f: Flight, now: float) -> None:
        self.done.append(f)

    # ---------------------------------------------------------------- arrivals and placement
    def _snapshots(self, req: Request) -> tuple[list[dict], list[dict]]:
        hits = self.index.match(req.hash_ids)
        ds = [w.snapshot(hits.get(n, 0), req.prompt_tokens) for n, w in self.decode_workers.items()]
        ps = [w.snapshot(hits.get(n, 0), req.prompt_tokens, self.now) for n, w in self.prefill_workers.items()]
        return ds, ps

    def _arrive(self, now: float, req: Request) -> None:
        f = Flight(req, seq=req.rid)
        ds, ps = self._snapshots(req)
        hint = RequestHint(session=None if req.session is None else str(req.session),
                           max_new_tokens=self.spec.max_new_tokens or req.output_tokens, priority=req.priority)
        if hasattr(self.policy, "admit"):
            adm = self.policy.admit(req.prompt_tokens, ds, ps, hint=hint)
            if not adm.accepted:
                f.rejected, f.retry_after_s, f.t_done = True, adm.retry_after_s, now
                self.done.append(f)
                return
            place = adm.placement
        else:
            place = self.policy.place(req.prompt_tokens, ds, ps)
        f.decode, f.prefill = place.decode, place.prefill
        self.decode_workers[f.decode].admit(f, now)

    # ---------------------------------------------------------------- the loop
    def run(self, requests: list[Request]) -> SimResult:
        for r in requests:
            self.at(r.arrival_s, self._arrive, r)
        n = 0
        while self._events:
            t, _, fn, args = heapq.heappop(self._events)
            self.now = t
            fn(t, *args)
            n += 1
            if n > self.max_events:
                raise RuntimeError(f"simulation exceeded {self.max_events} events")
        return self._result(requests)

    def _result(self, requests: list[Request]) -> SimResult:
        if len(self.done) != len(requests):
            raise AssertionError(f"conservation: {len(requests)} requests in, {len(self.done)} out")
        out = []
        for f in sorted(self.done, key=lambda f: f.req.rid):
            r = f.req
            tpot = (f.t_done - f.t_first) / (r.output_tokens - 1) if r.output_tokens > 1 and not f.rejected else 0.0
            out.append(RequestResult(r.rid, (f.t_first - r.arrival_s) if not f.rejected else math.inf, tpot,
                                     f.rejected, f.prefill is not None, max(f.cached_d, f.cached_p) if
                                     f.prefill else f.cached_d, r.prompt_tokens))
        span = max(self.now, 1e-9)
        pb = [w.busy_s / span for w in self.prefill_workers.values()]
        db = [w.busy_s / span for w in self.decode_workers.values()]
        return SimResult(tuple(out), self.now, sum(pb) / max(len(pb), 1), sum(db) / max(len(db), 1))
