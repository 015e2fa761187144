"""Seeded request workloads for the simulator and the real cluster (plain Python).

Every workload is a list of `Request`s sorted by arrival. A request's prompt is described by
its length and its prefix block hashes (`hash_ids`, BLOCK_TOKENS tokens per id, as in the
Mooncake trace): two requests sharing their first k ids share their first k * 512 prompt
tokens, so prefix caches hit for real. `synthesize_prompt` turns hash ids into token ids
deterministically (same id -> same 512 tokens) for runs against a real model.

    poisson / bursty (gamma) arrivals, ShareGPT-like lengths  -> `synthetic`
    long-context (8k-128k prompts, short outputs)             -> `long_context`
    multi-turn sessions with growing shared prefixes          -> `multi_turn`
    agentic loops over one long shared prompt                 -> `agentic`
    Mooncake FAST'25 conversation trace replay                -> `mooncake_trace`
"""
from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

BLOCK_TOKENS = 512
TRACE_PATH = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces" / "mooncake_conversation_trace.jsonl"


@dataclass(frozen=True)
class Request:
    rid: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...]        # prefix block hashes, BLOCK_TOKENS tokens each (last may be partial)
    session: int | None = None
    priority: int = 1                # 0 high, 1 normal, 2 low


# ---------------------------------------------------------------------- arrivals
def poisson_arrivals(rate: float, n: int, rng: random.Random) -> list[float]:
    """n arrival times of a Poisson process of `rate` requests/s."""
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def gamma_arrivals(rate: float, cv: float, n: int, rng: random.Random) -> list[float]:
    """n arrivals with gamma inter-arrival gaps of mean 1/rate and coefficient of variation `cv` (>1 bursty)."""
    shape = 1.0 / (cv * cv)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.gammavariate(shape, 1.0 / (rate * shape))
        out.append(t)
    return out


def _arrivals(rate: float, n: int, rng: random.Random, burst_cv: float | None) -> list[float]:
    return gamma_arrivals(rate, burst_cv, n, rng) if burst_cv else poisson_arrivals(rate, n, rng)


def _lognormal_int(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(max(rng.lognormvariate(math.log(median), sigma), lo), hi))


class _Ids:
    """Fresh hash ids (never shared unless reused on purpose)."""

    def __init__(self, start: int = 1 << 40):
        self._c = itertools.count(start)

    def take(self, n: int) -> tuple[int, ...]:
        return tuple(next(self._c) for _ in range(n))


