"""Prometheus metrics of the transfer agent (one set per process, created on first use)."""
from __future__ import annotations

import threading

from prometheus_client import Counter, Gauge, Histogram

_lock = threading.Lock()
_metrics: dict[str, object] = {}


def _get(name: str, factory):
    with _lock:
        if name not in _metrics:
            _metrics[name] = factory()
        return _metrics[name]


def bytes_total():
    return _get("bytes", lambda: Counter("splitserve_kvtransfer_bytes",
                                         "KV bytes moved", ["direction"]))


def transfers_total():
    return _get("transfers", lambda: Counter("splitserve_kvtransfer_transfers",
                                             "finished transfers", ["side", "outcome"]))


def transfer_seconds():
    return _get("seconds", lambda: Histogram(
        "splitserve_kvtransfer_transfer_seconds", "begin-to-verified time of a transfer", ["side"],
        buckets=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1, 3, 10, 30)))


def leases_live():
    return _get("leases", lambda: Gauge("splitserve_kvtransfer_leases_live", "live KV leases"))


def selftest_bandwidth():
    return _get("bw", lambda: Gauge("splitserve_kvtransfer_selftest_bandwidth_bytes_per_second",
                                    "loopback bandwidth measured at start-up",
                                    ["memory", "transports"]))


def transport_info():
    return _get("tl", lambda: Gauge("splitserve_kvtransfer_transport",
                                    "1 for each UCX transport seen on an endpoint lane",
                                    ["peer", "transport"]))


def transport_fallback():
    return _get("fallback", lambda: Counter(
        "splitserve_kvtransfer_transport_fallback",
        "endpoints that lack the expected transport (e.g. TCP where cuda_ipc was expected)"))


def dropped_messages():
    return _get("dropped", lambda: Counter("splitserve_kvtransfer_dropped_messages",
                                           "late or duplicate data messages drained and dropped"))
