"""Simulated prefill and decode workers, timed by router.cost_model.

Decode worker life cycle (one request):
  PreallocQueue (no KV room yet) -> [local: LocalPrefillQueue, computed in chunks between decode
  steps | remote: Transferring, while a prefill worker computes and pushes its KV] -> RunningBatch
  -> finished (its prompt blocks stay in the worker's prefix cache, LRU, in the free KV).
Continuous batching: one step decodes every running sequence plus up to `chunk_tokens` of local
prefill; requests join and leave at step boundaries. Finishing is tracked by step index in a heap,
so a step costs O(1) plus the requests that finish in it.

Prefill worker: a priority-then-FIFO queue; each forward packs up to the profile's
`prefill_chunk_tokens` new tokens (long prompts are chunked over several forwards); a prompt's
leading cached blocks are skipped. When a prompt is done its KV goes to the decode worker over
that worker's inbound link (FIFO).
"""
from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field

from splitserve.router.cost_model import CostModel

from ..workloads import BLOCK_TOKENS, Request
from .cache import PrefixCache, PrefixIndex

SNAP_BLOCK = 16  # block size the snapshots report KV in (the engine's default)


@dataclass(eq=False)
class Flight:
    """A request's simulated state."""
    req: Request
    decode: str = ""
    prefill: str | None = None
    cached_d: int = 0            # prompt tokens the decode worker already held
    cached_p: int = 0            # prompt tokens the prefill worker already held
    remaining: int = 0           # prompt tokens still to compute
    est_s: float = 0.0           # predicted prefill time when queued
    finish_step: int = 0
    t_first: float = math.nan
    t_done: float = math.nan
    rejected: bool = False
    seated: bool = False         # holds one of the decode worker's batch seats (local prefill started)
    retry_after_s: float = 0.0
    reserved: bool = True        # D's blocks are reserved (overlap_reserve: P may start before)
    push_waiting: bool = False   # P finished before the reservation: the push starts with it
    seq: int = field(default=0)


def cached_tokens(blocks: int, prompt_tokens: int) -> int:
    """Prompt tokens covered by `blocks` leading cached blocks (the last token is always computed)."""
    return min(blocks * BLOCK_TOKENS, prompt_tokens - 1)


