"""Block-level prefix caches (LRU over hash ids) and the cluster-wide index of who holds what.

A cache entry is one hash id = BLOCK_TOKENS tokens of KV. A request hits the longest run of its
leading hash ids that a worker holds; the index answers that for every worker at once, as a
KV-aware router's radix index would.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable


class PrefixIndex:
    """hash id -> names of the workers whose cache holds it."""

    def __init__(self) -> None:
        self.holders: dict[int, set[str]] = {}

    def add(self, h: int, worker: str) -> None:
        self.holders.setdefault(h, set()).add(worker)

    def remove(self, h: int, worker: str) -> None:
        s = self.holders.get(h)
        if s is not None:
            s.discard(worker)
            if not s:
                del self.holders[h]

    def match(self, hash_ids: tuple[int, ...]) -> dict[str, int]:
        """Leading hash ids each worker holds (workers with no hit are absent)."""
        res: dict[str, int] = {}
        alive: set[str] | None = None
        k = 0
        for k, h in enumerate(hash_ids):
            holders = self.holders.get(h)
            nxt = set() if not holders else (set(holders) if alive is None else alive & holders)
            if alive is not None:
                for w in alive - nxt:
                    res[w] = k
            alive = nxt
            if not alive:
                return res
        for w in alive or ():
            res[w] = k + 1
        return res


class PrefixCache:
    """One worker's LRU of cached hash ids, capacity in blocks (may change: decode KV is shared)."""

    def __init__(self, name: str, index: PrefixIndex, capacity_blocks: int):
        self.name, self.index, self.capacity = name, index, capacity_blocks
        self.lru: OrderedDict[int, None] = OrderedDict()

    def hit_blocks(self, hash_ids: tuple[int, ...]) -> int:
        """Leading hash ids held here (touches them: a hit is a use)."""
        k = 0
        for h in hash_ids:
            if h not in self.lru:
                break
            self.lru.move_to_end(h)
            k += 1
        return k

    def insert(self, hash_ids: Iterable[int]) -> None:
        for h in hash_ids:
            if h in self.lru:
                self.lru.move_to_end(h)
            else:
                self.lru[h] = None
                self.index.add(h, self.name)
        self.trim()

    def set_capacity(self, blocks: int) -> None:
        self.capacity = max(blocks, 0)
        self.trim()

    def trim(self) -> None:
        while len(self.lru) > self.capacity:
            h, _ = self.lru.popitem(last=False)
            self.index.remove(h, self.name)
