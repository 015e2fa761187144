"""Leases: who owns a decode worker's reserved KV blocks while their KV is on the wire.

Plain Python (no torch, no ucxx), thread-safe, unit-tested with a fake clock.

Life cycle of a lease:
    LIVE --complete(epoch)--> COMPLETED   blocks now belong to the request (never freed here)
    LIVE --expire / cancel--> EXPIRED | CANCELLED   blocks go back through `free_blocks`
A resolved lease accepts no new writes. Its blocks are handed to `free_blocks` exactly once, and
only after every write that was admitted (`begin_write`) has ended (`end_write`): a receive
posted into the blocks must finish or be plugged before anyone else may own them. That is the
whole safety argument against late or duplicate writes.

Epochs: `reissue` bumps the epoch of a live lease (a retry on another prefill worker reuses the
reservation); writes and completions carrying an older epoch are refused. Each (lease, epoch)
also gets a fresh 24-bit tag key so the old attempt's messages can never match the new one's
receives.
"""
from __future__ import annotations

import enum
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

TAG_KEY_BITS = 24


class LeaseState(enum.Enum):
    LIVE = "live"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


@dataclass
class Lease:
    lease_id: int
    epoch: int
    block_ids: tuple[int, ...]
    deadline: float
    tag_key: int
    state: LeaseState = LeaseState.LIVE
    inflight: int = 0                 # admitted writes not yet ended
    freed: bool = False               # blocks handed back to the pool
    resolved_at: float | None = None  # when it left LIVE (the clock of its table)
    old_tag_keys: list[int] = field(default_factory=list)

    @property
    def resolved(self) -> bool:
        return self.state is not LeaseState.LIVE


class LeaseError(Exception):
    """A lease operation that the lease's state refuses (the message says why)."""