def _blocks(tokens: int) -> int:
    return -(-tokens // BLOCK_TOKENS)


# ---------------------------------------------------------------------- synthetic workloads
def synthetic(n: int, rate: float, seed: int = 0, burst_cv: float | None = None,
              prompt_median: int = 1024, output_median: int = 256) -> list[Request]:
    """ShareGPT-like lengths (lognormal), Poisson or bursty arrivals, no prefix sharing."""
    rng, ids = random.Random(seed), _Ids()
    out = []
    for i, t in enumerate(_arrivals(rate, n, rng, burst_cv)):
        p = _lognormal_int(rng, prompt_median, 0.8, 16, 32768)
        o = _lognormal_int(rng, output_median, 0.8, 1, 4096)
        out.append(Request(i, t, p, o, ids.take(_blocks(p))))
    return out


def long_context(n: int, rate: float, seed: int = 0, lo: int = 8192, hi: int = 131072,
                 output_median: int = 64) -> list[Request]:
    """Long prompts (log-uniform in [lo, hi]) with short outputs."""
    rng, ids = random.Random(seed), _Ids()
    out = []
    for i, t in enumerate(poisson_arrivals(rate, n, rng)):
        p = int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        out.append(Request(i, t, p, _lognormal_int(rng, output_median, 0.5, 1, 1024), ids.take(_blocks(p))))
    return out


def multi_turn(sessions: int, turns: int, rate: float, seed: int = 0, system_tokens: int = 1024,
               user_median: int = 256, output_median: int = 256, think_s: float = 20.0) -> list[Request]:
    """Chat sessions (Poisson session starts) whose turn k prompt = turn k-1 prompt + reply + new message.

    Hash ids: a shared system prompt, then the session's own growing history."""
    rng, ids = random.Random(seed), _Ids()
    system = ids.take(_blocks(system_tokens))
    reqs = []
    for s, t0 in enumerate(poisson_arrivals(rate, sessions, rng)):
        history, hist_ids, t = system_tokens, system, t0
        prev_prompt = system_tokens
        for _ in range(turns):
            user = _lognormal_int(rng, user_median, 0.7, 8, 8192)
            prompt = history + user
            keep = min(prev_prompt // BLOCK_TOKENS, len(hist_ids))  # full blocks of the previous prompt
            hist_ids = hist_ids[:keep] + ids.take(_blocks(prompt) - keep)
            o = _lognormal_int(rng, output_median, 0.7, 1, 2048)
            reqs.append(Request(0, t, prompt, o, hist_ids, session=s))
            prev_prompt, history, t = prompt, prompt + o, t + rng.expovariate(1.0 / think_s)
    return _renumber(reqs)


def agentic(n: int, rate: float, seed: int = 0, shared_tokens: int = 16384, tool_median: int = 512,
            output_median: int = 128) -> list[Request]:
    """Many short calls over one long shared system+tool prompt, each with its own tool result."""
    rng, ids = random.Random(seed), _Ids()
    shared = ids.take(shared_tokens // BLOCK_TOKENS)
    out = []
    for i, t in enumerate(poisson_arrivals(rate, n, rng)):
        tool = _lognormal_int(rng, tool_median, 0.8, 16, 16384)
        p = len(shared) * BLOCK_TOKENS + tool
        out.append(Request(i, t, p, _lognormal_int(rng, output_median, 0.6, 1, 2048),
                           shared + ids.take(_blocks(p) - len(shared))))
    return out


def _renumber(reqs: list[Request]) -> list[Request]:
    reqs.sort(key=lambda r: (r.arrival_s, r.session if r.session is not None else -1))
    return [replace(r, rid=i) for i, r in enumerate(reqs)]


# ---------------------------------------------------------------------- the Mooncake trace
def mooncake_trace(path: str | Path | None = None, time_scale: float = 1.0, limit: int | None = None,
                   start: int = 0) -> list[Request]:
    """Replay of the Mooncake conversation trace; arrival = timestamp / 1000 / time_scale.

    time_scale > 1 compresses time (higher rate). `start`/`limit` slice the trace (in order),
    and arrivals are shifted so the slice starts at 0. The file is read from ../shared at run
    time and never copied into the repository.
    """
    p = Path(path) if path else TRACE_PATH
    if not p.exists():
        raise FileNotFoundError(f"Mooncake trace not found at {p}; it lives in the shared data folder "
                                "(shared/data/traces/mooncake_conversation_trace.jsonl, see its README)")
    rows = []
    with p.open() as f:
        for i, line in enumerate(f):
            if i < start:
                continue
            if limit is not None and len(rows) >= limit:
                break
            rows.append(json.loads(line))
    t0 = rows[0]["timestamp"] if rows else 0
    return [Request(i, (r["timestamp"] - t0) / 1000.0 / time_scale, int(r["input_length"]),
                    max(int(r["output_length"]), 1), tuple(r["hash_ids"])) for i, r in enumerate(rows)]


def scale_time(reqs: list[Request], factor: float) -> list[Request]:
    """Arrivals divided by `factor` (factor 2 = twice the request rate)."""
    return [replace(r, arrival_s=r.arrival_s / factor) for r in reqs]


def offered_rate(reqs: list[Request]) -> float:
    """Requests per second over the workload's arrival span."""
    if len(reqs) < 2:
        return 0.0
    return (len(reqs) - 1) / max(reqs[-1].arrival_s - reqs[0].arrival_s, 1e-9)


# ---------------------------------------------------------------------- real prompts from hash ids
def block_tokens(hash_id: int, vocab_size: int, seed: int = 0, n: int = BLOCK_TOKENS,
                 reserved: int = 256) -> list[int]:
    """The BLOCK_TOKENS token ids of one hash id (deterministic; avoids the first `reserved` ids)."""
    rng = random.Random((seed << 64) ^ hash_id)
    return [rng.randrange(reserved, vocab_size) for _ in range(n)]


def synthesize_prompt(hash_ids: tuple[int, ...], prompt_tokens: int, vocab_size: int, seed: int = 0) -> list[int]:
    """Prompt token ids for a request: same hash id -> same 512 tokens, so prefix sharing is real."""
    toks: list[int] = []
    for h in hash_ids:
        toks.extend(block_tokens(h, vocab_size, seed))
        if len(toks) >= prompt_tokens:
            break
    if len(toks) < prompt_tokens:  # more tokens than ids cover: pad deterministically from the last id
        toks.extend(block_tokens((hash_ids[-1] if hash_ids else 0) ^ 0x5EED, vocab_size, seed,
                                 prompt_tokens - len(toks)))
    return toks[:prompt_tokens]
