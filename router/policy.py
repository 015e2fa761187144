"""Placement policy: which decode worker, local or remote prefill, which prefill worker.

A pure function of load snapshots (plain dicts from WorkerRuntime.snapshot), no Ray, no torch.
The SLO-aware scheduler replaces `LoadAwarePolicy` behind the same `place()`.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Protocol, Sequence


@dataclass(frozen=True)
class Placement:
    decode: str
    prefill: str | None          # None = prefill locally on the decode worker

    @property
    def remote(self) -> bool:
        return self.prefill is not None


class NoWorker(Exception):
    """No worker of a needed role can take the request."""


class Policy(Protocol):
    def place(self, prompt_tokens: int, decode: Sequence[dict], prefill: Sequence[dict],
              exclude: frozenset[str] = frozenset()) -> Placement: ...


def _usable(snaps: Sequence[dict], exclude: frozenset[str]) -> list[dict]:
    return [s for s in snaps if not s.get("draining") and s["name"] not in exclude]


def _decode_load(s: dict) -> tuple:
    # "assigned" is the router's own live count of requests placed on the worker (snapshots lag
    # by up to one health interval, so a burst would otherwise all land on one worker); then the
    # worker's queue, then the most free KV.
    used = 1.0 - s["free_blocks"] / max(s["total_blocks"], 1)
    return (s.get("assigned", 0) + s["num_waiting"], round(used, 2), s["name"])


def _prefill_load(s: dict) -> tuple:
    return (s.get("assigned", 0), s["num_waiting"] + s["num_running"], s["name"])


class LoadAwarePolicy:
    """Least-loaded decode worker; short prompts prefill locally; least-loaded prefill worker."""

    def __init__(self, local_prefill_max_tokens: int):
        self.local_prefill_max_tokens = local_prefill_max_tokens

    def place(self, prompt_tokens: int, decode: Sequence[dict], prefill: Sequence[dict],
              exclude: frozenset[str] = frozenset()) -> Placement:
        ds = _usable(decode, exclude)
        if not ds:
            raise NoWorker("no decode worker is available")
        d = min(ds, key=_decode_load)
        ps = _usable(prefill, exclude)
        if prompt_tokens <= self.local_prefill_max_tokens or not ps:
            return Placement(d["name"], None)
        return Placement(d["name"], min(ps, key=_prefill_load)["name"])


class RoundRobinPolicy:
    """Baseline: rotate over decode workers and prefill workers, always disaggregate."""

    def __init__(self) -> None:
        self._d = itertools.count()
        self._p = itertools.count()

    def place(self, prompt_tokens: int, decode: Sequence[dict], prefill: Sequence[dict],
              exclude: frozenset[str] = frozenset()) -> Placement:
        ds = sorted(_usable(decode, exclude), key=lambda s: s["name"])
        if not ds:
            raise NoWorker("no decode worker is available")
        ps = sorted(_usable(prefill, exclude), key=lambda s: s["name"])
        p = ps[next(self._p) % len(ps)]["name"] if ps else None
        return Placement(ds[next(self._d) % len(ds)]["name"], p)


class ColocatedPolicy:
    """Baseline: every request prefills and decodes on one (least-loaded) decode worker."""

    def place(self, prompt_tokens: int, decode: Sequence[dict], prefill: Sequence[dict],
              exclude: frozenset[str] = frozenset()) -> Placement:
        return LoadAwarePolicy(1 << 62).place(prompt_tokens, decode, prefill, exclude)


def build_policy(name: str, config) -> Policy:
    """The named policy from a RouterConfig (slo_aware loads its cost-model profile)."""
    if name == "load_aware":
        return LoadAwarePolicy(config.local_prefill_max_tokens)
    if name == "round_robin":
        return RoundRobinPolicy()
    if name == "colocated":
        return ColocatedPolicy()
    if name == "slo_aware":
        from .cost_model import load_profile
        from .slo_policy import SLO, SLOAwarePolicy, SLOPolicyConfig
        slo = SLO(ttft_s=config.slo_ttft_ms / 1e3, tpot_s=config.slo_tpot_ms / 1e3)
        return SLOAwarePolicy(load_profile(config.cost_profile),
                              SLOPolicyConfig(slo=slo, local_prefill_max_tokens=config.local_prefill_max_tokens))
    raise ValueError(f"unknown policy {name!r}; use load_aware, slo_aware, round_robin or colocated")
