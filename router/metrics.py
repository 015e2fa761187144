"""The router's Prometheus metrics (prometheus-client). Workers export their own (kvtransfer's
bytes/latency/failures, engine KV usage) from their processes."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.ttft = Histogram("splitserve_ttft_seconds", "time to first token", registry=r, buckets=_LAT)
        self.tpot = Histogram("splitserve_tpot_seconds", "time per output token after the first",
                              registry=r, buckets=_LAT)
        self.itl = Histogram("splitserve_itl_seconds", "gap between streamed chunks", registry=r, buckets=_LAT)
        self.e2e = Histogram("splitserve_e2e_seconds", "request latency end to end", registry=r, buckets=_LAT)
        self.requests = Counter("splitserve_requests", "finished requests by outcome", ["outcome"], registry=r)
        self.in_flight = Gauge("splitserve_requests_in_flight", "requests in the router", registry=r)
        self.queue_depth = Gauge("splitserve_worker_queue_depth", "waiting requests per worker",
                                 ["worker", "role"], registry=r)
        self.running = Gauge("splitserve_worker_running", "running requests per worker", ["worker", "role"],
                             registry=r)
        self.kv_used = Gauge("splitserve_kv_blocks_used", "KV blocks in use", ["worker"], registry=r)
        self.kv_free = Gauge("splitserve_kv_blocks_free", "KV blocks free", ["worker"], registry=r)
        self.transfer_latency = Histogram("splitserve_kv_transfer_seconds", "prefill -> decode KV handoff",
                                          registry=r, buckets=_LAT)
        self.transfer_bytes = Counter("splitserve_kv_transfer_bytes", "KV bytes handed off", registry=r)
        self.transfer_failures = Counter("splitserve_kv_transfer_failures", "failed KV handoffs", registry=r)
        self.prefill_retries = Counter("splitserve_prefill_retries", "remote prefills retried", registry=r)
        self.migrations = Counter("splitserve_decode_migrations", "requests moved off a dead decode worker",
                                  registry=r)
        self.workers = Gauge("splitserve_workers", "live workers by role", ["role"], registry=r)
        # the planner (deploy/autoscaler.py): what it saw, what it decided, how that went
        self.planner_decisions = Counter("splitserve_planner_decisions", "planner decisions by action and outcome "
                                         "(hold, done, skipped, failed)", ["action", "outcome"], registry=r)
        self.planner_target = Gauge("splitserve_planner_target_workers", "pool sizes the planner last aimed for",
                                    ["role"], registry=r)
        self.planner_signal = Gauge("splitserve_planner_signal", "the planner's last interval: ttft_p90_s, "
                                    "tpot_p90_s, prefill_queue, decode_queue", ["signal"], registry=r)
        self.port: int | None = None

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        self.port = server.server_port
        return self.port

    def observe_snapshot(self, snap: dict) -> None:
        name, role = snap["name"], snap["role"]
        self.queue_depth.labels(name, role).set(snap["num_waiting"])
        self.running.labels(name, role).set(snap["num_running"])
        self.kv_used.labels(name).set(snap["total_blocks"] - snap["free_blocks"])
        self.kv_free.labels(name).set(snap["free_blocks"])
