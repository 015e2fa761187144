"""Greedy output of the engine equals Hugging Face transformers token for token on SmolLM2.

transformers loads the same GGUF file through its own dequantizer (an independent path); the
engine runs paged KV, continuous batching, chunked prefill, prefix caching and preemption.
"""
from __future__ import annotations

import pytest
import torch

from splitserve.engine.request import SamplingParams

from .conftest import make_engine

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # ~1 min idle; generous for a loaded CI host

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "List three primary colors:",
    "Translate to French: I like apples.",
    "1, 2, 3, 4,",
    "The theory of relativity, proposed by Albert Einstein in the early twentieth century, describes",
    "Q: What is 12 times 7?\nA:",
]
NEW = 64


@pytest.fixture(scope="module")
def hf_outputs(hf_smollm2, smollm2_engine):
    outs = []
    for p in PROMPTS:
        ids = smollm2_engine.tokenizer.encode(p)
        # eos must stop neither side, so all NEW tokens are compared. transformers falls back to the
        # model's eos when given None; an id no token has (-1, with a warning) disables stopping.
        with torch.inference_mode():
            g = hf_smollm2.generate(torch.tensor([ids]), do_sample=False, eos_token_id=-1, pad_token_id=0,
                                    max_new_tokens=NEW, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        outs.append(g[0, len(ids):].tolist())
    return outs


GREEDY = SamplingParams(max_tokens=NEW, ignore_eos=True)


def _check(outs, hf_outputs):
    for i, (o, ref) in enumerate(zip(outs, hf_outputs)):
        assert len(ref) == NEW
        assert o.token_ids == ref, f"prompt {i} ({PROMPTS[i]!r}) diverged: ours {o.token_ids} hf {ref}"


def test_weights_equal_transformers_gguf_loader(hf_smollm2, smollm2_path):
    from splitserve.engine.loader import load_gguf
    ours = load_gguf(smollm2_path, torch.float32, "cpu").weights
    theirs = hf_smollm2.state_dict()
    assert set(ours) <= set(theirs)
    for k, v in ours.items():
        torch.testing.assert_close(v, theirs[k], rtol=0, atol=0, msg=k)


def test_one_at_a_time(smollm2_engine, hf_outputs):
    outs = [smollm2_engine.generate([p], GREEDY)[0] for p in PROMPTS]
    _check(outs, hf_outputs)


def test_one_continuous_batch_mixed_lengths(smollm2_engine, hf_outputs):
    smollm2_engine.pool.reset_prefix_cache()
    _check(smollm2_engine.generate(PROMPTS, GREEDY), hf_outputs)
    smollm2_engine.pool.check_integrity()
    assert smollm2_engine.pool.num_used_blocks == 0


def test_prefix_cache_hit_gives_identical_output(smollm2_engine, hf_outputs):
    eng = smollm2_engine
    eng.pool.reset_prefix_cache()
    eng.generate(PROMPTS, SamplingParams(max_tokens=1))          # warm the prefix cache
    outs = eng.generate(PROMPTS, GREEDY)
    assert sum(o.num_cached_tokens for o in outs) > 0, "expected prefix-cache hits"
    assert any(o.num_cached_tokens > 0 for o in outs[2::4])     # the two long prompts hit
    _check(outs, hf_outputs)


def test_chunked_prefill_and_preemption(hf_outputs):
    """A tiny token budget forces chunked prefill; a tiny pool forces preemption."""
    eng = make_engine(cache={"num_blocks": 40}, scheduler={"max_num_batched_tokens": 16})
    outs = eng.generate(PROMPTS, GREEDY)
    _check(outs, hf_outputs)
    eng.pool.check_integrity()
    assert eng.pool.num_used_blocks == 0


def test_engine_arrivals_interleave(smollm2_engine, hf_outputs):
    """Requests join while others decode (continuous batching through the public API)."""
    eng = smollm2_engine
    eng.pool.reset_prefix_cache()
    ids, final, pending = [], {}, list(enumerate(PROMPTS))
    step = 0
    while pending or eng.has_unfinished():
        if pending and step % 5 == 0:
            i, p = pending.pop(0)
            ids.append(eng.add_request(p, GREEDY, request_id=f"arr-{i}"))
        for out in eng.step():
            if out.finished:
                final[out.request_id] = out
        step += 1
    _check([final[i] for i in ids], hf_outputs)
