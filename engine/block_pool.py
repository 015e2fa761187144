"""The KV block pool: fixed-size blocks, a free queue, ref counts and a prefix cache.

Plain Python, no torch. A block is in exactly one of three states:
    used          ref_cnt > 0 (owned by one or more requests, or by a transfer lease)
    free-cached   ref_cnt == 0, holds a full block of KV whose prefix hash is registered;
                  it stays in the free queue (LRU order) and is evicted only when allocated
    free-empty    ref_cnt == 0, no hash
Invariant (check_integrity): used + free-cached + free-empty == num_blocks, the free queue holds
exactly the ref_cnt == 0 blocks, and the hash map holds exactly the blocks that carry a hash.

Prefix hashes are chained: hash(block i) = H(seed, hash(block i-1), tokens of block i), with a
keyed BLAKE2b so every worker configured with the same seed computes the same ids. A hit is
confirmed by comparing the block's stored tokens, so a hash collision can never serve wrong KV.
"""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple, Sequence


@dataclass(eq=False)
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None
    token_ids: tuple[int, ...] = field(default=())   # the tokens whose KV the block holds (when hashed)


class MatchResult(NamedTuple):
    blocks: list[Block]        # cached blocks holding the longest matching prefix
    num_tokens: int            # tokens covered (len(blocks) * block_size)


def hash_block(seed: int, parent: bytes | None, tokens: Sequence[int]) -> bytes:
    h = hashlib.blake2b(key=struct.pack("<q", seed), digest_size=16)
    h.update(parent or b"\0" * 16)
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    return h.digest()


def prefix_hashes(seed: int, token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """Chained hashes of every full block of `token_ids`."""
    out: list[bytes] = []
    parent = None
    for i in range(len(token_ids) // block_size):
        parent = hash_block(seed, parent, token_ids[i * block_size:(i + 1) * block_size])
        out.append(parent)
    return out


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, hash_seed: int = 0,
                 enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.hash_seed = hash_seed
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[bytes, Block] = {}
        self.stats_hits = 0
        self.stats_queries = 0

    # ------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def match_prefix(self, token_ids: Sequence[int], max_tokens: int | None = None) -> MatchResult:
        """Longest run of cached full blocks that prefixes `token_ids` (at most max_tokens tokens).

        Does not change any ref count: call `touch` on the result to take the blocks.
        """
        if not self.enable_prefix_caching:
            return MatchResult([], 0)
        limit = len(token_ids) if max_tokens is None else min(max_tokens, len(token_ids))
        bs = self.block_size
        found: list[Block] = []
        for i, h in enumerate(prefix_hashes(self.hash_seed, token_ids[: (limit // bs) * bs], bs)):
            blk = self._cached.get(h)
            if blk is None or blk.token_ids != tuple(token_ids[i * bs:(i + 1) * bs]):
                break
            found.append(blk)
        self.stats_queries += 1
        self.stats_hits += bool(found)
        return MatchResult(found, len(found) * bs)

    # ------------------------------------------------------------ transitions
    def allocate(self, n: int) -> list[Block]:
        """Take n blocks from the head of the free queue (least recently freed first), evicting
        their cached hashes."""
        if n > len(self._free):
            raise RuntimeError(f"allocate({n}) with only {len(self._free)} free blocks; call can_allocate first")
        out = []
        for _ in range(n):
            _, blk = self._free.popitem(last=False)
            self._evict(blk)
            blk.ref_cnt = 1
            out.append(blk)
        return out

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take one more reference on each block (prefix-cache hit or sharing)."""
        for blk in blocks:
            if blk.ref_cnt == 0:
                del self._free[blk.block_id]
            blk.ref_cnt += 1

    def free(self, blocks: Iterable[Block]) -> None:
        """Drop one reference on each block. Blocks reaching zero join the free queue's tail in
        the given order, so pass a request's blocks tail-first to evict its suffix before its prefix."""
        for blk in blocks:
            if blk.ref_cnt <= 0:
                raise RuntimeError(f"double free of block {blk.block_id}")
            blk.ref_cnt -= 1
            if blk.ref_cnt == 0:
                self._free[blk.block_id] = blk

    def cache_block(self, blk: Block, block_hash: bytes, token_ids: Sequence[int]) -> None:
        """Register a full, computed block under its chained prefix hash."""
        if not self.enable_prefix_caching or blk.block_hash is not None:
            return
        if len(token_ids) != self.block_size:
            raise ValueError(f"only full blocks are cached ({len(token_ids)} != {self.block_size})")
        if block_hash in self._cached:   # identical content computed twice: keep the first copy
            return
        blk.block_hash = block_hash
        blk.token_ids = tuple(token_ids)
        self._cached[block_hash] = blk

    def reset_prefix_cache(self) -> None:
        for blk in list(self._cached.values()):
            self._evict(blk)

    def _evict(self, blk: Block) -> None:
        if blk.block_hash is not None:
            del self._cached[blk.block_hash]
            blk.block_hash = None
            blk.token_ids = ()

    # ------------------------------------------------------------ invariants
    def check_integrity(self) -> None:
        used = sum(1 for b in self.blocks if b.ref_cnt > 0)
        free_cached = sum(1 for b in self._free.values() if b.block_hash is not None)
        free_empty = len(self._free) - free_cached
        if used + free_cached + free_empty != self.num_blocks:
            raise AssertionError(f"block accounting: used {used} + free-cached {free_cached} + "
                                 f"free-empty {free_empty} != {self.num_blocks}")
        for b in self.blocks:
            if b.ref_cnt < 0:
                raise AssertionError(f"block {b.block_id} has ref_cnt {b.ref_cnt}")
            if (b.ref_cnt == 0) != (b.block_id in self._free):
                raise AssertionError(f"block {b.block_id}: ref_cnt {b.ref_cnt} but in free queue: "
                                     f"{b.block_id in self._free}")
            if b.block_hash is not None and self._cached.get(b.block_hash) is not b:
                raise AssertionError(f"block {b.block_id} carries a hash the cache map does not point at")
        for h, b in self._cached.items():
            if b.block_hash != h:
                raise AssertionError(f"cache map entry for block {b.block_id} has a stale hash")
