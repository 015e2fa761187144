"""Continuous batching, chunked prefill, prefix caching and preemption, in plain Python.

A fake model stands in for the forward pass: it "writes KV" by storing each token in its cache
slot, and "samples" a token that is a function of the context it reads back through the block
table. If a block table, a prefix hit or a preemption ever pointed at the wrong KV, the read-back
context would differ from the request's real tokens and the test fails.
"""
from __future__ import annotations

import random

import pytest

from splitserve.config import SchedulerConfig
from splitserve.engine.block_pool import BlockPool
from splitserve.engine.request import Request, SamplingParams
from splitserve.engine.scheduler import Scheduler


class SlotModel:
    def __init__(self, pool: BlockPool):
        self.bs = pool.block_size
        self.kv: dict[int, tuple[int, int]] = {}     # slot -> (position, token)

    def step(self, out) -> dict[str, int]:
        sampled = {}
        for c in out.chunks:
            req, toks = c.request, c.request.all_token_ids
            table = [b.block_id for b in req.blocks]
            for p in range(c.start, c.start + c.num_new_tokens):
                self.kv[table[p // self.bs] * self.bs + p % self.bs] = (p, toks[p])
            if c.samples:
                n = c.start + c.num_new_tokens
                ctx = [self.kv[table[p // self.bs] * self.bs + p % self.bs] for p in range(n)]
                assert ctx == list(enumerate(toks[:n])), f"{req.request_id}: KV read back is wrong"
                sampled[req.request_id] = next_token(toks[:n])
        return sampled


def next_token(ctx: list[int]) -> int:
    return (sum(t * (i + 1) for i, t in enumerate(ctx)) * 2654435761) % 97 + 3


def reference(prompt: list[int], max_tokens: int) -> list[int]:
    toks, out = list(prompt), []
    for _ in range(max_tokens):
        t = next_token(toks)
        out.append(t)
        toks.append(t)
    return out


def run(prompts, max_tokens, num_blocks=64, block_size=4, budget=32, max_seqs=8, arrivals=None):
    pool = BlockPool(num_blocks, block_size, hash_seed=11)
    sched = Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget), pool, 10_000)
    model = SlotModel(pool)
    reqs = [Request(f"r{i}", list(p), SamplingParams(max_tokens=max_tokens, ignore_eos=True))
            for i, p in enumerate(prompts)]
    arrivals = arrivals or [0] * len(reqs)
    step, steps_log = 0, []
    while any(not r.is_finished for r in reqs):
        for r, a in zip(reqs, arrivals):
            if a == step:
                sched.add_request(r)
        out = sched.schedule()
        assert out.num_tokens <= budget
        assert len(sched.running) <= max_seqs
        steps_log.append(out)
        sched.update_from_output(out, model.step(out))
        pool.check_integrity()
        step += 1
        assert step < 10_000
    assert pool.num_free_blocks == num_blocks, "blocks leaked"
    return reqs, steps_log, pool


def test_batch_equals_one_at_a_time_with_joins_and_chunks():
    rng = random.Random(0)
    prompts = [[rng.randrange(100) for _ in range(rng.randint(1, 40))] for _ in range(10)]
    reqs, log, _ = run(prompts, 12, budget=16, arrivals=[i * 3 for i in range(10)])
    for r, p in zip(reqs, prompts):
        assert r.output_token_ids == reference(p, 12)
    assert any(len(o.chunks) > 1 for o in log), "requests never shared a step"
    # a 40-token prompt under a 16-token budget must have been chunked
    assert any(not c.samples for o in log for c in o.chunks)


def test_preemption_recomputes_and_output_is_unchanged():
    rng = random.Random(1)
    prompts = [[rng.randrange(100) for _ in range(rng.randint(8, 20))] for _ in range(6)]
    reqs, log, _ = run(prompts, 30, num_blocks=24, budget=64)
    assert any(o.preempted for o in log), "the small pool should have forced preemption"
    assert sum(r.num_preemptions for r in reqs) > 0
    for r, p in zip(reqs, prompts):
        assert r.output_token_ids == reference(p, 30)


def test_prefix_cache_hit_skips_recompute():
    shared = list(range(3, 30))
    prompts = [shared + [50], shared + [60]]
    reqs, log, pool = run(prompts, 5, arrivals=[0, 10])
    assert reqs[1].num_cached_tokens == 24          # 6 full blocks of 4 of the 27 shared tokens
    second = [c for o in log for c in o.chunks if c.request is reqs[1]]
    assert second[0].start == 24
    assert reqs[1].output_token_ids == reference(prompts[1], 5)
    # a fully cached prompt still recomputes its last token to get logits
    reqs2, _, _ = run([shared[:8], shared[:8]], 3, arrivals=[0, 5])
    assert reqs2[1].num_cached_tokens == 4


def test_abort_frees_blocks():
    pool = BlockPool(16, 4)
    sched = Scheduler(SchedulerConfig(), pool, 1000)
    r = Request("a", list(range(10)), SamplingParams(max_tokens=5))
    sched.add_request(r)
    sched.schedule()
    assert pool.num_used_blocks == 3
    assert sched.abort_request("a") is r
    assert pool.num_free_blocks == 16 and r.finish_reason.value == "abort"
    pool.check_integrity()


def test_request_larger_than_pool_is_rejected():
    sched = Scheduler(SchedulerConfig(), BlockPool(4, 4), 1000)
    with pytest.raises(ValueError, match="KV blocks"):
        sched.add_request(Request("big", list(range(10)), SamplingParams(max_tokens=20)))
    sched.add_request(Request("ok", list(range(10)), SamplingParams(max_tokens=6)))
    with pytest.raises(ValueError, match="duplicate"):
        sched.add_request(Request("ok", [1], SamplingParams()))


def test_max_seqs_and_fcfs():
    reqs, log, _ = run([[1, 2, 3]] * 5, 4, max_seqs=2)
    first_chunk_step = {}
    for i, o in enumerate(log):
        for c in o.chunks:
            first_chunk_step.setdefault(c.request.request_id, i)
    order = sorted(first_chunk_step, key=first_chunk_step.get)
    assert order == [f"r{i}" for i in range(5)]


def test_transfer_queue_and_held_blocks():
    """Decode side: reserve (after a prefix hit) -> commit; prefill side: hold blocks past finish."""
    pool = BlockPool(16, 4, hash_seed=11)
    sched = Scheduler(SchedulerConfig(), pool, 1000)
    model = SlotModel(pool)
    # warm the prefix cache with a locally computed request
    warm = Request("w", list(range(3, 12)), SamplingParams(max_tokens=1, ignore_eos=True))
    sched.add_request(warm)
    while not warm.is_finished:
        out = sched.schedule()
        sched.update_from_output(out, model.step(out))
    r = Request("r", list(range(3, 12)) + [40, 41], SamplingParams(max_tokens=3, ignore_eos=True))
    to_fill = sched.reserve_remote(r)
    assert r.num_cached_tokens == 8 and len(to_fill) == 1 and r.status.value == "transferring"
    assert not sched.schedule().chunks, "a transferring request is not scheduled"
    sched.commit_remote("r", 77)
    assert r.output_token_ids == [77] and r.num_computed_tokens == r.num_prompt_tokens
    # the first decode step computes only the committed token
    out = sched.schedule()
    assert [(c.request.request_id, c.num_new_tokens) for c in out.chunks] == [("r", 1)]
    assert sched.abort_request("r") is r
    # prefill side: hold_blocks keeps the KV after finishing, release_held frees it
    p = Request("p", list(range(20, 30)), SamplingParams(max_tokens=1), hold_blocks=True)
    sched.add_request(p)
    while not p.is_finished:
        out = sched.schedule()
        sched.update_from_output(out, model.step(out))
    assert len(p.blocks) == 3 and sched.num_blocks_in_flight == 3
    sched.release_held("p")
    pool.check_integrity()
    assert pool.num_free_blocks == 16 and sched.num_blocks_in_flight == 0
    big = Request("big", list(range(100)), SamplingParams(max_tokens=1))
    assert sched.reserve_remote(big) is None, "no room: nothing reserved"
    pool.check_integrity()