class LeaseTable:
    """Reservations of destination blocks, keyed by lease id.

    `free_blocks(block_ids)` is the engine's hook that returns blocks to its pool; it is called
    at most once per lease, outside the table's lock.
    """

    def __init__(self, free_blocks: Callable[[list[int]], None], timeout_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if timeout_s <= 0:
            raise ValueError("lease timeout must be > 0")
        self._free_blocks = free_blocks
        self._timeout_s = timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._leases: dict[int, Lease] = {}
        self._ids = itertools.count(1)
        self._next_key = 1
        self._owned: set[int] = set()          # blocks held by LIVE or draining leases
        self.freed_count = 0                   # total free_blocks calls (for tests/metrics)

    # ---- reservation -------------------------------------------------------------------
    def reserve(self, block_ids: Sequence[int]) -> Lease:
        ids = tuple(int(b) for b in block_ids)
        if not ids or len(set(ids)) != len(ids):
            raise LeaseError("reserve needs a non-empty list of distinct block ids")
        with self._lock:
            taken = self._owned.intersection(ids)
            if taken:
                raise LeaseError(f"blocks {sorted(taken)[:8]} are already under a lease")
            lease = Lease(next(self._ids), 1, ids, self._clock() + self._timeout_s,
                          self._new_key())
            self._leases[lease.lease_id] = lease
            self._owned.update(ids)
            return lease

    def reissue(self, lease_id: int) -> Lease:
        """New epoch (and tag key) for a live lease; its deadline restarts."""
        with self._lock:
            lease = self._live(lease_id)
            lease.old_tag_keys.append(lease.tag_key)
            lease.epoch += 1
            lease.tag_key = self._new_key()
            lease.deadline = self._clock() + self._timeout_s
            return lease

    def _new_key(self) -> int:
        in_use = {l.tag_key for l in self._leases.values()
                  if not l.freed and l.state is not LeaseState.COMPLETED}
        for _ in range(1 << TAG_KEY_BITS):
            key, self._next_key = self._next_key, self._next_key % ((1 << TAG_KEY_BITS) - 1) + 1
            if key not in in_use:
                return key
        raise LeaseError("no free tag key")

    # ---- writes ------------------------------------------------------------------------
    def begin_write(self, lease_id: int, epoch: int) -> bool:
        """Admit one write into the lease's blocks; False (and nothing admitted) if the lease
        is resolved, unknown, or the epoch is stale."""
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None or lease.resolved or lease.epoch != epoch:
                return False
            lease.inflight += 1
            return True

    def end_write(self, lease_id: int) -> None:
        with self._lock:
            lease = self._leases[lease_id]
            if lease.inflight <= 0:
                raise LeaseError(f"lease {lease_id}: end_write without begin_write")
            lease.inflight -= 1
            to_free = self._take_if_drained(lease)
        self._free(to_free)

    # ---- resolution --------------------------------------------------------------------
    def complete(self, lease_id: int, epoch: int) -> str | None:
        """Hand the blocks to the request. None on success, else why it was refused."""
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None:
                return f"unknown lease {lease_id}"
            if lease.resolved:
                return f"lease {lease_id} is {lease.state.value}"
            if lease.epoch != epoch:
                return f"stale epoch {epoch} (lease {lease_id} is at epoch {lease.epoch})"
            if lease.inflight:
                return f"lease {lease_id} still has {lease.inflight} writes in flight"
            lease.state = LeaseState.COMPLETED
            lease.resolved_at = self._clock()
            self._owned.difference_update(lease.block_ids)
            return None

    def cancel(self, lease_id: int) -> Lease:
        return self._resolve(lease_id, LeaseState.CANCELLED)

    def expire_due(self) -> list[Lease]:
        """Expire every live lease past its deadline; returns them."""
        now = self._clock()
        with self._lock:
            due = [l for l in self._leases.values() if not l.resolved and l.deadline <= now]
        return [self._resolve(l.lease_id, LeaseState.EXPIRED) for l in due]

    def _resolve(self, lease_id: int, state: LeaseState) -> Lease:
        with self._lock:
            lease = self._live(lease_id)
            lease.state = state
            lease.resolved_at = self._clock()
            to_free = self._take_if_drained(lease)
        self._free(to_free)
        return lease

    def _take_if_drained(self, lease: Lease) -> tuple[int, ...] | None:
        """Under the lock: mark freed and return the blocks if they may be freed now."""
        if lease.state in (LeaseState.EXPIRED, LeaseState.CANCELLED) and not lease.inflight \
                and not lease.freed:
            lease.freed = True
            self._owned.difference_update(lease.block_ids)
            self.freed_count += 1
            return lease.block_ids
        return None

    def _free(self, block_ids: tuple[int, ...] | None) -> None:
        if block_ids is not None:
            self._free_blocks(list(block_ids))

    # ---- queries -----------------------------------------------------------------------
    def _live(self, lease_id: int) -> Lease:
        lease = self._leases.get(lease_id)
        if lease is None:
            raise LeaseError(f"unknown lease {lease_id}")
        if lease.resolved:
            raise LeaseError(f"lease {lease_id} is already {lease.state.value}")
        return lease

    def get(self, lease_id: int) -> Lease | None:
        with self._lock:
            return self._leases.get(lease_id)

    def forget(self, lease_id: int) -> None:
        """Drop a finished lease's record (completed, or resolved and freed)."""
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is not None and (lease.state is LeaseState.COMPLETED or lease.freed):
                del self._leases[lease_id]

    def forget_resolved(self, older_than_s: float) -> list[int]:
        """Drop the records of leases that finished (completed, or resolved and freed) at least
        `older_than_s` ago; returns their ids. A serving process reserves a lease per request:
        without this the table (and each reservation's tag-key scan) grows without bound."""
        cutoff = self._clock() - older_than_s
        with self._lock:
            gone = [l.lease_id for l in self._leases.values()
                    if (l.state is LeaseState.COMPLETED or l.freed)
                    and l.resolved_at is not None and l.resolved_at <= cutoff]
            for lid in gone:
                del self._leases[lid]
        return gone

    def live_count(self) -> int:
        with self._lock:
            return sum(1 for l in self._leases.values() if not l.resolved)

    def check_integrity(self) -> None:
        """Every owned block belongs to exactly one unfreed, uncompleted lease."""
        with self._lock:
            holders: dict[int, int] = {}
            for l in self._leases.values():
                if l.state is LeaseState.COMPLETED or l.freed:
                    continue
                for b in l.block_ids:
                    if b in holders:
                        raise AssertionError(f"block {b} held by leases {holders[b]} and {l.lease_id}")
                    holders[b] = l.lease_id
            if set(holders) != self._owned:
                raise AssertionError("lease table owned-set out of sync")
