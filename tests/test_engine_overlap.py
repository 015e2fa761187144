"""Overlapped decode (engine/overlap.py) gives exactly the synchronous engine's outputs.

1. The control logic alone: Scheduler + StepPipeline over a slot-level fake runner (it "writes
   KV" by storing each token in its cache slot and samples a function of the context it reads
   back through the block table, as tests/test_scheduler.py; a token gathered from the previous
   step stands for the device-side gather). Random arrivals, stop tokens, aborts and tiny pools
   (preemption): every request's tokens equal the reference, with the pipeline on and off.
2. SmolLM2 on the torch CPU path, overlap on vs off, streamed deltas compared one by one:
   EOS, max_tokens 1 and 2, stop strings and tokens, an abort mid-decode, requests joining while
   others decode, preemption in a tiny pool, prefix-cache hits.
3. The Triton path (TRITON_INTERPRET=1, static decode buffers, dummy:tiny).
And that the overlap happens: steps are launched before the previous step's tokens are read.
"""
from __future__ import annotations

import os
import random
import time
from typing import NamedTuple

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before any kernel module is imported

from splitserve.config import SchedulerConfig  # noqa: E402
from splitserve.engine.block_pool import BlockPool  # noqa: E402
from splitserve.engine.overlap import StepPipeline  # noqa: E402
from splitserve.engine.request import FinishReason, Request, SamplingParams  # noqa: E402
from splitserve.engine.scheduler import Scheduler  # noqa: E402

from .conftest import make_engine  # noqa: E402


# ------------------------------------------------------------------ 1. control logic, fake runner
def next_token(ctx: list[int]) -> int:
    return (sum(t * (i + 1) for i, t in enumerate(ctx)) * 2654435761) % 97 + 3


def reference(prompt: list[int], params: SamplingParams, max_model_len: int) -> list[int]:
    toks, out = list(prompt), []
    while len(out) < params.max_tokens and len(toks) < max_model_len:
        out.append(next_token(toks))
        toks.append(out[-1])
        if out[-1] in params.stop_token_ids:
            break
    return out


class FakeStep(NamedTuple):
    sched: object
    reqs: list
    greedy: list

    def wait(self) -> None:
        pass


