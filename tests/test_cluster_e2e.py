"""The disaggregated cluster end to end: a real local Ray cluster, real SmolLM2 workers, KV over
UCX, the gRPC API. Outputs are compared with the single-process engine (itself equal to
transformers). Failure tests kill real worker processes (os._exit at an injected point).

One cluster (2 prefill + 2 decode) serves the whole module; tests that kill workers add
replacements, and every test ends with check_integrity on every live worker.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import grpc
import pytest

from splitserve.config import Config
from splitserve.engine.request import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SHORT = ["Hi!", "What is 2+2?", "Name a color.", "Say yes."]
# with the chat template's system prompt SHORT prompts are ~35 tokens (local prefill: threshold 48)
LONG = [  # longer than local_prefill_max_tokens: prefilled remotely
    "Write a short story about a lighthouse keeper who finds a message in a bottle. The story should "
    "have a beginning, a middle and an end, and mention the sea, the wind and a small boat.",
    "Explain the difference between prefill and decode in large language model inference, and why "
    "separating them onto different machines can reduce interference between requests.",
    "List ten animals that live in the ocean, and for each one give a single sentence describing "
    "where it lives and what it eats, keeping every sentence under twenty words.",
    "Summarize the plot of a detective novel in which the detective is a retired chess champion who "
    "solves a murder at a tournament by noticing a move that no strong player would make.",
]
NEW = 24


class LiveCluster:
    """A ServingCluster driven by an asyncio loop on a background thread."""

    def __init__(self, config: Config):
        from splitserve.deploy.ray_cluster import ServingCluster
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.cluster = ServingCluster(config)
        self.run(self.cluster.start(), timeout=600)
        self.address = f"127.0.0.1:{self.cluster.grpc_port}"

    def run(self, coro, timeout=300):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, name, method, *args):
        return self.run(self.cluster.pool.call(name, method, *args))

    def live(self, role):
        return self.cluster.pool.names(role)

    def check_integrity(self):
        for role in ("prefill", "decode"):
            for name in self.live(role):
                deadline = time.time() + 30
                while True:
                    r = self.call(name, "check_integrity")
                    idle = (r["live_leases"] == 0 and r["in_flight_blocks"] == 0 and not r["unfinished"])
                    if idle or time.time() > deadline:
                        break
                    time.sleep(0.2)
                assert idle, f"{name} not clean after the test: {r}"

    def stop(self):
        self.run(self.cluster.stop())
        import ray
        ray.shutdown()


@pytest.fixture(scope="module")
def live():
    cfg = (Config().replace("model", device="cpu")
           .replace("cluster", num_prefill=2, num_decode=2)
           .replace("router", grpc_port=0, metrics_port=0, local_prefill_max_tokens=48)
           .replace("transfer", lease_timeout_s=20.0))
    c = LiveCluster(cfg)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def reference():
    """Greedy outputs of the single-process engine (equal to transformers, tests/test_engine_vs_hf.py)."""
    from .conftest import make_engine
    eng = make_engine()
    cache: dict[tuple, list[int]] = {}

    def ref(prompt: str, n: int = NEW) -> list[int]:
        key = (prompt, n)
        if key not in cache:
            msgs = [{"role": "user", "content": prompt}]
            cache[key] = eng.generate([eng.tokenizer.encode(eng.tokenizer.apply_chat_template(msgs))],
                                      SamplingParams(max_tokens=n, ignore_eos=True))[0].token_ids
        return cache[key]
    return ref


def _req(prompt, n=NEW, **kw):
    from splitserve.client import make_request
    return make_request(messages=[{"role": "user", "content": prompt}], max_tokens=n, ignore_eos=True, **kw)


def _run_many(address, prompts, n=NEW):
    from splitserve.client import Client
    client = Client(address)
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as ex:
        results = list(ex.map(lambda p: client.generate(_req(p, n)), prompts))
    client.close()
    return results


def test_greedy_equals_engine_mixed_local_and_remote(live, reference):
    prompts = SHORT + LONG
    results = _run_many(live.address, prompts)
    for p, r in zip(prompts, results):
        assert r.token_ids == reference(p), p
        assert r.info["complete_token_ids"] == r.token_ids and r.finish_reason == "length"
        assert set(r.timing) >= {"ttft_ms", "e2e_ms"}
    remote = [r.info["remote_prefill"] for r in results]
    assert remote == [False] * len(SHORT) + [True] * len(LONG)
    assert all(r.timing.get("transfer_ms", 0) > 0 for r in results[len(SHORT):])
    live.check_integrity()


def test_32_concurrent_streams(live, reference):
    prompts = [(SHORT + LONG)[i % 8] for i in range(32)]
    results = _run_many(live.address, prompts, n=8)
    for p, r in zip(prompts, results):
        assert r.token_ids == reference(p, 8)
    assert {r.info["decode_worker"] for r in results} == set(live.live("decode")), "load spread over both D"
    live.check_integrity()


def test_errors_have_grpc_codes(live):
    from splitserve.client import Client, make_request
    client = Client(live.address)
    with pytest.raises(grpc.RpcError) as e:
        client.generate(make_request("hi", temperature=-1.0))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
        client.generate(make_request(token_ids=[10 ** 7]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = client.model_info()
    assert info["num_decode_workers"] == 2 and info["vocab_size"] == 49152
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    h = health_pb2_grpc.HealthStub(client.channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert h.status == health_pb2.HealthCheckResponse.SERVING
    client.close()


def test_client_cancel_frees_blocks_on_both_sides(live):
    from splitserve.client import Client
    client = Client(live.address)
    for prompt in (SHORT[0], LONG[0]):
        stream = client.stream(_req(prompt, 200))
        got = 0
        for reply in stream:
            got += reply.WhichOneof("kind") == "chunk"
            if got >= 2:
                stream.cancel()
                break
    client.close()
    live.check_integrity()


def test_prefill_worker_dies_before_and_during_push(live, reference):
    for fault in ("die_before_push", "die_mid_push"):
        victim = sorted(live.live("prefill"))[0]
        other = [p for p in live.live("prefill") if p != victim]
        live.call(victim, "inject_fault", fault, 0)
        # make the victim the least loaded so the policy picks it
        results = _run_many(live.address, [LONG[1]])
        r = results[0]
        assert r.token_ids == reference(LONG[1]), fault
        assert victim not in live.live("prefill")
        assert r.info["prefill_retries"] >= 1 or r.info["prefill_worker"] in other
        live.run(live.cluster.add_worker("prefill"))
        live.check_integrity()


def test_prefill_runs_while_the_decode_worker_reserves(live, reference):
    """router.overlap_reserve: P starts on the prompt while D reserves; here D's reservation is
    held back 1.5 s, so P finishes its forward first, notes every layer, and pushes them all when
    the handoff arrives. Same tokens; the first token comes sooner than reserve + prefill."""
    for d in live.live("decode"):
        live.call(d, "inject_fault", "slow_reserve", 1500)
    try:
        r = _run_many(live.address, [LONG[2]])[0]
    finally:
        for d in live.live("decode"):
            live.call(d, "inject_fault", "", 0)
    assert r.token_ids == reference(LONG[2])
    assert r.info["remote_prefill"], r.info
    t = r.timing
    assert t["reserve_ms"] >= 1500 and t["prefill_ms"] > 0, t
    assert t["ttft_ms"] < t["reserve_ms"] + t["prefill_ms"], t
    live.check_integrity()


def test_decode_worker_dies_mid_stream(live, reference):
    from splitserve.client import Client
    for name in live.live("decode"):
        live.call(name, "inject_fault", "die_after_tokens", 6)
    # one victim at a time: disarm all but the first
    names = sorted(live.live("decode"))
    for name in names[1:]:
        live.call(name, "inject_fault", "none", 0)
    live.run(live.cluster.add_worker("decode"))
    client = Client(live.address)
    results = []
    for prompt in (SHORT[1], LONG[2]):
        chunks = []
        r = client.generate(_req(prompt, 32), on_chunk=lambda ids, text: chunks.append(ids))
        results.append(r)
        flat = [t for c in chunks for t in c]
        assert flat == r.token_ids == reference(prompt, 32), "tokens lost or duplicated across the migration"
    assert sum(r.info["migrations"] for r in results) >= 1
    assert names[0] not in live.live("decode")
    client.close()
    live.check_integrity()


def test_pool_resized_while_requests_run(live, reference):
    prompts = (SHORT + LONG) * 2
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        fut = ex.submit(_run_many, live.address, prompts, 16)
        time.sleep(2.0)
        added = live.run(live.cluster.add_worker("decode"))
        victim = sorted(live.live("prefill"))[0]
        live.run(live.cluster.remove_worker(victim), timeout=600)
        results = fut.result(timeout=600)
    for p, r in zip(prompts, results):
        assert r.token_ids == reference(p, 16)
    assert added in live.live("decode") and victim not in live.live("prefill")
    live.check_integrity()


def test_abort_rpc_and_overload(live):
    import dataclasses
    from splitserve.client import Client, make_request
    client = Client(live.address)
    stream = client.stream(make_request(messages=[{"role": "user", "content": SHORT[1]}], request_id=777,
                                        max_tokens=200, ignore_eos=True))
    kinds = []
    for reply in stream:
        kinds.append(reply.WhichOneof("kind"))
        if len(kinds) == 2:
            assert client.abort(777) is True
        if kinds[-1] == "complete":
            assert reply.complete.finish_reason == "abort"
    assert kinds[-1] == "complete" and len(kinds) < 100
    assert client.abort(777) is False
    router = live.cluster.router
    saved = router.config
    router.config = dataclasses.replace(saved, max_queued_requests=1)
    try:
        first = client.stream(_req(SHORT[0], 50))
        next(iter(first))                      # the first request is in flight
        with pytest.raises(grpc.RpcError) as e:
            client.generate(_req(SHORT[2], 4))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        first.cancel()
    finally:
        router.config = saved
    client.close()
    live.check_integrity()


def test_metrics_from_router_and_every_worker(live):
    import urllib.request
    _run_many(live.address, [LONG[0]], n=4)    # at least one remote prefill since the cluster started

    def scrape(port):
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    text = scrape(live.cluster.metrics.port)
    for name in ("splitserve_ttft_seconds_count", "splitserve_tpot_seconds_count", "splitserve_e2e_seconds_count",
                 'splitserve_requests_total{outcome="length"}', "splitserve_kv_blocks_free",
                 "splitserve_kv_transfer_seconds_count", "splitserve_worker_queue_depth"):
        assert name in text, name
    for role in ("prefill", "decode"):
        for name in live.live(role):
            snap = live.call(name, "snapshot")
            wtext = scrape(snap["metrics_port"])
            assert "splitserve_engine_kv_blocks_free" in wtext and "splitserve_kvtransfer_" in wtext, name


def test_cli_client_against_the_cluster(live):
    import json
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "splitserve", "client", "--address", live.address, "--prompt",
                          "Name a color.", "--chat", "--max-tokens", "6", "--json"],
                         capture_output=True, text=True, timeout=300, check=True)
    obj = json.loads(out.stdout)
    assert obj["finish_reason"] in ("stop", "length") and 0 < len(obj["token_ids"]) <= 6
    assert set(obj["timing"]) >= {"ttft_ms", "e2e_ms"}


def test_1p1d_greedy_equals_engine(live, reference):
    """Shrink the pools to one prefill and one decode worker (drain + stop) and compare again."""
    for role in ("prefill", "decode"):
        for name in sorted(live.live(role))[1:]:
            live.run(live.cluster.remove_worker(name), timeout=600)
    assert len(live.live("prefill")) == 1 and len(live.live("decode")) == 1
    prompts = [SHORT[0], LONG[0], LONG[3]]
    for p, r in zip(prompts, _run_many(live.address, prompts)):
        assert r.token_ids == reference(p)
        if r.info["remote_prefill"]:   # the KV was pushed layer by layer inside the prefill's step
            assert r.timing.get("overlapped_ms", 0) > 0, r.timing
    live.check_integrity()


def test_no_decode_worker_left_is_unavailable(live):
    from splitserve.client import Client
    for name in list(live.live("decode")):
        live.run(live.cluster.remove_worker(name), timeout=600)
    client = Client(live.address)
    with pytest.raises(grpc.RpcError) as e:
        client.generate(_req(SHORT[0], 4), timeout=60)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    client.close()
