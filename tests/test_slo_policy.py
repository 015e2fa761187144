"""SLO-aware placement and admission on crafted snapshots (plain Python: no Ray, no torch)."""
from __future__ import annotations

import pytest

from splitserve.router.cost_model import load_profile
from splitserve.router.policy import NoWorker, Placement
from splitserve.router.slo_policy import SLO, RequestHint, SLOAwarePolicy, SLOPolicyConfig

COST = load_profile("h200-llama3-8b")
TOTAL = COST.kv_capacity_tokens // 16


def dsnap(name, running=0, kv=0, free=TOTAL, cached=0, pending=0, bw=None, **kw):
    s = {"name": name, "role": "decode", "num_running": running, "num_waiting": 0, "num_transferring": 0,
         "free_blocks": free, "total_blocks": TOTAL, "block_size": 16, "draining": False, "assigned": 0,
         "kv_tokens": kv, "cached_prefix_tokens": cached, "pending_prefill_tokens": pending, **kw}
    if bw is not None:
        s["transfer_bw"] = bw
    return s


def psnap(name, queued_s=0.0, cached=0, **kw):
    return {"name": name, "role": "prefill", "num_running": 0, "num_waiting": 0, "num_transferring": 0,
            "free_blocks": 0, "total_blocks": 0, "draining": False, "assigned": 0, "queued_prefill_s": queued_s,
            "cached_prefix_tokens": cached, **kw}


def policy(**kw):
    return SLOAwarePolicy(COST, SLOPolicyConfig(slo=SLO(2.0, 0.05), **kw))


BUSY = dict(running=40, kv=400_000, free=(COST.kv_capacity_tokens - 400_000) // 16)


def test_busy_decode_worker_disaggregates_a_long_prompt():
    place = policy().place(8000, [dsnap("d0", **BUSY)], [psnap("p0")])
    assert place == Placement("d0", "p0")


def test_local_prefill_pays_for_the_batch_it_stalls():
    """A 1k-token chat prompt under a chat SLO (1 s / 30 ms) with the prefill worker 0.1 s behind:
    on a decode worker running 16 requests, a local prefill would be quicker to the first token
    but stall all 16, so it goes remote (without the harm term it went local); with the prefill
    worker 2 s behind, remote would miss the TTFT target and local it is."""
    pol = SLOAwarePolicy(COST, SLOPolicyConfig(slo=SLO(1.0, 0.03)))
    hint = {"max_new_tokens": 128}
    busy = dsnap("d0", running=16, kv=16 * 1200, free=(COST.kv_capacity_tokens - 16 * 1200) // 16)
    busy["assigned"] = 16         # the router's own count of the same flights: not 32 in the batch
    assert pol.place(1066, [busy], [psnap("p0", queued_s=0.1)], hint=hint) == Placement("d0", "p0")
    assert pol.place(1066, [busy], [psnap("p0", queued_s=2.0)], hint=hint) == Placement("d0", None)


def test_transfer_too_slow_prefills_locally():
    slow = dsnap("d0", bw=1e8, **BUSY)                  # 100 MB/s: 8000 tokens = 1 GB = 10 s
    assert policy().place(8000, [slow], [psnap("p0")]) == Placement("d0", None)


def test_decode_side_prefix_hit_means_no_transfer():
    d = [dsnap("d0", **BUSY), dsnap("d1", cached=7800, **BUSY)]
    assert policy().place(8000, d, [psnap("p0")]) == Placement("d1", None)


def test_short_prompt_prefills_locally():
    assert policy().place(300, [dsnap("d0", **BUSY)], [psnap("p0")]).prefill is None


def test_prefill_worker_chosen_by_queue_and_prefix_hit():
    ps = [psnap("p0", queued_s=0.8), psnap("p1", queued_s=0.3, cached=6000), psnap("p2", queued_s=0.2)]
    assert policy().place(8000, [dsnap("d0", **BUSY)], ps).prefill == "p1"


def test_decode_worker_without_kv_room_is_avoided():
    d = [dsnap("d0", free=100), dsnap("d1", **BUSY)]
    assert policy().place(8000, d, [psnap("p0")]).decode == "d1"


def test_slo_impossible_is_rejected_with_retry_hint():
    pol = policy()
    adm = pol.admit(8000, [dsnap("d0", pending=200_000, **BUSY)], [psnap("p0", queued_s=30.0)])
    assert not adm.accepted and adm.placement is None
    assert adm.retry_after_s >= 25.0 and "exceeds the SLO" in adm.reason
    ok = pol.admit(8000, [dsnap("d0", **BUSY)], [psnap("p0")])
    assert ok.accepted and ok.placement == Placement("d0", "p0") and ok.ttft_s < 2.0


def test_priorities_shift_the_admission_threshold():
    pol = policy()
    # prefill alone ~0.42 s for 8000 tokens: queue of 1.7 s -> ~2.2 s predicted (1.1x SLO)
    ds, ps = [dsnap("d0", pending=50_000, **BUSY)], [psnap("p0", queued_s=1.7)]  # local prefill: > 3 s
    assert pol.admit(8000, ds, ps, hint={"priority": 0}).accepted
    assert not pol.admit(8000, ds, ps, hint={"priority": 1}).accepted
    ps = [psnap("p0", queued_s=1.3)]                   # ~1.8 s: 0.9x SLO
    assert pol.admit(8000, ds, ps, hint=RequestHint(priority=1)).accepted
    assert not pol.admit(8000, ds, ps, hint=RequestHint(priority=2)).accepted


def test_request_slo_override():
    ds, ps = [dsnap("d0", pending=50_000, **BUSY)], [psnap("p0", queued_s=1.7)]
    assert not policy().admit(8000, ds, ps).accepted
    assert policy().admit(8000, ds, ps, hint={"slo": SLO(5.0, 0.05)}).accepted


def test_backward_compatible_with_router_call_and_basic_snapshots():
    basic = [{"name": "d0", "role": "decode", "num_running": 2, "num_waiting": 0, "num_transferring": 0,
              "free_blocks": 1000, "total_blocks": 2000, "draining": False},
             {"name": "d1", "role": "decode", "num_running": 0, "num_waiting": 0, "num_transferring": 0,
              "free_blocks": 1000, "total_blocks": 2000, "draining": True}]
    pre = [{"name": "p0", "role": "prefill", "num_running": 0, "num_waiting": 0, "free_blocks": 0,
            "total_blocks": 0, "draining": False}]
    place = policy().place(5000, basic, pre, frozenset())
    assert place.decode == "d0"
    assert policy().place(5000, basic, pre, frozenset({"p0"})).prefill is None
    with pytest.raises(NoWorker):
        policy().place(10, basic, pre, frozenset({"d0"}))
