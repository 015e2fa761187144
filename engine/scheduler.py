"""Continuous-batching scheduler with chunked prefill, prefix caching and preemption. No torch.

Life cycle of a request:
    WaitingQueue  -- admitted (prefix matched, blocks allocated) -->  RunningBatch
    RunningBatch  -- blocks ran out: preempted (blocks freed, recompute later) --> front of WaitingQueue
    RunningBatch  -- stop token / stop string / max tokens / abort -->  finished (blocks freed)
Disaggregation adds two parking places outside the batch:
    TransferQueue (decode side)  reserve_remote() allocates the prompt's blocks (after a prefix
                                 match) while its KV arrives over the wire; commit_remote() moves
                                 the request into RunningBatch with the first token appended.
    HeldBlocks (prefill side)    a request with hold_blocks=True keeps its blocks when it finishes
                                 so its KV can be pushed; release_held() frees them.

Every step spends a token budget (`max_num_batched_tokens`). Running requests go first, in
arrival order: a decoding request takes one token, a request still prefilling takes the next chunk
of its prompt. If a running request cannot get the blocks for its new tokens, the most recently
admitted running request is preempted until it can. Waiting requests are then admitted in order
(first-come first-served; the head is never skipped) while budget, seats and blocks remain. A
request that does not fit whole takes a chunk of its prompt now and the rest in later steps.

Overlapped decode (engine/overlap.py): the engine may schedule step N+1 while step N is still
running and its tokens are unknown. mark_in_flight(N) counts each of N's requests as having one
token more computed and one more to come (`Request.num_inflight_tokens`), so schedule() gives
such a request its next position; update_from_output(N) turns the count back into
num_computed_tokens and the real token. The engine only does this when
next_step_is_decode() says the coming schedule gives each running request exactly one token and
nothing else: no preemption (an in-flight request is never preempted), no admission, no chunk.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

from ..config import SchedulerConfig
from .block_pool import BlockPool, prefix_hashes
from .request import FinishReason, Request, RequestStatus


@dataclass
class ScheduledChunk:
    request: Request
    start: int             # position of the first new token (num_computed_tokens + num_inflight_tokens)
    num_new_tokens: int
    samples: bool          # the chunk reaches the end of the request's tokens: its last logits are sampled


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    in_flight: bool = False   # set by mark_in_flight: the engine reads its tokens after scheduling the next step

    @property
    def num_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks

    @property
    def is_decode(self) -> bool:
        """Every chunk is one token and samples (each request gains exactly one token)."""
        return bool(self.chunks) and all(c.num_new_tokens == 1 and c.samples for c in self.chunks)


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: BlockPool, max_model_len: int):
        self.config = config
        self.pool = pool
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.transferring: dict[str, Request] = {}
        self.held: dict[str, Request] = {}

    # ------------------------------------------------------------ admission
    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        limit = min(req.num_prompt_tokens + req.params.max_tokens, self.max_model_len)
        need = blocks_needed(limit, self.pool.block_size)
        if need > self.pool.num_blocks:
            raise ValueError(f"request {req.request_id}: needs {need} KV blocks for {limit} tokens but the "
                             f"pool holds {self.pool.num_blocks}; lower max_tokens or grow the KV cache")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def abort_request(self, request_id: str) -> Request | None:
        req = self.requests.get(request_id)
        if req is None or req.is_finished:
            return None
        if req in self.waiting:
            self.waiting.remove(req)
        self.transferring.pop(request_id, None)
        self.finish_request(req, FinishReason.ABORT)
        return req

    # ------------------------------------------------------------ disaggregation
    def reserve_remote(self, req: Request) -> list[int] | None:
        """Decode side: take blocks for the whole prompt (reusing a cached prefix) and park the
        request in the TransferQueue. Returns the ids of the blocks the sender must fill, starting
        at block index req.num_cached_tokens // block_size, or None when the pool has no room."""
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        n = req.num_prompt_tokens
        hit = self.pool.match_prefix(req.prompt_token_ids, max_tokens=n - 1)
        new = self._take_blocks(req, hit, n)
        if new is None:
            return None
        req.status = RequestStatus.TRANSFERRING
        self.requests[req.request_id] = req
        self.transferring[req.request_id] = req
        return [b.block_id for b in new]

    def commit_remote(self, request_id: str, first_token: int) -> Request:
        """The prompt's KV has landed and been verified: join the running batch."""
        req = self.transferring.pop(request_id)
        req.num_computed_tokens = req.num_prompt_tokens
        self._cache_full_blocks(req)
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        self._append_token(req, first_token)
        return req

    def release_held(self, request_id: str) -> None:
        """Prefill side: the push is over (or abandoned); give the blocks back."""
        req = self.held.pop(request_id, None)
        if req is not None:
            self.pool.free(reversed(req.blocks))
            req.blocks = []

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_blocks_in_flight(self) -> int:
        """Blocks parked outside the batch (TransferQueue + HeldBlocks)."""
        return sum(len(r.blocks) for r in [*self.transferring.values(), *self.held.values()])

    # ------------------------------------------------------------ one step
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        if not out.preempted:
            self._admit_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.finishes_in_flight(self.max_model_len):
                i += 1
                continue
            start = req.num_computed_tokens + req.num_inflight_tokens    # in-flight tokens count as computed
            left = req.num_tokens + req.num_inflight_tokens - start      # ... and each brings one more token
            n = min(left, budget)
            need = blocks_needed(start + n, self.pool.block_size) - len(req.blocks)
            while not self.pool.can_allocate(need):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                break
            req.blocks.extend(self.pool.allocate(max(need, 0)))
            out.chunks.append(ScheduledChunk(req, start, n, n == left))
            budget -= n
            i += 1
        return budget

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            hit = self.pool.match_prefix(req.all_token_ids, max_tokens=req.num_tokens - 1)
            n = min(req.num_tokens - hit.num_tokens, budget)
            if self._take_blocks(req, hit, hit.num_tokens + n) is None:
                break
            self.waiting.popleft()
            req.num_computed_tokens = hit.num_tokens
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.chunks.append(ScheduledChunk(req, req.num_computed_tokens, n, hit.num_tokens + n == req.num_tokens))
            budget -= n

    def _take_blocks(self, req: Request, hit, num_tokens: int) -> list | None:
        """Give `req` the prefix-hit blocks plus new ones to hold `num_tokens` tokens; returns the
        new blocks, or None (nothing taken) when the pool cannot supply them now."""
        need = blocks_needed(num_tokens, self.pool.block_size) - len(hit.blocks)
        reclaimed = sum(1 for b in hit.blocks if b.ref_cnt == 0)   # hits sitting in the free queue
        if not self.pool.can_allocate(need + reclaimed):
            return None
        self.pool.touch(hit.blocks)
        new = self.pool.allocate(need)
        req.blocks = list(hit.blocks) + new
        req.num_cached_tokens = hit.num_tokens
        req.block_hashes = [b.block_hash for b in hit.blocks]
        return new

    def _preempt(self, req: Request) -> None:
        if req.num_inflight_tokens:    # next_step_is_decode() rules this out before the engine schedules
            raise RuntimeError(f"{req.request_id}: preempted while a launched step still computes it")
        self.running.remove(req)
        self._release_blocks(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.waiting.appendleft(req)

    # ------------------------------------------------------------ overlapped decode
    def next_step_is_decode(self) -> bool:
        """True when schedule() would now give every running request exactly one token (but those
        whose in-flight token is their last: they get none) and do nothing else: no prefill
        chunk, no preemption, no admission (a waiting request with a free seat and budget counts
        as an admission even if its blocks would not fit). Changes nothing; engine/overlap.py
        asks it before scheduling a step behind one in flight."""
        cfg, bs = self.config, self.pool.block_size
        run = [r for r in self.running if not r.finishes_in_flight(self.max_model_len)]
        if not run or len(run) > cfg.max_num_batched_tokens:
            return False
        need = 0
        for r in run:
            if r.num_tokens - r.num_computed_tokens != 1:
                return False
            need += max(blocks_needed(r.num_computed_tokens + r.num_inflight_tokens + 1, bs) - len(r.blocks), 0)
        if not self.pool.can_allocate(need):   # would preempt
            return False
        budget_left = cfg.max_num_batched_tokens - len(run)
        return not self.waiting or budget_left <= 0 or len(self.running) >= cfg.max_num_seqs

    def mark_in_flight(self, out: SchedulerOutput) -> None:
        """`out` (a decode step) is launched now and read later: until update_from_output(out),
        each of its requests counts one token more computed and one more to come."""
        if not out.is_decode:
            raise RuntimeError("only decode steps (one sampled token per request) can be in flight")
        out.in_flight = True
        for c in out.chunks:
            c.request.num_inflight_tokens += 1

    # ------------------------------------------------------------ after the model ran
    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance counters, cache full blocks, append sampled tokens, finish what stopped.

        Returns the requests that got a new token (finished ones included). A request that
        finished or was aborted after `out` was scheduled gets nothing: its token is dropped."""
        touched = []
        for chunk in out.chunks:
            req = chunk.request
            if out.in_flight:
                req.num_inflight_tokens -= 1
            if req.status != RequestStatus.RUNNING:   # aborted, or finished by an earlier step
                continue
            req.num_computed_tokens += chunk.num_new_tokens
            self._cache_full_blocks(req)
            if chunk.samples:
                self._append_token(req, sampled[req.request_id])
                touched.append(req)
        return touched

    def _append_token(self, req: Request, token: int) -> None:
        req.append_token(token)
        reason = req.check_stop(self.max_model_len)
        if reason is not None:
            self.finish_request(req, reason)

    def _cache_full_blocks(self, req: Request) -> None:
        bs = self.pool.block_size
        num_full = req.num_computed_tokens // bs
        if num_full <= len(req.block_hashes) or not self.pool.enable_prefix_caching:
            return
        tokens = req.all_token_ids
        hashes = prefix_hashes(self.pool.hash_seed, tokens[: num_full * bs], bs)
        for i in range(len(req.block_hashes), num_full):
            self.pool.cache_block(req.blocks[i], hashes[i], tokens[i * bs:(i + 1) * bs])
        req.block_hashes = hashes

    def finish_request(self, req: Request, reason: FinishReason) -> None:
        if req.is_finished:
            return
        if req in self.running:
            self.running.remove(req)
        if req.hold_blocks and reason != FinishReason.ABORT:
            self.held[req.request_id] = req
        else:
            self._release_blocks(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        self.requests.pop(req.request_id, None)

    def _release_blocks(self, req: Request) -> None:
        self.pool.free(reversed(req.blocks))   # tail first: suffix blocks are evicted before prefix blocks
        req.blocks = []
        req.block_hashes = []

    def requests_in(self, statuses: Iterable[RequestStatus]) -> list[Request]:
        s = set(statuses)
        return [r for r in self.requests.values() if r.status in s]
