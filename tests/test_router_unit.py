"""The router's request lifecycle against an in-process fake worker pool (fault-injection style
fake; the real pool of Ray actors is exercised in tests/test_cluster_e2e.py)."""
from __future__ import annotations

import asyncio

import pytest

from splitserve.config import RouterConfig
from splitserve.engine.tokenizer import byte_tokenizer
from splitserve.router.policy import build_policy
from splitserve.router.router import Router


class FakePool:
    """One decode worker that 'generates' token t+1 after t, streaming through the router's callback."""

    def __init__(self, decode=("d0",)):
        self.dead = frozenset()
        self.on_decode_output = self.on_decode_died = None
        self._decode = list(decode)
        self.calls = []

    def names(self, role):
        return self._decode if role == "decode" else []

    def decode_names(self):
        return self._decode

    def snapshots(self, role):
        return [{"name": n, "role": role, "num_running": 0, "num_waiting": 0, "num_transferring": 0,
                 "free_blocks": 1000, "total_blocks": 1000, "block_size": 16, "draining": False}
                for n in self.names(role)]

    async def call(self, name, method, *args):
        self.calls.append((name, method))
        if method == "generate_local":
            rid, prompt, params = args
            asyncio.get_running_loop().call_soon(self._stream, name, rid, prompt[-1], params["max_tokens"])

    async def try_call(self, name, method, *args):
        return await self.call(name, method, *args)

    def _stream(self, name, rid, last, n):
        for i in range(n):
            self.on_decode_output(name, {"request_id": rid, "offset": i, "new_token_ids": [last + 1 + i],
                                         "finished": i == n - 1, "finish_reason": "length",
                                         "num_cached_tokens": 0, "num_prompt_tokens": 3})


def _router(policy="load_aware", **cfg):
    rc = RouterConfig(**cfg)
    return Router(rc, byte_tokenizer(512, (1,)), 256, FakePool(), build_policy(policy, rc))


async def _collect(router, flight):
    return [ev async for ev in router.generate(flight)]


def test_stream_and_timing_breakdown():
    async def go():
        r = _router()
        f = r.admit(None, [5, 6, 7], None, {"max_tokens": 4})
        return await _collect(r, f)
    evs = asyncio.run(go())
    assert [e.kind for e in evs] == ["chunk"] * 4 + ["complete"]
    assert [t for e in evs[:-1] for t in e.token_ids] == [8, 9, 10, 11]
    info = evs[-1].info
    assert info["token_ids"] == [8, 9, 10, 11] and info["usage"]["completion_tokens"] == 4
    assert set(info["timing"]) == {"queue_ms", "prefill_ms", "transfer_ms", "overlapped_ms", "reserve_ms", "commit_ms",
                                    "decode_ms", "ttft_ms", "e2e_ms"}


def test_bad_input_is_invalid_argument():
    from splitserve.router.router import RequestError
    r = _router()
    with pytest.raises(RequestError) as e:
        r.admit(None, [5], None, {"max_tokens": 4, "top_p": 3.0})
    assert e.value.code == "INVALID_ARGUMENT"
    with pytest.raises(RequestError) as e:
        r.admit(None, [99999], None, {"max_tokens": 4})
    assert e.value.code == "INVALID_ARGUMENT"


def test_slo_aware_admission_refuses_an_impossible_slo_at_once():
    async def go():
        r = _router("slo_aware")
        f = r.admit(None, list(range(2, 200)), None, {"max_tokens": 4}, slo={"ttft_ms": 0.001, "tpot_ms": 0.001})
        evs = await _collect(r, f)
        ok = r.admit(None, [5, 6, 7], None, {"max_tokens": 2})
        return evs, await _collect(r, ok)
    refused, ok = asyncio.run(go())
    assert refused[-1].kind == "error" and refused[-1].info["code"] == "RESOURCE_EXHAUSTED"
    assert "retry after" in refused[-1].info["message"]
    assert ok[-1].kind == "complete"


def test_overload_and_no_decode_worker():
    from splitserve.router.router import RequestError
    r = _router(max_queued_requests=1)
    r.admit(None, [5], None, {"max_tokens": 4})
    with pytest.raises(RequestError) as e:
        r.admit(None, [5], None, {"max_tokens": 4})
    assert e.value.code == "RESOURCE_EXHAUSTED"
    r2 = Router(RouterConfig(), byte_tokenizer(512, (1,)), 256, FakePool(decode=()), build_policy("load_aware", RouterConfig()))
    with pytest.raises(RequestError) as e:
        r2.admit(None, [5], None, {"max_tokens": 4})
    assert e.value.code == "UNAVAILABLE"


def test_prefill_worker_load_counts_only_prefills_in_progress():
    """A remote flight keeps its prefill worker's name while it decodes on D: the prefill
    worker's live count must not include it (it made the SLO-aware policy see a long queue on an
    idle prefill worker and prefill everything on D)."""
    class Pool(FakePool):
        def names(self, role):
            return self._decode if role == "decode" else ["p0"]
    r = Router(RouterConfig(), byte_tokenizer(512, (1,)), 256, Pool(), build_policy("load_aware", RouterConfig()))
    flights = [r.admit(None, [5, 6, 7], None, {"max_tokens": 4}) for _ in range(5)]
    for i, f in enumerate(flights):
        f.decode, f.prefill, f.remote = "d0", "p0", True
        f.t_first = 1.0 if i < 3 else None          # three decoding, two still prefilling
    assert [s["assigned"] for s in r._snapshots("prefill")] == [2]
    assert [s["assigned"] for s in r._snapshots("decode")] == [5]


class ScriptedPool(FakePool):
    """Streams a fixed list of token ids, one per output record."""

    def __init__(self, ids):
        super().__init__()
        self.ids = ids

    def _stream(self, name, rid, last, n):
        for i, t in enumerate(self.ids[:n]):
            self.on_decode_output(name, {"request_id": rid, "offset": i, "new_token_ids": [t],
                                         "finished": i == min(n, len(self.ids)) - 1, "finish_reason": "length",
                                         "num_cached_tokens": 0, "num_prompt_tokens": 3})


@pytest.mark.parametrize("stop", [(), ("東",)])
def test_streamed_text_is_whole_characters(stop):
    """Multi-byte characters split over tokens (byte tokenizer: id = byte + 2) stream as whole
    characters, the deltas add up to the final text, and a stop string cuts it."""
    text = "aé東b🚀c"
    ids = [b + 2 for b in text.encode()]
    tok = byte_tokenizer(512, (1,))

    async def go():
        r = Router(RouterConfig(), tok, 256, ScriptedPool(ids), build_policy("load_aware", RouterConfig()))
        f = r.admit(None, [5, 6, 7], None, {"max_tokens": len(ids), "stop": list(stop)})
        return await _collect(r, f)
    evs = asyncio.run(go())
    chunks = [e.text for e in evs if e.kind == "chunk"]
    want = text.split(stop[0])[0] if stop else text
    assert "".join(chunks) == want == evs[-1].info["text"]
    assert not any("\ufffd" in c for c in chunks)
    assert evs[-1].info["finish_reason"] == ("stop" if stop else "length")
