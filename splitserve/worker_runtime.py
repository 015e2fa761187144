"""What a prefill worker and a decode worker share: an engine on its step-loop thread, a KV
transfer agent over the engine's KV pool, load snapshots and the integrity check.

Plain Python classes; `deploy/` wraps them as Ray actors, tests may construct them directly.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass

from .config import Config

log = logging.getLogger("splitserve.worker")

_KV_DTYPE_NAMES = {"torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16",
                   "torch.float8_e4m3fn": "fp8_e4m3"}


@dataclass
class WorkerSnapshot:
    """A worker's live load, as the router's policy sees it (plain data)."""
    name: str
    role: str                   # "prefill" | "decode"
    num_running: int
    num_waiting: int
    num_transferring: int
    free_blocks: int
    total_blocks: int
    block_size: int
    steps: int
    draining: bool
    time: float
    metrics_port: int = 0
    pid: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def output_record(out) -> dict:
    """A RequestOutput as the plain dict that crosses the worker -> router boundary."""
    return {"request_id": out.request_id, "offset": len(out.token_ids) - len(out.new_token_ids),
            "new_token_ids": list(out.new_token_ids), "finished": out.finished,
            "finish_reason": out.finish_reason, "num_cached_tokens": out.num_cached_tokens,
            "num_prompt_tokens": len(out.prompt_token_ids)}


class WorkerRuntime:
    role = "worker"

    def __init__(self, config: Config, name: str, with_transfer: bool = True):
        from .engine.engine import LLMEngine
        from .engine.loop import EngineLoop
        from .logs import setup_logging
        setup_logging(name)
        if config.cluster.gpus_per_worker and config.cluster.gpu_visibility == "all":
            own_gpu_first()
        self.config = config
        self.name = name
        self.engine = LLMEngine.from_config(config)
        self.loop = EngineLoop(self.engine)
        self.draining = False
        self.fault: tuple[str, int] | None = None
        self.agent = self._start_agent() if with_transfer else None
        self.metrics_port = _serve_metrics()
        log.info("%s %s up: %d KV blocks of %d tokens", self.role, name, self.engine.pool.num_blocks,
                 self.engine.pool.block_size)

    def _start_agent(self):
        from .kvtransfer import KVLayout
        from .kvtransfer.agent import TransferAgent
        e = self.engine
        kv = e.kv_cache.kv
        layout = KVLayout(num_layers=kv.shape[0], num_blocks=kv.shape[2], block_size=kv.shape[3],
                          num_kv_heads=kv.shape[4], head_dim=kv.shape[5],
                          dtype=_KV_DTYPE_NAMES[str(kv.dtype)], has_scales=e.kv_cache.scales is not None,
                          v_token_minor=e.kv_cache.v_token_minor)
        return TransferAgent(kv, layout, self.config.transfer, model=self.config.model.model,
                             free_blocks=self._lease_freed, scales=e.kv_cache.scales)

    def _lease_freed(self, block_ids: list[int]) -> None:
        """A lease expired or was cancelled: overridden by the decode worker."""

    # ------------------------------------------------------------ shared RPCs
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def transfer_info(self) -> dict:
        """The transports UCX uses (self-test and per peer) and the device this worker runs on."""
        info = {"device": str(self.engine.device), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
        if self.engine.device.type == "cuda":
            import torch
            props = torch.cuda.get_device_properties(self.engine.device)
            # the UUID tells the physical GPUs apart (in a VM every GPU may sit on PCI bus 0)
            info.update(gpu=props.name, gpu_uuid=str(getattr(props, "uuid", "")) or None,
                        pci=":".join(str(getattr(props, k, "?")) for k in ("pci_domain_id", "pci_bus_id", "pci_device_id")))
        if self.agent is not None:
            info.update(self.agent.transports())
        return info

    def ping(self) -> str:
        if self.loop.error is not None:
            raise RuntimeError(f"{self.name}: engine loop died: {self.loop.error!r}")
        return self.name

    def transfer_address(self) -> tuple[str, int] | None:
        return None if self.agent is None else self.agent.address

    def snapshot(self) -> dict:
        def take(e):
            s = e.scheduler
            return WorkerSnapshot(self.name, self.role, len(s.running), len(s.waiting), len(s.transferring),
                                  e.pool.num_free_blocks, e.pool.num_blocks, e.pool.block_size,
                                  self.loop.steps, self.draining, time.time(), self.metrics_port, os.getpid())
        snap = self.loop.run(take)
        _engine_gauges(snap)
        return snap.to_dict()

    def abort(self, request_id: str) -> bool:
        return bool(self.loop.run(lambda e: e.abort(request_id)))

    def check_integrity(self) -> dict:
        """Pool invariants hold and no blocks are parked in leases, transfers or holds."""
        def check(e):
            e.pool.check_integrity()
            leases = self.agent.leases.live_count() if self.agent is not None else 0
            return {"used_blocks": e.pool.num_used_blocks, "live_leases": leases,
                    "in_flight_blocks": e.scheduler.num_blocks_in_flight,
                    "unfinished": e.has_unfinished()}
        return self.loop.run(check)

    def inject_fault(self, kind: str, arg: int = 0) -> None:
        """Fault injection for tests: the process really dies (os._exit) at the named point.
        prefill: 'die_before_push', 'die_mid_push'; decode: 'die_after_tokens' (arg = tokens),
        'slow_reserve' (the next start_remote sleeps arg ms first); '' clears."""
        self.fault = (kind, arg) if kind else None

    def _die(self) -> None:
        log.error("%s: injected fault %s: exiting now", self.name, self.fault)
        os._exit(17)

    def drain(self) -> None:
        """Take no new requests; the router stops routing here and waits until idle."""
        self.draining = True

    def shutdown(self) -> None:
        self.loop.stop()
        if self.agent is not None:
            self.agent.close()


def own_gpu_first() -> None:
    """In a Ray actor that holds GPUs with RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: show every
    GPU of the node, this worker's own first, so "cuda" is its GPU and peers' GPUs stay mappable
    (measured on 2 H200s: UCX 1.21 picked cuda_ipc with either visibility). Before CUDA starts."""
    if not os.environ.get("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"):
        return
    import ray
    mine = [str(i) for i in ray.get_gpu_ids()]
    if not mine:
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        every = [x for x in visible.split(",") if x]
    else:
        gpus = "/proc/driver/nvidia/gpus"
        every = [str(i) for i in range(len(os.listdir(gpus)))] if os.path.isdir(gpus) else list(mine)
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(mine + [x for x in every if x not in mine])
    log.info("GPUs visible to this worker (own first): %s", os.environ["CUDA_VISIBLE_DEVICES"])


_GAUGES: dict = {}


def _serve_metrics() -> int:
    """This process's Prometheus endpoint (kvtransfer's metrics and the engine gauges below)."""
    from prometheus_client import Gauge, start_http_server
    server, _ = start_http_server(0, addr="127.0.0.1")
    _GAUGES["used"] = Gauge("splitserve_engine_kv_blocks_used", "KV blocks in use", ["worker"])
    _GAUGES["free"] = Gauge("splitserve_engine_kv_blocks_free", "KV blocks free", ["worker"])
    _GAUGES["running"] = Gauge("splitserve_engine_running", "requests in the running batch", ["worker"])
    _GAUGES["waiting"] = Gauge("splitserve_engine_waiting", "requests in the waiting queue", ["worker"])
    _GAUGES["transferring"] = Gauge("splitserve_engine_transferring", "requests waiting for KV", ["worker"])
    return server.server_port


def _engine_gauges(s: WorkerSnapshot) -> None:
    if not _GAUGES:
        return
    _GAUGES["used"].labels(s.name).set(s.total_blocks - s.free_blocks)
    _GAUGES["free"].labels(s.name).set(s.free_blocks)
    _GAUGES["running"].labels(s.name).set(s.num_running)
    _GAUGES["waiting"].labels(s.name).set(s.num_waiting)
    _GAUGES["transferring"].labels(s.name).set(s.num_transferring)
