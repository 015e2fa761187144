"""Sampling: parameter validation, seeded reproducibility, and the distributions top-k/top-p keep."""
from __future__ import annotations

import pytest
import torch

from splitserve.engine.request import SamplingParams
from splitserve.engine.sampler import Sampler, filter_top_k_top_p

from .conftest import make_engine


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": -0.1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"), ({"seed": "x"}, "seed"), ({"stop": ("",)}, "stop"),
])
def test_bad_params_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def _empirical(logits, n, **kw):
    sampler = Sampler("cpu")
    rows = logits.expand(n, -1).contiguous()
    params = [SamplingParams(**kw, seed=1)] * n
    # one request id with one generator: n successive draws from the same distribution
    toks = [sampler.sample(rows[i:i + 1], ["r"], params[i:i + 1])[0] for i in range(n)]
    return torch.bincount(torch.tensor(toks), minlength=logits.shape[-1]).float() / n


def _expected(logits, temperature=1.0, top_k=0, top_p=1.0):
    return torch.softmax(filter_top_k_top_p(logits / temperature, top_k, top_p), -1)


LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
N = 6000


def _close(freq, exp):
    # binomial std of a frequency is sqrt(p(1-p)/N) <= 0.0065 at N=6000; 5 sigma is 0.033
    assert torch.all((freq - exp).abs() < 0.033), (freq, exp)
    assert torch.all(freq[exp == 0] == 0), "a filtered-out token was sampled"


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.5), dict(temperature=1.0, top_k=3),
                                dict(temperature=1.0, top_p=0.7), dict(temperature=2.0, top_k=5, top_p=0.9)])
def test_distribution_matches(kw):
    _close(_empirical(LOGITS, N, **kw), _expected(LOGITS, **kw))


def test_model_dtype_logits_sample_as_their_float32_cast():
    """Decode graphs hand the sampler bf16 logits: the same seeded draws and greedy picks as the
    exact float32 cast of the same values (the temperature math runs in float32 either way)."""
    gen = torch.Generator().manual_seed(3)
    low = (torch.randn(4, 97, generator=gen) * 3).to(torch.bfloat16)
    low[1, 10] = low[1, 11] = low[1].max() + 1            # a tie: the first index wins in both
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.8, top_k=20, seed=5), SamplingParams(temperature=1.3, top_p=0.9, seed=6)]
    ids = ["a", "b", "c", "d"]

    def draws(logits):      # 300 successive steps of each request (one generator per request)
        sampler = Sampler("cpu")
        return [sampler.sample(logits, ids, params) for _ in range(300)]
    want = draws(low.float())
    assert draws(low) == want
    assert {w[1] for w in want} == {10} and len({w[3] for w in want}) > 5


def test_top_p_keeps_the_crossing_token():
    probs = torch.softmax(LOGITS, -1)                       # [0.37, 0.22, 0.14, ...]
    kept = filter_top_k_top_p(LOGITS, 0, 0.5) > float("-inf")
    assert kept.tolist()[:3] == [True, True, False]        # 0.37 < 0.5, 0.37 + 0.22 >= 0.5
    assert probs[:2].sum() >= 0.5
    assert filter_top_k_top_p(LOGITS, 1, 1.0).isfinite().sum() == 1


@pytest.fixture(scope="module")
def tiny_engine():
    return make_engine("dummy:tiny")


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_engine):
    p = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    alone = tiny_engine.generate(["hello"], p)[0].token_ids
    again = tiny_engine.generate(["hello"], p)[0].token_ids
    others = [SamplingParams(max_tokens=10, temperature=0.7, seed=s, ignore_eos=True) for s in range(4)]
    batched = tiny_engine.generate(["xyz", "hello", "a b", "q", "long prompt here"], [others[0], p] + others[1:])
    assert alone == again == batched[1].token_ids
    other_seed = tiny_engine.generate(["hello"], SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95,
                                                                seed=99, ignore_eos=True))[0].token_ids
    assert other_seed != alone


def test_stop_token_and_stop_string(tiny_engine):
    base = tiny_engine.generate(["abc"], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    stop_tok = base.token_ids[5]
    out = tiny_engine.generate(["abc"], SamplingParams(max_tokens=12, stop_token_ids=(stop_tok,),
                                                       ignore_eos=True))[0]
    first = base.token_ids.index(stop_tok)
    assert out.token_ids == base.token_ids[:first + 1] and out.finish_reason == "stop"
    text = base.text
    if len(text) >= 3:
        needle = text[1:3]
        out = tiny_engine.generate(["abc"], SamplingParams(max_tokens=12, stop=(needle,), ignore_eos=True))[0]
        assert out.finish_reason == "stop" and out.text == text[:text.index(needle)]


def test_max_tokens_and_bad_prompt(tiny_engine):
    out = tiny_engine.generate(["abc"], SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"
    with pytest.raises(ValueError, match="empty"):
        tiny_engine.add_request("")
    with pytest.raises(ValueError, match="out of range"):
        tiny_engine.add_request([10 ** 6])
    with pytest.raises(ValueError, match="limit"):
        tiny_engine.add_request([5] * 5000)