class DecodeWorkerSim:
    def __init__(self, name: str, cost: CostModel, index: PrefixIndex, sim, chunk_tokens: int,
                 transfer_bw: float | None = None, engine_lock: bool = False, max_seqs: int | None = None,
                 overlap_reserve: bool = False):
        self.name, self.cost, self.sim, self.chunk_tokens = name, cost, sim, chunk_tokens
        self.max_seqs = max_seqs
        self.seated = 0                        # local prefills holding a batch seat
        # engine_lock: the real worker runs RPCs on its engine loop between steps (engine/loop.py),
        # so start_remote (before P may start) waits for the step in progress, and a commit joins
        # the batch at the next step boundary; the first token goes out when the KV has landed
        # (the router streams the prefill's token before the commit); without it the start
        # happens at once (the original, optimistic model)
        self.engine_lock = engine_lock
        # overlap_reserve (router.overlap_reserve): P starts at once and only the push waits for
        # the reservation; else P starts once D has reserved
        self.overlap_reserve = overlap_reserve
        self.deferred: list[Flight] = []       # remote starts waiting for the lock
        self.reserving: list[Flight] = []      # overlap_reserve: P already started, D not reserved yet
        self.capacity = cost.kv_capacity_tokens
        self.cache = PrefixCache(name, index, self.capacity // BLOCK_TOKENS)
        self.transfer_bw = transfer_bw
        self.used = 0                          # KV tokens reserved by admitted requests
        self.prealloc: deque[Flight] = deque()
        self.local: deque[Flight] = deque()
        self.pending_tokens = 0                # local prefill tokens not yet computed
        self.joining: list[Flight] = []
        self.finish_heap: list[tuple[int, int, Flight]] = []
        self.n_running = self.n_transferring = 0
        self.kv_sum = 0                        # context tokens of the running batch
        self.step_idx = 0
        self.busy = False
        self.link_free_at = 0.0
        self.steps = self.busy_s = 0.0

    # ---------------------------------------------------------------- snapshot
    def snapshot(self, hit_blocks: int, prompt_tokens: int) -> dict:
        waiting_demand = sum(f.req.prompt_tokens + f.req.output_tokens for f in self.prealloc)
        free = max(self.capacity - self.used - waiting_demand, 0)
        return {"name": self.name, "role": "decode", "num_running": self.n_running,
                "num_waiting": len(self.local) + len(self.prealloc), "num_transferring": self.n_transferring,
                "free_blocks": free // SNAP_BLOCK, "total_blocks": self.capacity // SNAP_BLOCK,
                "block_size": SNAP_BLOCK, "draining": False, "assigned": 0, "kv_tokens": self.kv_sum,
                "pending_prefill_tokens": self.pending_tokens,
                "cached_prefix_tokens": cached_tokens(hit_blocks, prompt_tokens) if hit_blocks else 0,
                **({"transfer_bw": self.transfer_bw} if self.transfer_bw else {})}

    # ---------------------------------------------------------------- admission -> reservation
    def admit(self, f: Flight, now: float) -> None:
        if self.prealloc or not self._reserve(f):
            self.prealloc.append(f)
            return
        self._start(f, now)

    def _reserve(self, f: Flight) -> bool:
        need = f.req.prompt_tokens + f.req.output_tokens
        if self.used + need > self.capacity and self.used > 0:
            return False
        self.used += need
        self.cache.set_capacity((self.capacity - self.used) // BLOCK_TOKENS)
        return True

    def _start(self, f: Flight, now: float) -> None:
        f.cached_d = cached_tokens(self.cache.hit_blocks(f.req.hash_ids), f.req.prompt_tokens)
        if f.prefill is None:
            f.remaining = f.req.prompt_tokens - f.cached_d
            self.pending_tokens += f.remaining
            self.local.append(f)
            self.kick(now)
        elif self.engine_lock and self.busy:
            self.n_transferring += 1
            if self.overlap_reserve:
                f.reserved = False
                self.reserving.append(f)
                self.sim.prefill_workers[f.prefill].enqueue(f, now)
            else:
                self.deferred.append(f)
        else:
            self.n_transferring += 1
            self.sim.prefill_workers[f.prefill].enqueue(f, now)

    def _drain_prealloc(self, now: float) -> None:
        while self.prealloc and self._reserve(self.prealloc[0]):
            self._start(self.prealloc.popleft(), now)

    # ---------------------------------------------------------------- KV arrival from a prefill worker
    def receive(self, now: float, f: Flight) -> None:
        """The request's KV is here (transfer done): first token out, join at the next step boundary."""
        self.n_transferring -= 1
        f.t_first = now
        if self.busy:
            self.joining.append(f)
        else:
            self._add_running(f, now)
            self.kick(now)

    def transfer_end(self, f: Flight, now: float) -> float:
        """When a KV transfer of f's missing tokens that starts now ends (the inbound link is FIFO)."""
        t = self.cost.transfer_time(f.req.prompt_tokens - f.cached_d, self.transfer_bw)
        self.link_free_at = max(now, self.link_free_at) + t
        return self.link_free_at

    # ---------------------------------------------------------------- the step loop
    def _add_running(self, f: Flight, now: float) -> None:
        if f.req.output_tokens <= 1:
            self._finish(f, now)
            return
        f.finish_step = self.step_idx + f.req.output_tokens - 1
        heapq.heappush(self.finish_heap, (f.finish_step, f.req.rid, f))
        self.n_running += 1
        self.kv_sum += f.req.prompt_tokens + 1

    def kick(self, now: float) -> None:
        if self.busy or not (self.n_running or self.local):
            return
        parts, budget, pairs = [], self.chunk_tokens, 0.0
        seats = math.inf if self.max_seqs is None else self.max_seqs - self.n_running - self.seated
        for f in self.local:
            if budget <= 0:
                break
            if not f.seated:
                if seats <= 0:
                    break          # FCFS: the head waits for a seat, nothing behind it jumps ahead
                f.seated, seats = True, seats - 1
                self.seated += 1
            n = min(f.remaining, budget)
            pairs += CostModel.pairs(n, f.req.prompt_tokens - f.remaining)
            parts.append((f, n))
            budget -= n
        dt = self.sim.step_cost(self).mixed_step_time(self.n_running, self.kv_sum, self.chunk_tokens - budget, pairs)
        self.busy = True
        self.steps += 1
        self.busy_s += dt
        self.sim.at(now + dt, self._step_end, self.n_running, parts)

    def _step_end(self, now: float, batch: int, parts: list[tuple[Flight, int]]) -> None:
        self.busy = False
        if batch:
            self.step_idx += 1
            self.kv_sum += batch
            while self.finish_heap and self.finish_heap[0][0] <= self.step_idx:
                self._finish(heapq.heappop(self.finish_heap)[2], now)
                self.n_running -= 1
        for f, n in parts:
            f.remaining -= n
            self.pending_tokens -= n
            if f.remaining == 0:
                self.local.popleft()
                self.seated -= 1
                f.t_first = now
                self._add_running(f, now)
        for f in self.joining:
            if math.isnan(f.t_first):
                f.t_first = now
            self._add_running(f, now)
        self.joining.clear()
        for f in self.deferred:
            self.sim.prefill_workers[f.prefill].enqueue(f, now)
        self.deferred.clear()
        for f in self.reserving:
            f.reserved = True
            if f.push_waiting:
                self.sim.at(self.transfer_end(f, now), self.receive, f)
        self.reserving.clear()
        self._drain_prealloc(now)
        self.kick(now)

    def _finish(self, f: Flight, now: float) -> None:
        f.t_done = now
        if f.finish_step and f.finish_step <= self.step_idx:
            self.kv_sum -= f.req.prompt_tokens + f.req.output_tokens
        self.used -= f.req.prompt_tokens + f.req.output_tokens
        self.cache.set_capacity((self.capacity - self.used) // BLOCK_TOKENS)
        self.cache.insert(f.req.hash_ids)
        self.sim.on_done(f, now)


class PrefillWorkerSim:
    def __init__(self, name: str, cost: CostModel, index: PrefixIndex, sim, engine_lock: bool = False):
        self.name, self.cost, self.sim = name, cost, sim
        # engine_lock: the real prefill worker reads a finished prompt's block ids under the engine
        # lock before pushing; the loop thread has already started the next forward, so the push
        # waits for that forward to end (engine/loop.py, prefill_worker.prefill)
        self.engine_lock = engine_lock
        self.to_push: list[Flight] = []
        self.cache = PrefixCache(name, index, cost.kv_capacity_tokens // BLOCK_TOKENS)
        self.queue: list[tuple[int, int, Flight]] = []
        self.queued_s = 0.0
        self.queued_tokens = 0
        self.busy_until = 0.0
        self.busy = False
        self.busy_s = 0.0

    def snapshot(self, hit_blocks: int, prompt_tokens: int, now: float) -> dict:
        return {"name": self.name, "role": "prefill", "num_running": int(self.busy),
                "num_waiting": len(self.queue), "num_transferring": 0, "free_blocks": 0, "total_blocks": 0,
                "block_size": SNAP_BLOCK, "draining": False, "assigned": 0,
                "queued_prefill_s": self.queued_s + max(self.busy_until - now, 0.0),
                "queued_prefill_tokens": self.queued_tokens,
                "cached_prefix_tokens": cached_tokens(hit_blocks, prompt_tokens) if hit_blocks else 0}

    def enqueue(self, f: Flight, now: float) -> None:
        f.cached_p = cached_tokens(self.cache.hit_blocks(f.req.hash_ids), f.req.prompt_tokens)
        f.remaining = f.req.prompt_tokens - f.cached_p
        f.est_s = self.cost.prefill_time(f.remaining, f.cached_p)
        self.queued_s += f.est_s
        self.queued_tokens += f.remaining
        heapq.heappush(self.queue, (f.req.priority, f.seq, f))
        self.kick(now)

    def kick(self, now: float) -> None:
        if self.busy or not self.queue:
            return
        budget, pairs, parts = self.cost.prefill_chunk_tokens, 0.0, []
        for _, _, f in sorted(self.queue)[:64]:
            if budget <= 0:
                break
            n = min(f.remaining, budget)
            pairs += CostModel.pairs(n, f.req.prompt_tokens - f.remaining)
            parts.append((f, n))
            budget -= n
        dt = self.sim.step_cost(self).prefill_forward_time(self.cost.prefill_chunk_tokens - budget, pairs)
        self.busy, self.busy_until = True, now + dt
        self.busy_s += dt
        self.sim.at(now + dt, self._forward_end, parts)

    def _forward_end(self, now: float, parts: list[tuple[Flight, int]]) -> None:
        self.busy = False
        for f in self.to_push:           # done before this forward, waited for the lock
            self._push(f, now)
        self.to_push.clear()
        for f, n in parts:
            f.remaining -= n
            self.queued_tokens -= n
            if f.remaining == 0:
                self.queue.remove((f.req.priority, f.seq, f))
                self.queued_s -= f.est_s
                self.cache.insert(f.req.hash_ids)
                self.to_push.append(f)
        heapq.heapify(self.queue)
        if not (self.engine_lock and self.queue):   # no next forward to wait for: push now
            for f in self.to_push:
                self._push(f, now)
            self.to_push.clear()
        self.kick(now)

    def _push(self, f: Flight, now: float) -> None:
        if not f.reserved:               # D is still reserving: its step end starts the push
            f.push_waiting = True
            return
        d = self.sim.decode_workers[f.decode]
        self.sim.at(d.transfer_end(f, now), d.receive, f)
