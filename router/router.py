"""The router: the only component that sees the whole cluster.

A request's life here (see docs/architecture.md):
    admit       validate sampling params, tokenize (chat template), refuse when overloaded
    place       the policy picks decode worker D, local or remote prefill, prefill worker P
    prefill     remote: D reserves blocks under a lease -> P prefills and pushes KV -> D verifies
                the lease and commits the first token. local: D prefills itself.
    stream      a pump per decode worker long-polls its token deltas into each flight's queue
    finish      complete (usage + timing breakdown) or error; metrics; the flight is dropped
Failure rules: P dies or its push fails -> D's lease gets a new epoch and another P retries
(no P left -> D prefills locally); D dies -> each of its flights migrates to another D with
prompt + tokens so far (positions dedupe the stream); no D left -> UNAVAILABLE.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from ..config import RouterConfig
from ..engine.detokenizer import IncrementalDetokenizer
from ..engine.request import SamplingParams, find_stop, validate_prompt
from ..logs import req
from .metrics import RouterMetrics
from .planner_signals import IntervalSamples, LatencyWindow
from .policy import NoWorker, Placement, Policy, _prefill_load, _usable
from .workers import WorkerDied, WorkerPool

log = logging.getLogger("splitserve.router")


class RequestError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code          # a grpc.StatusCode name


@dataclass
class Event:
    kind: str                     # "chunk" | "complete" | "error"
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Flight:
    rid: str
    prompt: list[int]
    params: dict
    events: asyncio.Queue
    arrival: float
    tokens: list[int] = field(default_factory=list)
    sent_text: str = ""
    detok: IncrementalDetokenizer | None = None   # the stream's text, a few tokens decoded per update
    stopped: bool = False         # a stop string ended the text
    base: int = 0                 # tokens generated before the current decode worker took over
    decode: str | None = None
    prefill: str | None = None
    remote: bool = False
    cached: int = 0
    t_dispatch: float | None = None
    t_first: float | None = None
    t_last: float | None = None
    prefill_s: float = 0.0
    transfer_s: float = 0.0
    overlapped_s: float = 0.0     # the prefill step the layer-wise push ran under
    reserve_s: float = 0.0        # remote: decode worker's block reservation round trip
    commit_s: float = 0.0         # remote: decode worker's commit round trip (after the first token)
    migrations: int = 0
    retries: int = 0
    priority: int = 0             # higher first (proto)
    slo: dict | None = None       # {"ttft_ms", "tpot_ms"} targets of this request, if any
    done: bool = False
    task: asyncio.Task | None = None


class Router:
    def __init__(self, config: RouterConfig, tokenizer, max_model_len: int, workers: WorkerPool,
                 policy: Policy, metrics: RouterMetrics | None = None):
        self.config = config
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.workers = workers
        self.policy = policy
        self.metrics = metrics or RouterMetrics()
        self.flights: dict[str, Flight] = {}
        self.latencies = LatencyWindow()     # the planner's samples (router/planner_signals.py)
        self._ids = itertools.count(1)
        workers.on_decode_output = self._on_output
        workers.on_decode_died = self._on_decode_died
        workers.assigned = self.assigned_to

    def assigned_to(self, worker: str) -> int:
        """Unfinished flights that still need `worker`: decoding there, or prefilling there (no
        first token yet). A drained worker is removed only when this is 0."""
        return sum(1 for f in self.flights.values() if not f.done and
                   (f.decode == worker or (f.prefill == worker and f.t_first is None)))

    def take_interval(self) -> IntervalSamples:
        """The latency samples since the last call, and the ages of flights with no first token."""
        now = time.monotonic()
        waiting = [now - f.arrival for f in self.flights.values() if not f.done and f.t_first is None]
        return self.latencies.take(waiting, len(self.flights))

    # ------------------------------------------------------------ admission
    def admit(self, prompt: str | None, token_ids: list[int] | None, messages: list[dict] | None,
              params: dict, request_id: str | None = None, priority: int = 0,
              slo: dict | None = None) -> Flight:
        try:
            sp = SamplingParams(**params)
            if messages:
                prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            ids = list(token_ids) if token_ids else self.tokenizer.encode(prompt or "")
            validate_prompt(ids, self.tokenizer.vocab_size, self.max_model_len)
        except (ValueError, TypeError) as exc:
            raise RequestError("INVALID_ARGUMENT", str(exc)) from exc
        if len(self.flights) >= self.config.max_queued_requests:
            raise RequestError("RESOURCE_EXHAUSTED", f"{len(self.flights)} requests in flight; retry later")
        if not self.workers.decode_names():
            raise RequestError("UNAVAILABLE", "no decode worker is available")
        rid = request_id or f"{next(self._ids)}"
        if rid in self.flights:
            raise RequestError("INVALID_ARGUMENT", f"request id {rid} is already in flight")
        params = {**params, "stop": tuple(sp.stop), "stop_token_ids": tuple(sp.stop_token_ids)}
        f = Flight(rid, ids, params, asyncio.Queue(), time.monotonic(), priority=priority, slo=slo)
        self.flights[rid] = f
        self.metrics.in_flight.set(len(self.flights))
        return f

    async def generate(self, flight: Flight) -> AsyncIterator[Event]:
        """Run an admitted flight and yield its events; cancelling the iterator aborts it."""
        flight.task = asyncio.create_task(self._dispatch(flight))
        try:
            while True:
                ev = await asyncio.wait_for(flight.events.get(), self.config.request_timeout_s)
                yield ev
                if ev.kind != "chunk":
                    return
        except (asyncio.CancelledError, asyncio.TimeoutError, GeneratorExit):
            await self.abort(flight.rid)
            raise
        finally:
            self.flights.pop(flight.rid, None)
            self.metrics.in_flight.set(len(self.flights))

    async def abort(self, rid: str) -> bool:
        f = self.flights.get(rid)
        if f is None or f.done:
            return False
        if f.task and not f.task.done():
            f.task.cancel()
        for name in {f.decode, f.prefill} - {None}:
            await self.workers.try_call(name, "abort", rid)
        self._complete(f, "abort")          # ends the client's stream (if it is still listening)
        log.info("aborted", extra=req(rid))
        return True

    # ------------------------------------------------------------ placement and prefill
    async def _dispatch(self, f: Flight, exclude: frozenset[str] = frozenset()) -> None:
        try:
            place = self._place(f, exclude)
            f.decode, f.prefill, f.t_dispatch = place.decode, place.prefill, time.monotonic()
            if place.remote:
                await self._remote_prefill(f, place)
            else:
                await self.workers.call(place.decode, "generate_local", f.rid, f.prompt, f.params)
        except NoWorker as exc:
            self._fail(f, "UNAVAILABLE", str(exc))
        except WorkerDied as exc:
            if exc.name == f.decode:
                await self._migrate(f)
            else:
                self._fail(f, "UNAVAILABLE", str(exc))
        except RequestError as exc:
            self._fail(f, exc.code, str(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:   # a worker raised: report it to the client, keep the router up
            log.exception("request failed", extra=req(f.rid))
            self._fail(f, "INTERNAL", f"{type(exc).__name__}: {exc}")

    async def _remote_prefill(self, f: Flight, place: Placement) -> None:
        d = place.decode
        early = None        # the first attempt's prefill, started before D's reservation is back
        if self.config.overlap_reserve:
            f.prefill, f.remote = place.prefill, True
            early = asyncio.ensure_future(self._call_prefill(place.prefill, f, None, 0))
        t0 = time.monotonic()
        try:
            res = await self.workers.call(d, "start_remote", f.rid, f.prompt, f.params)
        except BaseException:
            if early is not None:
                f.remote = False
                await self._call_off(place.prefill, f, early)
            raise
        f.reserve_s = time.monotonic() - t0
        if res is None:     # no KV room on D right now: let D queue it and prefill itself
            if early is not None:
                await self._call_off(place.prefill, f, early)
            f.prefill, f.remote = None, False
            await self.workers.call(d, "generate_local", f.rid, f.prompt, f.params)
            return
        handoff, lease = res["handoff"], res["handoff"]["lease_id"]
        f.remote, f.cached = True, res["num_cached_tokens"]
        tried: set[str] = set()
        p: str | None = place.prefill
        while True:
            f.prefill = p
            tried.add(p)
            if early is not None:   # P's prefill succeeds only if it takes the handoff; if it
                # failed first, the attach finds nothing there (so it is not awaited)
                asyncio.ensure_future(self.workers.try_call(p, "attach", f.rid, handoff, res["first_block"]))
                out, early = await early, None
            else:
                out = await self._call_prefill(p, f, handoff, res["first_block"])
            if out["ok"]:
                break
            self.metrics.transfer_failures.inc()
            p = self._another_prefill(f, tried)
            if p is None:      # give up on remote prefill: D recomputes the prompt itself
                await self.workers.call(d, "cancel_remote", f.rid, lease)
                f.remote, f.prefill = False, None
                await self.workers.call(d, "generate_local", f.rid, f.prompt, f.params)
                return
            log.warning("remote prefill failed (%s); retrying on %s", out["reason"], p, extra=req(f.rid, worker=p))
            f.retries += 1
            self.metrics.prefill_retries.inc()
            handoff = await self.workers.call(d, "reissue", f.rid, lease)
        f.prefill_s, f.transfer_s, f.overlapped_s = out["prefill_s"], out["transfer_s"], out.get("step_s", 0.0)
        self.metrics.transfer_latency.observe(out["transfer_s"])
        # The prefill computed the first token and D has verified the KV (the push succeeded only
        # on D's ack), so the token goes out now; D's commit round trip lands in the second token.
        # A stop string on it aborts on D, which may arrive before the commit (D then drops it).
        self._add_tokens(f, 0, [out["first_token"]])
        t0 = time.monotonic()
        if not await self.workers.call(d, "commit_remote", f.rid, lease, out["first_token"]):
            raise RequestError("INTERNAL", "the decode worker rejected the transferred KV")
        f.commit_s = time.monotonic() - t0

    async def _call_prefill(self, p: str, f: Flight, handoff: dict | None, first_block: int) -> dict:
        try:
            return await self.workers.call(p, "prefill", f.rid, f.prompt, f.params, handoff, first_block)
        except WorkerDied:
            return {"ok": False, "reason": f"prefill worker {p} died"}

    async def _call_off(self, p: str, f: Flight, early: asyncio.Future) -> None:
        """A prefill started ahead of its reservation is not needed after all: abort it on P."""
        await self.workers.try_call(p, "abort", f.rid)
        try:
            await early
        except Exception:            # its outcome no longer matters
            pass

    def _place(self, f: Flight, exclude: frozenset[str]) -> Placement:
        """Placement by the policy; a policy with admission control may refuse the request."""
        args = (len(f.prompt), self._snapshots("decode"), self._snapshots("prefill"), exclude | self.workers.dead)
        admit = getattr(self.policy, "admit", None)
        if admit is None:
            return self.policy.place(*args)
        from .slo_policy import SLO
        hint = {"max_new_tokens": f.params.get("max_tokens", 64),
                "priority": 0 if f.priority > 0 else (1 if f.priority == 0 else 2)}
        if f.slo and f.slo.get("ttft_ms") and f.slo.get("tpot_ms"):
            hint["slo"] = SLO(f.slo["ttft_ms"] / 1e3, f.slo["tpot_ms"] / 1e3)
        if not [s for s in args[1] if not s.get("draining") and s["name"] not in args[3]]:
            raise NoWorker("no decode worker is available")
        adm = admit(*args, hint=hint)
        if not adm.accepted:
            raise RequestError("RESOURCE_EXHAUSTED", f"{adm.reason}; retry after {adm.retry_after_s:.2f}s")
        return adm.placement

    def _snapshots(self, role: str) -> list[dict]:
        """Worker snapshots plus the router's live count of flights assigned to each worker: on a
        decode worker every unfinished flight placed there, on a prefill worker those whose
        prefill has not ended (no first token yet; a remote flight keeps its prefill worker's name
        while it decodes elsewhere)."""
        key = "decode" if role == "decode" else "prefill"
        counts: dict[str, int] = {}
        for f in self.flights.values():
            name = getattr(f, key)
            if name and not f.done and (role == "decode" or (f.remote and f.t_first is None)):
                counts[name] = counts.get(name, 0) + 1
        return [{**s, "assigned": counts.get(s["name"], 0)} for s in self.workers.snapshots(role)]

    def _another_prefill(self, f: Flight, tried: set[str]) -> str | None:
        if f.retries >= self.config.prefill_retries:
            return None
        alive = _usable(self._snapshots("prefill"), frozenset(tried) | self.workers.dead)
        return min(alive, key=_prefill_load)["name"] if alive else None

    # ------------------------------------------------------------ streaming
    def _on_output(self, worker: str, rec: dict) -> None:
        f = self.flights.get(rec["request_id"])
        if f is None or f.done or f.decode != worker:
            return
        f.cached = max(f.cached, rec["num_cached_tokens"]) if not f.migrations else f.cached
        self._add_tokens(f, f.base + rec["offset"], rec["new_token_ids"])
        if rec["finished"] and not f.done:
            self._complete(f, rec["finish_reason"])

    def _add_tokens(self, f: Flight, position: int, ids: list[int]) -> None:
        """Append the tokens at `position` that the stream has not carried yet (dedupe by position)."""
        fresh = ids[max(0, len(f.tokens) - position):]
        if not fresh or f.done:
            return
        now = time.monotonic()
        if f.t_first is None:
            f.t_first = now
            self.metrics.ttft.observe(now - f.arrival)
            self.latencies.record_ttft(now - f.arrival)
        elif f.t_last is not None:
            self.metrics.itl.observe(now - f.t_last)
        f.t_last = now
        f.tokens.extend(fresh)
        if f.detok is None:
            f.detok = IncrementalDetokenizer(self.tokenizer)
        text = f.detok.append(fresh)      # an incomplete UTF-8 tail is held back
        stop_at = find_stop(text, f.params.get("stop", ()), len(f.sent_text))
        if stop_at is not None:
            text, f.stopped = text[:stop_at], True
        delta, f.sent_text = text[len(f.sent_text):], text
        f.events.put_nowait(Event("chunk", fresh, delta))
        if stop_at is not None:
            asyncio.ensure_future(self.workers.try_call(f.decode, "abort", f.rid))
            self._complete(f, "stop")

    def _complete(self, f: Flight, reason: str) -> None:
        if f.done:
            return
        if f.detok is not None and not f.stopped and reason != "abort":   # the held-back tail
            tail = f.detok.final_text().rstrip("\ufffd")[len(f.sent_text):]
            if tail:
                f.sent_text += tail
                f.events.put_nowait(Event("chunk", [], tail))
        f.done = True
        now = time.monotonic()
        t_first = f.t_first or now
        n = len(f.tokens)
        timing = {"queue_ms": ((f.t_dispatch or now) - f.arrival) * 1e3, "prefill_ms": f.prefill_s * 1e3,
                  "transfer_ms": f.transfer_s * 1e3, "overlapped_ms": f.overlapped_s * 1e3,
                  "reserve_ms": f.reserve_s * 1e3, "commit_ms": f.commit_s * 1e3,
                  "decode_ms": (now - t_first) * 1e3,
                  "ttft_ms": (t_first - f.arrival) * 1e3, "e2e_ms": (now - f.arrival) * 1e3}
        if not f.remote:
            timing["prefill_ms"] = max(0.0, (t_first - (f.t_dispatch or f.arrival)) * 1e3)
        if n > 1:
            self.metrics.tpot.observe((now - t_first) / (n - 1))
            self.latencies.record_tpot((now - t_first) / (n - 1))
        self.metrics.e2e.observe(now - f.arrival)
        self.metrics.requests.labels(reason).inc()
        f.events.put_nowait(Event("complete", info={
            "finish_reason": reason, "token_ids": list(f.tokens), "text": f.sent_text,
            "usage": {"prompt_tokens": len(f.prompt), "completion_tokens": n, "cached_prompt_tokens": f.cached},
            "timing": timing, "prefill_worker": f.prefill or f.decode or "", "decode_worker": f.decode or "",
            "remote_prefill": f.remote, "migrations": f.migrations, "prefill_retries": f.retries}))

    def _fail(self, f: Flight, code: str, message: str) -> None:
        if f.done:
            return
        f.done = True
        self.metrics.requests.labels("error").inc()
        f.events.put_nowait(Event("error", info={"code": code, "message": message}))

    # ------------------------------------------------------------ decode failover
    def _on_decode_died(self, worker: str) -> None:
        for f in list(self.flights.values()):
            if f.decode == worker and not f.done:
                if f.task and not f.task.done():
                    f.task.cancel()
                f.task = asyncio.ensure_future(self._migrate(f))

    async def _migrate(self, f: Flight) -> None:
        """Continue on another decode worker: re-prefill prompt + tokens so far there."""
        dead = f.decode
        f.migrations += 1
        self.metrics.migrations.inc()
        remaining = f.params.get("max_tokens", 64) - len(f.tokens)
        if remaining <= 0:
            self._complete(f, "length")
            return
        log.warning("decode worker %s died; migrating with %d tokens so far", dead, len(f.tokens),
                    extra=req(f.rid, worker=dead))
        f.base = len(f.tokens)
        prompt = f.prompt + f.tokens
        params = {**f.params, "max_tokens": remaining}
        try:
            place = self.policy.place(len(prompt), self._snapshots("decode"), [],
                                      frozenset({dead}) | self.workers.dead)
            f.decode = place.decode
            await self.workers.call(place.decode, "generate_local", f.rid, prompt, params)
        except NoWorker:
            self._fail(f, "UNAVAILABLE", f"decode worker {dead} died and no other decode worker is available")
        except WorkerDied as exc:
            await self._migrate(f) if exc.name == f.decode else self._fail(f, "UNAVAILABLE", str(exc))
