"""KV transfers between two processes on one GPU (cuda_ipc): the CUDA-only paths -- direct spans,
gathers, scatters and checksums queued from the agent's loop and polled, batched read-backs --
with bytes verified block by block. Skipped without a GPU (CI); run on the device."""
from __future__ import annotations

import os
import random

import pytest
import torch

from splitserve.kvtransfer.testing import spawn_worker

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"),
              pytest.mark.timeout(300)]

LAYOUT = dict(num_layers=6, num_blocks=600, block_size=16, num_kv_heads=2, head_dim=64,
              dtype="bfloat16")


@pytest.fixture(scope="module", params=[(0, "tag", True), (2000, "tag", True), (2000, "tag", False),
                                        (2000, "rma", False)],
                ids=["executor", "polled", "classic", "rma"])
def pair(request):
    """tag: receives pre-posted at reservation (the default), classic: posted on `begin`."""
    spin, path, prepost = request.param
    cfg = {"direct_min_blocks": 8, "spin_us": spin, "bundle_kib": 256, "data_path": path,
           "prepost": prepost}
    d = spawn_worker(LAYOUT, seed=1, config_kw=cfg, device="cuda")
    p = spawn_worker(LAYOUT, seed=2, config_kw=cfg, device="cuda")
    d.data_path = path
    yield d, p
    d.close()
    p.close()


def same(p, src, d, dst) -> bool:
    return torch.equal(p.call("blocks", src).view(torch.int16), d.call("blocks", dst).view(torch.int16))


CASES = ["single", "run", "scattered", "mixed", "dst-run"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("streamed", [False, True])
def test_cuda_transfer_bytes_verified(pair, case, streamed):
    d, p = pair
    r = random.Random(10 * CASES.index(case) + streamed)
    dst, src = {"single": ([3], [500]),
                "run": (list(range(100, 140)), list(range(10, 50))),
                # consecutive destination blocks from scattered sources: a pre-posted plan sends
                # the run direct, gathered on the sender (classic plans stage it)
                "dst-run": (list(range(240, 280)), r.sample(range(300, 600), 40)),
                "scattered": (r.sample(range(300), 60), r.sample(range(300, 600), 60)),
                # a direct run (>= direct_min_blocks) and staged blocks in the same layers
                "mixed": (list(range(200, 230)) + r.sample([i for i in range(300) if not 200 <= i < 230], 25),
                          list(range(400, 430)) + r.sample(range(430, 600), 25))}[case]
    assert len(set(dst)) == len(dst) and len(set(src)) == len(src)
    d.call("poison", dst)
    h = d.call("reserve", ids=dst)
    sent = p.call("send", h, src, layer_delay_s=0.01 if streamed else 0.0)
    assert sent == ("success", ""), sent
    assert p.call("sender_path", h) == d.data_path
    assert d.call("wait_lease", h["lease_id"], 30) == ("success", "")
    assert same(p, src, d, dst)
    d.call("release_completed", dst)


@pytest.mark.parametrize("path", ["tag", "rma"])
def test_streamed_behind_a_forward_with_fresh_staging_buffers(path):
    """Layers streamed while a forward allocates and frees large intermediates on the default
    stream, each run with a staging shape the pools have not seen (fresh buffers mid-forward):
    a staging buffer allocated on the default stream could be handed memory whose freeing
    kernels were still queued there (pool.BufferPool). Seen once on two H200s as a refused
    checksum; this guards the fix on the device (a race: passing is not proof). rma: each
    layer is put only after its checksum (queued behind its CUDA event) was read back."""
    cfg = {"spin_us": 2000, "bundle_kib": 256, "direct_min_blocks": 1000, "data_path": path}
    d = spawn_worker(LAYOUT, seed=1, config_kw=cfg, device="cuda")
    p = spawn_worker(LAYOUT, seed=2, config_kw=cfg, device="cuda")
    try:
        r = random.Random(7)
        for n in range(150, 156):          # a new staged shape every run
            dst, src = r.sample(range(600), n), r.sample(range(600), n)
            h = d.call("reserve", ids=dst)
            ov = p.call("overlapped_send", h, src, 2048, 2048, 8192, layer_kind="matmul2")
            assert ov["state"] == "success", ov["reason"]
            assert d.call("wait_lease", h["lease_id"], 30) == ("success", "")
            assert d.call("digest", dst) == p.call("digest", src)
            d.call("release_completed", dst)
    finally:
        d.close()
        p.close()
