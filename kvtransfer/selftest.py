"""Which UCX transports an endpoint really uses, and the start-up loopback bandwidth test.

ucxx's Python API does not expose `ucp_ep_print_info`; we call it through ctypes on the
endpoint's `ucp_ep_h` and parse the lane table ("lane[1]: 2:tcp/lo.0 ... rma_bw").
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import logging
import os
import re
from dataclasses import dataclass, field

log = logging.getLogger("splitserve.kvtransfer")

RDMA_TLS = {"rc", "rc_mlx5", "rc_verbs", "dc", "dc_mlx5", "ud", "ud_mlx5", "ud_verbs", "gga"}
_LANE = re.compile(r"lane\[\d+\]:\s+\d+:([A-Za-z0-9_]+)/")


def _libucp():
    try:
        lib = ctypes.CDLL(None)
        lib.ucp_ep_print_info  # noqa: B018 - probe
        return lib
    except AttributeError:
        import libucx
        libdir = os.path.join(os.path.dirname(libucx.__file__), "lib")
        return ctypes.CDLL(sorted(glob.glob(os.path.join(libdir, "libucp.so*")))[0])


def ep_info(ep) -> str:
    """ucp_ep_print_info of a ucxx Endpoint, as text ('' if unavailable)."""
    try:
        ucp = _libucp()
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.tmpfile.restype = ctypes.c_void_p
        for name in ("fflush", "rewind", "fclose"):
            getattr(libc, name).argtypes = [ctypes.c_void_p]
        libc.fread.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p]
        libc.fread.restype = ctypes.c_size_t
        ucp.ucp_ep_print_info.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        fp = libc.tmpfile()
        try:
            ucp.ucp_ep_print_info(ep.ucp_endpoint, fp)
            libc.fflush(fp)
            libc.rewind(fp)
            chunks, buf = [], ctypes.create_string_buffer(1 << 16)
            while (n := libc.fread(buf, 1, len(buf), fp)) > 0:
                chunks.append(buf.raw[:n])
            return b"".join(chunks).decode(errors="replace")
        finally:
            libc.fclose(fp)
    except Exception as e:   # diagnostics only: never break a transfer over it
        log.debug("ucp_ep_print_info failed: %r", e)
        return ""


def lane_transports(info: str) -> list[str]:
    """Distinct transport names on the endpoint's lanes, in lane order."""
    seen: list[str] = []
    for tl in _LANE.findall(info):
        if tl not in seen:
            seen.append(tl)
    return seen


def expected_set(expected: str, on_cuda: bool) -> set[str]:
    if expected == "auto":
        return {"cuda_ipc"} if on_cuda else set()
    if expected == "rdma":
        return set(RDMA_TLS)
    if expected == "tcp":
        return set()
    return {expected}


def check_transports(peer: str, transports: list[str], expected: str, on_cuda: bool) -> bool:
    """Log the lanes; warn loudly if none of the expected transports is among them."""
    from . import metrics
    for tl in transports:
        metrics.transport_info().labels(peer=peer, transport=tl).set(1)
    want = expected_set(expected, on_cuda)
    log.info("kvtransfer endpoint to %s uses UCX transports %s", peer, transports or "?")
    if want and transports and not want.intersection(transports):
        metrics.transport_fallback().inc()
        log.warning("!" * 78 + "\nKVTRANSFER TRANSPORT FALLBACK: endpoint to %s uses %s, but %s "
                    "was expected (transfer.expected_transports=%r). KV handoff will run at "
                    "TCP speed. Check UCX_TLS, the CUDA/IB devices and that both workers see "
                    "each other's GPUs.\n" + "!" * 78, peer, transports, sorted(want), expected)
        return False
    return True


@dataclass
class SelfTestReport:
    transports: list[str]
    bandwidth_gbps: float
    nbytes: int
    memory: str
    context_resources: list[str] = field(default_factory=list)
    ok: bool = True
