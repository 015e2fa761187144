"""Put-based (RMA) transfers: the ctypes binding against the installed UCX headers, fencing (no
put lands after a cancel returned), fallback to tag messages, config checks. The byte-exact
transfers and the fault tests of both data paths are in test_kvtransfer_e2e.py and
test_kvtransfer_faults.py (parametrized over tag and rma)."""
from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
import torch

from splitserve.config import TransferConfig
from splitserve.kvtransfer.layout import KVLayout
from splitserve.kvtransfer.testing import spawn_worker

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
pytestmark = pytest.mark.timeout(180)

LAYOUT = dict(num_layers=8, num_blocks=256, block_size=4, num_kv_heads=2, head_dim=8,
              dtype="bfloat16")

_OFFSETS_C = r"""
#include <stdio.h>
#include <stddef.h>
#include <ucp/api/ucp.h>
int main(void) {
  printf("%zu %zu %zu %zu %zu %zu\n", sizeof(ucp_request_param_t),
         offsetof(ucp_request_param_t, op_attr_mask), offsetof(ucp_request_param_t, cb),
         offsetof(ucp_request_param_t, user_data), offsetof(ucp_request_param_t, memh),
         (size_t)UCP_OP_ATTR_FIELD_MEMH);
  printf("%zu %zu %zu %zu %zu\n", offsetof(ucp_mem_map_params_t, address),
         offsetof(ucp_mem_map_params_t, length), offsetof(ucp_mem_map_params_t, prot),
         offsetof(ucp_mem_map_params_t, memory_type), (size_t)UCS_MEMORY_TYPE_CUDA);
  printf("%zu %d\n", offsetof(ucp_worker_attr_t, thread_mode), (int)UCS_THREAD_MODE_MULTI);
  return 0;
}
"""


def test_ctypes_layout_matches_the_installed_ucp_headers(tmp_path):
    """kvtransfer/rma.py writes UCX's parameter structs by offset: check every offset it uses
    against the headers of the libucx wheel it loads."""
    import libucx
    cc = shutil.which("cc") or shutil.which("gcc")
    inc = os.path.join(os.path.dirname(libucx.__file__), "include")
    if cc is None or not os.path.exists(os.path.join(inc, "ucp", "api", "ucp.h")):
        pytest.skip("no C compiler or no UCX headers")
    src = tmp_path / "off.c"
    src.write_text(_OFFSETS_C)
    subprocess.run([cc, f"-I{inc}", str(src), "-o", str(tmp_path / "off")], check=True)
    out = subprocess.run([str(tmp_path / "off")], check=True, capture_output=True, text=True).stdout
    req, mm, wa = [[int(x) for x in line.split()] for line in out.splitlines()]
    from splitserve.kvtransfer import rma
    assert req == [72, 0, 16, 32, 64, rma._OP_MEMH]
    assert mm == [8, 16, 28, 32, rma.UCS_MEMORY_TYPE_CUDA]
    assert wa == [8, rma.UCS_THREAD_MODE_MULTI]


def test_no_put_lands_after_a_cancel_returned():
    """The sender streams layers slowly; the decode side cancels mid-way. Once cancel() returned
    True (blocks freed) the sender was fenced: the blocks' bytes never change afterwards, and
    both sides report the failure."""
    d = spawn_worker(LAYOUT, seed=1, config_kw={"data_path": "rma"})
    p = spawn_worker(LAYOUT, seed=2, config_kw={"data_path": "rma"})
    try:
        dst, src = list(range(40, 72)), list(range(100, 132))
        d.call("poison", dst)
        h = d.call("reserve", ids=dst)
        p.call("send", h, src, layer_delay_s=0.2, wait=False)
        time.sleep(0.7)                     # a few layers have been put
        assert d.call("cancel", h["lease_id"]) is True
        snap = d.call("blocks", dst)
        assert not snap.view(torch.int16).eq(0).all(), "no layer landed before the cancel"
        state, reason = p.call("sender_status", h, 10)
        assert state == "failed" and ("fenced" in reason or "cancel" in reason), reason
        time.sleep(1.2)                     # the forward goes on pushing layers
        assert torch.equal(d.call("blocks", dst).view(torch.int16), snap.view(torch.int16))
        info = d.call("integrity")
        assert info["live"] == 0 and info["free_calls"] == 1
        assert p.call("sender_posted", h) < 2 * LAYOUT["num_layers"]   # it stopped early
    finally:
        d.close()
        p.close()


def test_tag_decode_side_takes_a_put_capable_sender_by_tag():
    """A decode agent that takes no puts publishes no key: an rma sender falls back to tag
    messages, bytes verified."""
    d = spawn_worker(LAYOUT, seed=1, config_kw={"data_path": "tag"})
    p = spawn_worker(LAYOUT, seed=2, config_kw={"data_path": "rma"})
    try:
        dst, src = [5, 9, 200], [1, 2, 3]
        d.call("poison", dst)
        h = d.call("reserve", ids=dst)
        assert p.call("send", h, src) == ("success", "")
        assert p.call("sender_path", h) == "tag"
        assert torch.equal(p.call("blocks", src).view(torch.int16), d.call("blocks", dst).view(torch.int16))
    finally:
        d.close()
        p.close()


def test_data_path_is_validated():
    with pytest.raises(ValueError, match="data_path"):
        TransferConfig(data_path="rdma")
    with pytest.raises(ValueError, match="rma_fence_timeout_s"):
        TransferConfig(rma_fence_timeout_s=0)
    with pytest.raises(ValueError, match="rma_min_kib"):
        TransferConfig(rma_min_kib=-1)


def test_auto_puts_few_runs_and_tags_scattered_blocks():
    """data_path auto: one put per (layer, K|V, run), so long runs go by puts and scattered
    blocks by tag messages (gathered into bundles), and transfers under rma_min_kib by tag
    messages too; all verified byte for byte."""
    block_bytes = KVLayout(**LAYOUT).block_bytes
    d = spawn_worker(LAYOUT, seed=1, config_kw={"data_path": "auto"})
    p = spawn_worker(LAYOUT, seed=2, config_kw={"data_path": "auto", "rma_max_runs": 2,
                                                "rma_min_kib": 20 * block_bytes // 1024})
    try:
        for dst, src, path in [(list(range(10, 40)), list(range(100, 130)), "rma"),
                               (list(range(50, 60)), list(range(140, 150)), "tag"),  # small
                               ([3, 7, 50, 90, 91], [1, 9, 30, 31, 60], "tag")]:
            d.call("poison", dst)
            h = d.call("reserve", ids=dst)
            assert p.call("send", h, src) == ("success", "")
            assert p.call("sender_path", h) == path
            assert torch.equal(p.call("blocks", src).view(torch.int16),
                               d.call("blocks", dst).view(torch.int16))
            d.call("release_completed", dst)
    finally:
        d.close()
        p.close()
