"""Build the serving graph on Ray from a validated Config: worker actors (in a placement group),
the router, the gRPC server and the metrics endpoint. Wiring only; behaviour lives in the plain
classes (PrefillWorker, DecodeWorker, Router, WorkerPool).

    cluster = ServingCluster(config)
    await cluster.start()            # ray.init (local unless cluster.ray_address), actors, servers
    await cluster.add_worker("prefill"); await cluster.remove_worker("decode-1")
    await cluster.stop()

With `planner.enabled` the cluster also runs an Autoscaler (deploy/autoscaler.py) that calls
add_worker / remove_worker on the planner's decisions.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os

from ..config import Config
from ..engine.loader import load_tokenizer
from ..engine.model_source import resolve
from ..router.metrics import RouterMetrics
from ..router.policy import build_policy
from ..router.router import Router
from ..router.slo_policy import SLO
from ..router.workers import WorkerPool
from .autoscaler import Autoscaler

log = logging.getLogger("splitserve.deploy")


def actor_class(role: str):
    import ray
    if role == "prefill":
        from ..prefill_worker.worker import PrefillWorker as cls
    else:
        from ..decode_worker.worker import DecodeWorker as cls
    # threaded actor: take_outputs long-polls while other calls (reserve, commit, abort) proceed
    return ray.remote(max_concurrency=64, max_restarts=0)(cls)


# passed to every worker as set here: UCX transport choices, and the NVLink-multicast-off switches
# that shared multi-GPU hosts require (a worker must never turn multicast back on)
_PASS_ENV_PREFIXES = ("UCX_", "NCCL_", "TORCH_SYMM_MEM_", "NVSHMEM_")


def worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith(_PASS_ENV_PREFIXES)}
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


class ServingCluster:
    def __init__(self, config: Config, policy: str | None = None, worker_logs_to_driver: bool = True):
        self.config = config
        self.worker_logs_to_driver = worker_logs_to_driver
        self.policy_name = policy or config.router.policy
        self.metrics = RouterMetrics()
        self.pool = WorkerPool(config.router.health_interval_s, self.metrics)
        self.router: Router | None = None
        self.autoscaler: Autoscaler | None = None
        self.grpc_server = None
        self.grpc_port: int | None = None
        self.actors: dict[str, object] = {}
        self._seq = {"prefill": itertools.count(), "decode": itertools.count()}
        self._pg = None
        self._bundles: list[str | None] = []     # placement-group bundle -> worker using it

    def _init_ray(self) -> None:
        import ray
        if ray.is_initialized():
            return
        cc = self.config.cluster
        if cc.ray_address:
            ray.init(address=cc.ray_address, log_to_driver=self.worker_logs_to_driver)
        else:   # a local cluster: logical CPUs for every worker (and replacements) even on 2 cores
            pl = self.config.planner
            most = max(cc.num_prefill + cc.num_decode, pl.max_prefill + pl.max_decode if pl.enabled else 0)
            need = int(most * cc.cpus_per_worker * 2) + 8
            ray.init(num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False,
                     log_to_driver=self.worker_logs_to_driver, runtime_env={"env_vars": worker_env()})

    def _placement_group(self, n: int):
        import ray
        from ray.util.placement_group import placement_group
        cc = self.config.cluster
        bundle = {"CPU": cc.cpus_per_worker}
        if cc.gpus_per_worker:
            bundle["GPU"] = cc.gpus_per_worker
        pg = placement_group([dict(bundle) for _ in range(n)], strategy=cc.placement_strategy)
        ray.get(pg.ready(), timeout=300)
        return pg

    def _free_bundle(self) -> int | None:
        """A placement-group bundle whose worker is gone (dead or removed), for a replacement."""
        for i, owner in enumerate(self._bundles):
            if owner is None or owner in self.pool.dead or owner not in self.actors:
                return i
        return None

    def _spawn(self, role: str, bundle_index: int | None = None):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        cc = self.config.cluster
        name = f"{role}-{next(self._seq[role])}"
        opts = {"num_cpus": cc.cpus_per_worker, "num_gpus": cc.gpus_per_worker}
        if cc.gpus_per_worker and cc.gpu_visibility == "all":
            # Ray would narrow CUDA_VISIBLE_DEVICES to the worker's GPU; the worker shows every
            # GPU, its own first, instead (worker_runtime.own_gpu_first)
            opts["runtime_env"] = {"env_vars": {**worker_env(), "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1",
                                                "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}}
        if bundle_index is None:
            bundle_index = self._free_bundle()
        if bundle_index is not None and self._pg is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(self._pg, bundle_index)
            self._bundles[bundle_index] = name
        actor = actor_class(role).options(**opts).remote(self.config, name)
        self.actors[name] = actor
        return name, role, actor

    async def start(self) -> None:
        cfg = self.config
        self._init_ray()
        tokenizer = load_tokenizer(resolve(cfg.model.model, cfg.model.cache_dir))
        roles = ["decode"] * cfg.cluster.num_decode + ["prefill"] * cfg.cluster.num_prefill
        self._pg = self._placement_group(len(roles))
        self._bundles = [None] * len(roles)
        spawned = [self._spawn(role, i) for i, role in enumerate(roles)]
        await asyncio.gather(*(self.pool.add(*s) for s in spawned))
        snap = self.pool.snapshots("decode")[0]
        max_len = cfg.scheduler.max_model_len or await self.pool.call(snap["name"], "max_model_len")
        policy = build_policy(self.policy_name, cfg.router)
        self.router = Router(cfg.router, tokenizer, max_len, self.pool, policy, self.metrics)
        self.pool.start_health()
        info = {"model": cfg.model.model, "vocab_size": tokenizer.vocab_size, "max_model_len": max_len,
                "block_size": cfg.cache.tokens_per_block, "kv_dtype": cfg.cache.kv_dtype}
        if cfg.router.grpc_port >= 0:
            from ..router.grpc_server import start_grpc
            self.grpc_server, self.grpc_port = await start_grpc(self.router, info, cfg.router.host, cfg.router.grpc_port)
        if cfg.router.metrics_port >= 0:
            self.metrics.serve(cfg.router.metrics_port, cfg.router.host)
        if cfg.planner.enabled:
            slo = SLO(cfg.router.slo_ttft_ms / 1e3, cfg.router.slo_tpot_ms / 1e3)
            self.autoscaler = Autoscaler(self, cfg.planner, slo, self.metrics)
            self.autoscaler.start()
        log.info("serving on %s:%s (%d prefill, %d decode)", cfg.router.host, self.grpc_port or "in-process",
                 cfg.cluster.num_prefill, cfg.cluster.num_decode)

    async def add_worker(self, role: str) -> str:
        name, role, actor = self._spawn(role)
        try:
            await self.pool.add(name, role, actor)
        except BaseException:     # never started (no resources, load failed): free its slot
            import ray
            self.actors.pop(name, None)
            ray.kill(actor, no_restart=True)
            raise
        return name

    async def remove_worker(self, name: str) -> None:
        """Drain (no new requests; its requests finish, or migrate after cluster.drain_timeout_s), stop."""
        await self.pool.remove(name, timeout=self.config.cluster.drain_timeout_s)
        actor = self.actors.pop(name, None)
        if actor is not None:
            import ray
            ray.kill(actor, no_restart=True)     # its bundle (if any) is free for a replacement

    async def stop(self) -> None:
        import ray
        if self.autoscaler is not None:
            await self.autoscaler.stop()
            self.autoscaler = None
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=1.0)
        await self.pool.close()
        for actor in self.actors.values():
            ray.kill(actor, no_restart=True)
        self.actors.clear()
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group
            remove_placement_group(self._pg)
            self._pg = None
