"""Block pool invariants under random allocate/free/share/cache/evict sequences (no torch)."""
from __future__ import annotations

import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.engine.block_pool import BlockPool, hash_block, prefix_hashes


def test_control_plane_imports_no_torch():
    import subprocess
    code = ("import sys, splitserve.engine.block_pool, splitserve.engine.scheduler, "
            "splitserve.engine.request; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_hash_is_deterministic_and_seeded():
    a = prefix_hashes(7, list(range(64)), 16)
    assert a == prefix_hashes(7, list(range(64)), 16)
    assert a != prefix_hashes(8, list(range(64)), 16)
    # chained: the same block content under a different parent hashes differently
    assert hash_block(7, a[0], range(16, 32)) == a[1]
    assert hash_block(7, None, range(16, 32)) != a[1]


def test_allocate_free_and_double_free():
    pool = BlockPool(4, 16)
    blocks = pool.allocate(3)
    assert pool.num_free_blocks == 1 and not pool.can_allocate(2)
    with pytest.raises(RuntimeError, match="can_allocate"):
        pool.allocate(2)
    pool.free(blocks)
    pool.check_integrity()
    with pytest.raises(RuntimeError, match="double free"):
        pool.free(blocks[:1])


def test_prefix_hit_requires_matching_tokens():
    pool = BlockPool(8, 4, hash_seed=1)
    toks = [5, 6, 7, 8, 9, 10, 11, 12, 13]
    blocks = pool.allocate(3)
    hashes = prefix_hashes(1, toks, 4)
    for b, h, i in zip(blocks, hashes, range(2)):
        pool.cache_block(b, h, toks[i * 4:(i + 1) * 4])
    pool.free(reversed(blocks))
    hit = pool.match_prefix(toks)
    assert [b.block_id for b in hit.blocks] == [blocks[0].block_id, blocks[1].block_id]
    assert hit.num_tokens == 8
    # forge a collision: same hash, different stored tokens -> no hit
    blocks[0].token_ids = (0, 0, 0, 0)
    assert pool.match_prefix(toks).num_tokens == 0
    blocks[0].token_ids = tuple(toks[:4])
    # a hit on free blocks reclaims them from the free queue
    pool.touch(hit.blocks)
    assert pool.num_free_blocks == 6
    pool.check_integrity()
    # allocation evicts LRU free blocks: the cached ones were freed tail-first, so they go last
    pool.allocate(5)
    assert pool.match_prefix(toks).num_tokens == 8
    pool.check_integrity()


ops = st.lists(st.tuples(st.sampled_from(["alloc", "free", "share", "cache", "match", "reset"]),
                         st.integers(0, 1000)), max_size=200)


@settings(max_examples=150, deadline=None)
@given(ops=ops, num_blocks=st.integers(1, 24))
def test_random_sequences_keep_invariants(ops, num_blocks):
    bs = 4
    pool = BlockPool(num_blocks, bs, hash_seed=3)
    owners: list[list] = []          # each owner holds one reference on each of its blocks
    for op, x in ops:
        if op == "alloc":
            n = x % 4 + 1
            if pool.can_allocate(n):
                owners.append(pool.allocate(n))
        elif op == "free" and owners:
            pool.free(reversed(owners.pop(x % len(owners))))
        elif op == "share" and owners:
            blocks = owners[x % len(owners)]
            pool.touch(blocks)
            owners.append(list(blocks))
        elif op == "cache" and owners:
            blocks = owners[x % len(owners)]
            toks = [(x + i) % 7 for i in range(len(blocks) * bs)]
            for b, h, i in zip(blocks, prefix_hashes(3, toks, bs), range(len(blocks))):
                pool.cache_block(b, h, toks[i * bs:(i + 1) * bs])
        elif op == "match":
            toks = [(x + i) % 7 for i in range(3 * bs)]
            hit = pool.match_prefix(toks)
            for i, b in enumerate(hit.blocks):
                assert b.token_ids == tuple(toks[i * bs:(i + 1) * bs])
            if hit.blocks:
                pool.touch(hit.blocks)
                owners.append(list(hit.blocks))
        elif op == "reset":
            pool.reset_prefix_cache()
        pool.check_integrity()
        held = sum(len(o) for o in owners)
        assert sum(b.ref_cnt for b in pool.blocks) == held
    for o in owners:
        pool.free(reversed(o))
    pool.check_integrity()
    assert pool.num_free_blocks == num_blocks