class SlotRunner:
    """launch() computes at once (as the CPU path does); a token the host does not know yet is
    taken from the previous step's samples, as the device-side gather does."""

    def __init__(self, block_size: int):
        self.bs = block_size
        self.kv: dict[int, tuple[int, int]] = {}      # slot -> (position, token)
        self.log: list[tuple[str, int]] = []
        self.last_pos: dict[str, int] = {}             # request id -> last position computed

    def launch(self, out, prev=None, after_layer=None):
        bs, reqs, toks = self.bs, [], []
        prev_tokens = {r.request_id: t for r, t in zip(prev.reqs, prev.greedy)} if prev else {}
        for c in out.chunks:
            req, table = c.request, c.request.block_ids
            for p in range(c.start, c.start + c.num_new_tokens):
                tok = req.token_id(p) if p < req.num_tokens else prev_tokens[req.request_id]
                self.kv[table[p // bs] * bs + p % bs] = (p, tok)
                self.last_pos[req.request_id] = p
            if c.samples:
                n = c.start + c.num_new_tokens
                ctx = [self.kv[table[p // bs] * bs + p % bs] for p in range(n)]
                assert [p for p, _ in ctx] == list(range(n)), f"{req.request_id}: KV read back is wrong"
                reqs.append(req)
                toks.append(next_token([t for _, t in ctx]))
        step = FakeStep(out, reqs, toks)
        self.log.append(("launch", id(step)))
        return step

    def collect(self, step) -> dict[str, int]:
        self.log.append(("collect", id(step)))
        return {r.request_id: t for r, t in zip(step.reqs, step.greedy)}

    def execute(self, out, after_layer=None) -> dict[str, int]:
        return self.collect(self.launch(out))


def run_fake(overlap: bool, seed: int):
    rng = random.Random(seed)
    bs, n = 4, rng.randint(2, 9)
    prompts = [[rng.randint(3, 99) for _ in range(rng.randint(1, 20))] for _ in range(n)]
    params = [SamplingParams(max_tokens=rng.choice([1, 2, 3, 8, 20, 30]), ignore_eos=True,
                             stop_token_ids=(rng.randint(3, 99),) if rng.random() < 0.5 else ())
              for _ in range(n)]
    longest = max(-(-(len(p) + sp.max_tokens) // bs) for p, sp in zip(prompts, params))
    pool = BlockPool(max(longest, rng.choice([longest, 16, 24, 64])), bs, hash_seed=11)
    max_model_len = rng.choice([10_000, 10_000, 24])      # 24: some requests end by the model length
    sched = Scheduler(SchedulerConfig(max_num_seqs=rng.choice([2, 4, 8]),
                                      max_num_batched_tokens=rng.choice([16, 32])), pool, max_model_len)
    runner = SlotRunner(bs)
    pipe = StepPipeline(sched, runner, overlap)
    reqs = [Request(f"r{i}", list(p), sp) for i, (p, sp) in enumerate(zip(prompts, params))]
    arrive = {i: rng.choice([0, 0, 1, 3, 7]) for i in range(n)}
    aborts = {rng.randrange(n): rng.randint(1, 12)} if rng.random() < 0.5 else {}
    step = 0
    while step <= 12 or sched.has_unfinished or pipe.in_flight is not None:
        for i, r in enumerate(reqs):
            if arrive[i] == step:
                sched.add_request(r)
            if aborts.get(i) == step:
                sched.abort_request(r.request_id)
        done = pipe.step()
        if done is not None:
            sched.update_from_output(*done)
        pool.check_integrity()
        step += 1
    assert pool.num_used_blocks == 0
    return reqs, aborts, pipe.num_run_behind, runner, max_model_len


@pytest.mark.parametrize("seed", range(40))
def test_fake_pipeline_equals_reference(seed):
    for overlap in (False, True):
        reqs, aborts, behind, _, max_model_len = run_fake(overlap, seed)
        for i, r in enumerate(reqs):
            ref = reference(r.prompt_token_ids, r.params, max_model_len)
            if i in aborts and r.finish_reason is FinishReason.ABORT:
                assert r.output_token_ids == ref[:len(r.output_token_ids)]
                continue
            assert r.output_token_ids == ref, f"seed {seed} overlap {overlap}: {r.request_id}"
            want = FinishReason.STOP if ref[-1] in r.params.stop_token_ids else FinishReason.LENGTH
            assert r.finish_reason is want
        if not overlap:
            assert behind == 0


def test_fake_pipeline_overlaps_and_preempts():
    """Across the seeds, steps do run behind unread ones, and tiny pools do preempt (the
    pipeline then falls back: a request in flight is never preempted, which would raise)."""
    behind = preempted = 0
    for seed in range(40):
        reqs, _, b, runner, _ = run_fake(True, seed)
        behind += b
        preempted += sum(r.num_preemptions for r in reqs)
        launched = [x for kind, x in runner.log if kind == "launch"]
        collected = [x for kind, x in runner.log if kind == "collect"]
        assert collected == launched        # every step read once, in launch order
        for r in reqs:                      # a request that ends by count gets no row after its last token
            if r.finish_reason is FinishReason.LENGTH:
                assert runner.last_pos[r.request_id] == r.num_tokens - 2, r.request_id
    assert behind > 50 and preempted > 0


def test_block_table_rows_equal_a_fresh_table():
    """The persistent block table (only changed rows rewritten) always reads like one padded
    from scratch: lists grow in place, leave (later rows move up), join, or are replaced."""
    from splitserve.engine.cuda_graph import BlockTableRows
    rng, width = random.Random(0), 12
    rows = BlockTableRows(np.zeros((8, width), dtype=np.int32))
    lists = [[rng.randrange(100)] for _ in range(5)]
    for _ in range(400):
        op = rng.random()
        if op < 0.5:
            for t in rng.sample(lists, min(2, len(lists))):
                t.extend(rng.randrange(100) for _ in range(rng.randint(0, 2)) if len(t) < width)
        elif op < 0.65 and len(lists) > 1:
            lists.pop(rng.randrange(len(lists)))
        elif op < 0.8 and len(lists) < 8:
            lists.insert(rng.choice([0, len(lists)]), [rng.randrange(100) for _ in range(rng.randint(0, 5))])
        elif lists:
            i = rng.randrange(len(lists))
            lists[i] = list(lists[i]) if rng.random() < 0.5 else [rng.randrange(100)]
        rows.write(lists)
        for i, t in enumerate(lists):
            assert rows.table[i, :len(t)].tolist() == t
    with pytest.raises(ValueError, match="blocks"):
        rows.write([list(range(width + 1))])


# ------------------------------------------------------------------ 2. SmolLM2, torch CPU path
NEW = 12


def _stream(eng, script: list[tuple[int, str, dict]], aborts: dict[str, int] = {}) -> dict[str, list]:
    """Run the engine step by step: script = (call index, request id, add_request kwargs);
    aborts = request id -> call index. Returns request id -> its deltas."""
    got: dict[str, list] = {}
    step = 0
    while step <= max(c for c, _, _ in script) or eng.has_unfinished():
        for at, rid, kw in script:
            if at == step:
                eng.add_request(request_id=rid, **kw)
        for rid, at in aborts.items():
            if at == step:
                eng.abort(rid)
        for o in eng.step():
            got.setdefault(o.request_id, []).append(
                (o.new_token_ids, o.new_text, o.finished, o.finish_reason, o.num_cached_tokens, o.text))
            if o.finished:
                assert set(o.timings) == {"ttft_s", "e2e_s", "tpot_s"} and o.timings["ttft_s"] > 0
        step += 1
    eng.pool.check_integrity()
    assert eng.pool.num_used_blocks == 0 and eng.pipeline.in_flight is None
    return got


@pytest.fixture(scope="module")
def engines():
    return {ov: make_engine(scheduler={"overlap_decode": ov}) for ov in (False, True)}


def _both(engines, script, aborts={}, reset=True, decodes=True):
    """The same script through the synchronous and the overlapped engine: equal deltas."""
    out = {}
    for ov, eng in engines.items():
        if reset:
            eng.pool.reset_prefix_cache()
        before = eng.pipeline.num_run_behind
        out[ov] = _stream(eng, script, aborts)
        assert (eng.pipeline.num_run_behind > before) == (ov and decodes)
    for rid in out[False]:
        assert out[True][rid] == out[False][rid], rid
    assert out[True].keys() == out[False].keys()
    return out[True]


def _count_preemptions(eng) -> list:
    seen, schedule = [], eng.scheduler.schedule

    def counted():
        out = schedule()
        seen.extend(out.preempted)
        return out
    eng.scheduler.schedule = counted
    return seen


def test_mixed_batch_matches_sync(engines):
    """EOS (chat prompts end on their own), max_tokens 1 and 2, a stop string and a stop token
    from an ignore-eos reference run, an abort mid-decode, requests joining while others decode."""
    ref = engines[False].generate(["The capital of France is", "def fibonacci(n):"],
                                  SamplingParams(max_tokens=NEW, ignore_eos=True))
    stop_text = ref[0].text[len(ref[0].text) // 2:][:3]
    stop_tok = ref[1].token_ids[5]
    chat = [{"role": "user", "content": "What is 2+2? Answer with one number."}]
    script = [
        (0, "eos", dict(messages=chat, params=SamplingParams(max_tokens=40))),
        (0, "stop-str", dict(prompt="The capital of France is", params=SamplingParams(max_tokens=NEW, stop=(stop_text,)))),
        (0, "stop-tok", dict(prompt="def fibonacci(n):", params=SamplingParams(max_tokens=NEW, stop_token_ids=(stop_tok,)))),
        (0, "one", dict(prompt="1, 2, 3, 4,", params=SamplingParams(max_tokens=1))),
        (0, "aborted", dict(prompt="Once upon a time, in a small village by the sea,", params=SamplingParams(max_tokens=NEW))),
        (2, "two", dict(prompt="List three primary colors:", params=SamplingParams(max_tokens=2))),
        (4, "late", dict(prompt="Translate to French: I like apples.", params=SamplingParams(max_tokens=NEW))),
        (7, "later", dict(prompt="Q: What is 12 times 7?\nA:", params=SamplingParams(max_tokens=NEW, ignore_eos=True))),
    ]
    got = _both(engines, script, aborts={"aborted": 6})
    final = {rid: d[-1] for rid, d in got.items()}
    assert final["eos"][3] == "stop" and len(final["eos"][5]) > 0
    assert final["stop-str"][3] == "stop" and stop_text not in final["stop-str"][5]
    assert final["stop-tok"][3] == "stop"
    assert final["one"][3] == "length" and len(got["one"]) == 1
    assert final["two"][3] == "length" and sum(len(d[0]) for d in got["two"]) == 2
    assert not final["aborted"][2] and 0 < sum(len(d[0]) for d in got["aborted"]) < NEW
    assert final["later"][3] == "length"


def test_prefix_cache_hits_match_sync(engines):
    prompts = ["The theory of relativity, proposed by Albert Einstein in the early twentieth century, describes how",
               "Once upon a time, in a small village by the sea, there lived an old fisherman who"]   # > 16 tokens
    warm = [(0, f"warm{i}", dict(prompt=p, params=SamplingParams(max_tokens=1))) for i, p in enumerate(prompts)]
    _both(engines, warm, decodes=False)
    again = [(0, f"hit{i}", dict(prompt=p, params=SamplingParams(max_tokens=NEW, ignore_eos=True)))
             for i, p in enumerate(prompts)]
    got = _both(engines, again, reset=False)
    assert all(d[-1][4] > 0 for d in got.values()), "expected prefix-cache hits"


def test_preemption_matches_sync():
    """A pool this small preempts during decode (the run-behind falls back for it)."""
    script = [(0, f"p{i}", dict(prompt=p, params=SamplingParams(max_tokens=24, ignore_eos=True)))
              for i, p in enumerate(["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,",
                                     "List three primary colors:", "Q: What is 12 times 7?\nA:"])]
    engines = {ov: make_engine(cache={"num_blocks": 9}, scheduler={"max_num_batched_tokens": 16, "overlap_decode": ov})
               for ov in (False, True)}
    preempted = {ov: _count_preemptions(eng) for ov, eng in engines.items()}
    _both(engines, script)
    assert preempted[True] and preempted[False]


def test_overlap_happens(engines):
    """With the switch on, decode steps are launched before the previous step's tokens are read;
    with it off, every step is read before the next one is launched."""
    script = [(0, f"d{i}", dict(prompt=p, params=SamplingParams(max_tokens=16, ignore_eos=True)))
              for i, p in enumerate(["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,"])]
    ahead = {}
    for ov, eng in engines.items():
        log, runner = [], eng.runner
        launch, collect = runner.launch, runner.collect
        runner.launch = lambda *a, **k: log.append("L") or launch(*a, **k)
        runner.collect = lambda s: log.append("C") or collect(s)
        try:
            _stream(eng, script)
        finally:
            del runner.launch, runner.collect
        # a launch while another launched step is unread = a step run behind
        unread, ahead[ov] = 0, 0
        for x in log:
            ahead[ov] += x == "L" and unread > 0
            unread += 1 if x == "L" else -1
        assert unread == 0
    assert ahead[False] == 0
    assert ahead[True] >= 12       # 3 requests x 16 tokens: all decode steps but the first run behind


def test_engine_loop_thread_matches_sync(engines):
    """Through the workers' EngineLoop (engine stepped on its own thread, RPCs between steps):
    requests added while others decode finish with the synchronous engine's outputs."""
    from splitserve.engine.loop import EngineLoop
    prompts = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,", "List three primary colors:"]
    final = {}
    for ov, eng in engines.items():
        loop, got = EngineLoop(eng), {}
        try:
            for i, p in enumerate(prompts):
                loop.run(lambda e, i=i, p=p: e.add_request(p, SamplingParams(max_tokens=10 + i), request_id=f"t{i}"))
                got.update((o.request_id, o) for o in loop.take_outputs(1.0) if o.finished)
            while len(got) < len(prompts):
                got.update((o.request_id, o) for o in loop.take_outputs(1.0) if o.finished)
            deadline = time.monotonic() + 30          # the loop also reads the last step in flight
            while loop.run(lambda e: e.has_unfinished()) and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            loop.stop()
        assert eng.pool.num_used_blocks == 0 and eng.pipeline.in_flight is None
        final[ov] = {rid: (o.token_ids, o.text, o.finish_reason) for rid, o in got.items()}
    assert final[True] == final[False]


# ------------------------------------------------------------------ 3. Triton path (interpreter on CPU)
def _triton_engine(overlap: bool, device: str):
    from splitserve.config import Config
    from splitserve.engine.engine import LLMEngine
    cfg = Config().replace("model", model="dummy:tiny", device=device, dtype="float16", seed=3)
    cfg = cfg.replace("cache", num_blocks=48)
    cfg = cfg.replace("scheduler", max_num_batched_tokens=24, max_num_seqs=8, max_model_len=256, overlap_decode=overlap)
    return LLMEngine.from_config(cfg, attention="triton")


def test_triton_path_matches_sync():
    from splitserve.kernels.testing import setup_kernel_tests
    device = setup_kernel_tests()
    script = [(0, "a", dict(prompt=[7, 300, 21, 5, 90], params=SamplingParams(max_tokens=6, ignore_eos=True))),
              (0, "b", dict(prompt=list(range(40, 57)), params=SamplingParams(max_tokens=2, ignore_eos=True))),
              (0, "c", dict(prompt=[11], params=SamplingParams(max_tokens=5, ignore_eos=True))),
              (3, "d", dict(prompt=[3, 4], params=SamplingParams(max_tokens=4, ignore_eos=True)))]
    engines = {ov: _triton_engine(ov, device) for ov in (False, True)}
    graph_runs = []
    for eng in engines.values():
        assert eng.runner.decode_graphs is not None
        run = eng.runner.decode_graphs.run
        eng.runner.decode_graphs.run = lambda inp, run=run: graph_runs.append(inp.prev is not None) or run(inp)
    _both(engines, script, reset=False)
    assert any(graph_runs), "no decode step gathered its input ids from the previous step"
