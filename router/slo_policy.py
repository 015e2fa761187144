"""SLO-aware placement and admission control: spend KV-transfer cost only where it buys SLO goodput.

A pure function of load snapshots (plain dicts) and a `CostModel`; no Ray, no torch. Same
`place(prompt_tokens, decode, prefill, exclude)` as router.policy, plus an optional `hint`
(the request's prefix/session info, SLO and priority) and `admit(...)`.

For a request:
1. Every usable decode worker D with KV room is a candidate. On D it would run in a batch of
   (max(running + transferring, assigned) + 1) sequences over D's KV tokens plus its prompt:
   predicted TPOT. ("assigned" is the router's live count of the flights on a worker; it
   includes those the worker's snapshot already shows, so it is not added to them.)
2. Local prefill on D: TTFT = D's pending local prefill + this prompt's uncached part on D
   (D's prefix hit `cached_prefix_tokens` counts), computed in chunks between decode steps.
3. Remote prefill: the prefill worker P minimising queue wait + prefill of its uncached part
   (P's own prefix hit), plus the transfer of the tokens D lacks at D's live bandwidth.
4. Short uncached part on D, or a large D-side hit -> local (no transfer). Otherwise the option
   with the lowest SLO-normalised cost (ttft/TTFT_slo + tpot/TPOT_slo + harm/TPOT_slo) among
   those meeting the SLO; when none meets it, the one that misses it least. `harm` is what a
   local prefill costs the requests already decoding on D: each of them waits out the prefill,
   spread over its outputs (max_new_tokens as the estimate). Without it a request that would
   reach its first token a little sooner locally stalled the whole batch for it.
Admission (`admit`): when the best option misses the SLO (scaled by the request's priority),
reject at once with a retry hint (RESOURCE_EXHAUSTED) instead of queueing a request that will miss.

Session affinity is expressed as a prefix hit: a router that remembers which D served a session's
last turn sets that D's `cached_prefix_tokens` to the turn's context length (or matches the
prompt's block hashes against each worker's cache, as the simulator does).

Snapshot keys read beyond router.policy's (all optional; defaults derived from the basic ones):
  decode:  kv_tokens, cached_prefix_tokens (this request's hit), pending_prefill_tokens,
           pending_prefill_s, transfer_bw (bytes/s, live from kvtransfer)
  prefill: queued_prefill_s, queued_prefill_tokens, cached_prefix_tokens
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from .cost_model import CostModel
from .policy import NoWorker, Placement, _usable


@dataclass(frozen=True)
class SLO:
    ttft_s: float = 2.0      # time to first token target
    tpot_s: float = 0.05     # mean time per output token target


@dataclass(frozen=True)
class RequestHint:
    """What the router knows about a request beyond its length."""
    session: str | None = None
    max_new_tokens: int = 256
    priority: int = 1                      # 0 high, 1 normal, 2 low
    slo: SLO | None = None                 # per-request override of the policy's SLO

    @classmethod
    def of(cls, hint: "RequestHint | Mapping | None") -> "RequestHint":
        if hint is None:
            return cls()
        if isinstance(hint, RequestHint):
            return hint
        known = {k: hint[k] for k in ("session", "max_new_tokens", "priority", "slo") if k in hint}
        return cls(**known)


@dataclass(frozen=True)
class SLOPolicyConfig:
    slo: SLO = field(default_factory=SLO)
    local_prefill_max_tokens: int = 512    # uncached part on D this short -> prefill on D
    local_hit_fraction: float = 0.75       # D already caches this fraction of the prompt -> local
    local_chunk_tokens: int = 512          # prefill tokens a decode worker computes per step
    admit_factor: tuple[float, ...] = (float("inf"), 1.0, 0.8)  # by priority: SLO multiple admitted
    min_retry_s: float = 0.5


@dataclass(frozen=True)
class Option:
    """One candidate placement and its predictions."""
    placement: Placement
    ttft_s: float
    tpot_s: float
    transfer_tokens: int
    harm_s: float = 0.0           # TPOT added to the requests already on D, summed (local prefill)

    def cost(self, slo: SLO) -> float:
        return self.ttft_s / slo.ttft_s + (self.tpot_s + self.harm_s) / slo.tpot_s

    def miss(self, slo: SLO) -> float:
        """How far the option is over its SLO (<= 1 means it meets both)."""
        return max(self.ttft_s / slo.ttft_s, self.tpot_s / slo.tpot_s)


@dataclass(frozen=True)
class Admission:
    accepted: bool
    placement: Placement | None
    ttft_s: float
    tpot_s: float
    retry_after_s: float = 0.0
    reason: str = ""


class SLOAwarePolicy:
    """Decode worker by KV room, batch and prefix affinity; local vs remote prefill by predicted TTFT."""

    def __init__(self, cost: CostModel, config: SLOPolicyConfig | None = None):
        self.cost = cost
        self.config = config or SLOPolicyConfig()

    # ------------------------------------------------------------------ public interface
    def place(self, prompt_tokens: int, decode: Sequence[dict], prefill: Sequence[dict],
              exclude: frozenset[str] = frozenset(), hint: RequestHint | Mapping | None = None) -> Placement:
        return self.best_option(prompt_tokens, decode, prefill, exclude, hint).placement

    def admit(self, prompt_tokens: int, decode: Sequence[dict], prefill: Sequence[dict],
              exclude: frozenset[str] = frozenset(), hint: RequestHint | Mapping | None = None) -> Admission:
        """Accept with a placement, or reject with a retry hint when no placement meets the SLO."""
        h = RequestHint.of(hint)
        slo = h.slo or self.config.slo
        factor = self.config.admit_factor[min(max(h.priority, 0), len(self.config.admit_factor) - 1)]
        try:
            opt = self.best_option(prompt_tokens, decode, prefill, exclude, h, require_room=factor != float("inf"))
        except NoWorker as e:
            return Admission(False, None, float("inf"), float("inf"), self.config.min_retry_s, str(e))
        if opt.miss(slo) <= factor:
            return Admission(True, opt.placement, opt.ttft_s, opt.tpot_s)
        over = max(opt.ttft_s - slo.ttft_s * factor, 0.0)
        return Admission(False, None, opt.ttft_s, opt.tpot_s, max(over, self.config.min_retry_s),
                         f"predicted TTFT {opt.ttft_s:.3f}s / TPOT {opt.tpot_s * 1e3:.1f}ms exceeds the SLO "
                         f"({slo.ttft_s}s / {slo.tpot_s * 1e3:.0f}ms) x {factor}")

    def best_option(self, prompt_tokens: int, decode: Sequence[dict], prefill: Sequence[dict],
                    exclude: frozenset[str] = frozenset(), hint: RequestHint | Mapping | None = None,
                    require_room: bool = False) -> Option:
        """The chosen placement with its predicted TTFT/TPOT (raises NoWorker if no decode worker)."""
        h = RequestHint.of(hint)
        slo = h.slo or self.config.slo
        ds = _usable(decode, exclude)
        if not ds:
            raise NoWorker("no decode worker is available")
        roomy = [d for d in ds if self._room(d, prompt_tokens, h) >= 0]
        if not roomy and require_room:
            raise NoWorker("no decode worker has KV room for the request")
        ds = roomy or [max(ds, key=lambda d: self._room(d, prompt_tokens, h))]
        remote = self._best_prefill(prompt_tokens, _usable(prefill, exclude))
        options = [o for d in ds for o in self._options(d, prompt_tokens, h, slo, remote)]
        ok = [o for o in options if o.miss(slo) <= 1.0]
        if ok:
            return min(ok, key=lambda o: (o.cost(slo), o.placement.decode))
        return min(options, key=lambda o: (o.miss(slo), o.placement.decode))

    # ------------------------------------------------------------------ predictions per worker
    def _room(self, d: dict, prompt_tokens: int, h: RequestHint) -> int:
        """Free KV tokens on D after this request's uncached prompt and its outputs."""
        free = d["free_blocks"] * d.get("block_size", 16)
        return free - (prompt_tokens - d.get("cached_prefix_tokens", 0)) - h.max_new_tokens

    def _kv_tokens(self, d: dict) -> float:
        if "kv_tokens" in d:
            return d["kv_tokens"]
        return (d["total_blocks"] - d["free_blocks"]) * d.get("block_size", 16)

    def _tpot(self, d: dict, prompt_tokens: int, h: RequestHint, local_tokens: int) -> float:
        """D's TPOT with this request in its batch; local prefill work is spread over its outputs."""
        # "assigned" (the router's live count of flights on D) already holds the running ones
        batch = max(d["num_running"] + d.get("num_transferring", 0), d.get("assigned", 0)) + 1
        pending = d.get("pending_prefill_tokens", 0) + local_tokens
        per_step = min(pending / max(h.max_new_tokens, 1), self.config.local_chunk_tokens)
        return self.cost.predict_tpot(batch, self._kv_tokens(d) + prompt_tokens, per_step)

    def _local_ttft(self, d: dict, prompt_tokens: int, cached: int) -> float:
        new = max(prompt_tokens - cached, 1)
        pending_tokens = d.get("pending_prefill_tokens", 0)
        pending_s = d.get("pending_prefill_s", self.cost.prefill_time(pending_tokens))
        steps = -(-(pending_tokens + new) // self.config.local_chunk_tokens)
        step = self.cost.decode_step_time(d["num_running"], self._kv_tokens(d))
        return pending_s + self.cost.prefill_time(new, prompt_tokens - new) + steps * step

    def _prefill_wait(self, p: dict, prompt_tokens: int) -> float:
        if "queued_prefill_s" in p:
            return p["queued_prefill_s"]
        if "queued_prefill_tokens" in p:
            return self.cost.prefill_time(p["queued_prefill_tokens"])
        ahead = max(p.get("assigned", 0), p["num_waiting"] + p["num_running"])
        return ahead * self.cost.prefill_time(prompt_tokens)

    def _best_prefill(self, prompt_tokens: int, ps: list[dict]) -> tuple[str, float] | None:
        """(prefill worker, its queue wait + prefill time), minimised; None if there is none."""
        best = None
        for p in ps:
            cached = min(p.get("cached_prefix_tokens", 0), prompt_tokens - 1)
            t = self._prefill_wait(p, prompt_tokens) + self.cost.prefill_time(prompt_tokens - cached, cached)
            if best is None or (t, p["name"]) < best[::-1]:
                best = (p["name"], t)
        return best

    def _options(self, d: dict, prompt_tokens: int, h: RequestHint, slo: SLO,
                 remote: tuple[str, float] | None) -> list[Option]:
        cached = min(d.get("cached_prefix_tokens", 0), prompt_tokens - 1)
        uncached = prompt_tokens - cached
        harm = d["num_running"] * self.cost.prefill_time(uncached, cached) / max(h.max_new_tokens, 1)
        local = Option(Placement(d["name"], None), self._local_ttft(d, prompt_tokens, cached),
                       self._tpot(d, prompt_tokens, h, uncached), 0, harm)
        short = uncached <= self.config.local_prefill_max_tokens
        big_hit = cached >= self.config.local_hit_fraction * prompt_tokens
        if remote is None or ((short or big_hit) and local.miss(slo) <= 1.0):
            return [local]
        name, t = remote
        ttft = t + self.cost.transfer_time(uncached, d.get("transfer_bw"))
        return [local, Option(Placement(d["name"], name), ttft, self._tpot(d, prompt_tokens, h, 0), uncached)]
