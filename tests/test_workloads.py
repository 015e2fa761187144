"""Workloads: seeded determinism, prefix structure, the Mooncake trace loader, prompt synthesis."""
from __future__ import annotations

import pytest

from bench import workloads as wl


@pytest.mark.parametrize("make", [
    lambda s: wl.synthetic(200, 4.0, seed=s), lambda s: wl.synthetic(200, 4.0, seed=s, burst_cv=3.0),
    lambda s: wl.long_context(50, 0.5, seed=s), lambda s: wl.multi_turn(20, 4, 0.5, seed=s),
    lambda s: wl.agentic(100, 2.0, seed=s)])
def test_deterministic_by_seed(make):
    a, b, c = make(1), make(1), make(2)
    assert a == b and a != c
    assert [r.arrival_s for r in a] == sorted(r.arrival_s for r in a)
    assert [r.rid for r in a] == list(range(len(a)))
    assert all(len(r.hash_ids) == -(-r.prompt_tokens // wl.BLOCK_TOKENS) for r in a)


def test_poisson_rate_and_bursty_variance():
    import random
    import statistics
    p = wl.poisson_arrivals(10.0, 5000, random.Random(0))
    g = wl.gamma_arrivals(10.0, 3.0, 5000, random.Random(0))
    assert 5000 / p[-1] == pytest.approx(10.0, rel=0.05)
    gaps = lambda xs: [b - a for a, b in zip(xs, xs[1:])]  # noqa: E731
    assert statistics.pstdev(gaps(g)) > 2 * statistics.pstdev(gaps(p))


def test_multi_turn_prefixes_grow_and_are_shared():
    reqs = wl.multi_turn(5, 4, 0.5, seed=0)
    by_session: dict = {}
    for r in reqs:
        by_session.setdefault(r.session, []).append(r)
    for turns in by_session.values():
        for prev, nxt in zip(turns, turns[1:]):
            full = prev.prompt_tokens // wl.BLOCK_TOKENS
            assert nxt.hash_ids[:full] == prev.hash_ids[:full] and nxt.prompt_tokens > prev.prompt_tokens
    firsts = {t[0].hash_ids[0] for t in by_session.values()}
    assert len(firsts) == 1, "the system prompt is shared"


def test_agentic_calls_share_the_long_prompt():
    reqs = wl.agentic(10, 1.0, seed=0, shared_tokens=8192)
    assert len({r.hash_ids[:16] for r in reqs}) == 1
    assert len({r.hash_ids[16:] for r in reqs}) == 10


def test_mooncake_trace_loader():
    if not wl.TRACE_PATH.exists():
        pytest.skip("shared Mooncake trace not present")
    reqs = wl.mooncake_trace(limit=50)
    assert len(reqs) == 50 and reqs[0].arrival_s == 0.0
    assert reqs[0].prompt_tokens == 6758 and reqs[0].hash_ids[:2] == (0, 1)
    fast = wl.mooncake_trace(limit=50, time_scale=4.0)
    assert fast[-1].arrival_s == pytest.approx(reqs[-1].arrival_s / 4)
    assert wl.scale_time(reqs, 4.0)[-1].arrival_s == pytest.approx(fast[-1].arrival_s)


def test_mooncake_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="Mooncake trace not found"):
        wl.mooncake_trace(tmp_path / "nope.jsonl")


def test_synthesized_prompts_share_exactly_their_common_blocks():
    a = wl.synthesize_prompt((0, 1, 2), 1400, vocab_size=49152)
    b = wl.synthesize_prompt((0, 1, 7), 1300, vocab_size=49152)
    assert len(a) == 1400 and len(b) == 1300
    assert a[:1024] == b[:1024] and a[1024:1300] != b[1024:1300]
    assert a == wl.synthesize_prompt((0, 1, 2), 1400, vocab_size=49152)
    assert min(a) >= 256 and max(a) < 49152
    assert len(wl.synthesize_prompt((5,), 700, vocab_size=1000)) == 700
