"""The one validated, frozen configuration tree of splitserve.

`Config` holds one sub-config per component; each component takes only its own.
Load from YAML with `load_config(path)`; every field has a one-line docstring (the
`doc` metadata) that also feeds `--help`. Validation happens once, in `__post_init__`,
and raises `ValueError` naming the field and the fix. Nothing is silently rewritten.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

KV_DTYPES = ("float32", "bfloat16", "float16", "fp8_e4m3")
DEVICES = ("auto", "cpu", "cuda")


def _f(default: Any, doc: str, **kw: Any) -> Any:
    """A dataclass field carrying its one-line docstring."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc}, **kw)
    return field(default=default, metadata={"doc": doc}, **kw)


def _require(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"config field '{name}': {msg}")


@dataclass(frozen=True)
class ModelConfig:
    model: str = _f("smollm2", "model: 'smollm2', a .gguf path, a safetensors dir, or 'dummy:SHAPE'")
    dtype: str = _f("float32", "weight/activation dtype: float32, bfloat16 or float16")
    device: str = _f("auto", "device: auto (cuda if present), cpu or cuda")
    cache_dir: str = _f("", "where fetched/converted models are cached ('' = ~/.cache/splitserve)")
    seed: int = _f(0, "seed for dummy weights")

    def __post_init__(self) -> None:
        _require(self.dtype in ("float32", "bfloat16", "float16"), "model.dtype",
                 f"got {self.dtype!r}; use float32, bfloat16 or float16")
        _require(self.device in DEVICES, "model.device", f"got {self.device!r}; use one of {DEVICES}")
        _require(bool(self.model), "model.model", "must name a model")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = _f(0, "tokens per KV block (0 = auto: 16; 32 for fp8_e4m3 caches, whose token-minor "
                         "V pages then fill whole 32-byte sectors: 1.39x -> 1.67x bf16 decode speed)")
    num_blocks: int = _f(0, "KV blocks in the pool (0 = size from memory fraction)")
    memory_fraction: float = _f(0.85, "fraction of free accelerator memory for the KV cache (GPU)")
    cpu_cache_gib: float = _f(1.0, "KV cache size in GiB when running on CPU and num_blocks = 0")
    kv_dtype: str = _f("auto", "KV dtype: auto (= model dtype), float32, bfloat16, float16, fp8_e4m3")
    enable_prefix_caching: bool = _f(True, "reuse KV of identical prompt prefixes")
    hash_seed: int = _f(0x5EED, "seed of the chained prefix hash; every worker must agree")

    def __post_init__(self) -> None:
        _require(self.block_size in (0, 8, 16, 32, 64, 128), "cache.block_size",
                 f"got {self.block_size}; use 0 (auto), 8, 16, 32, 64 or 128")
        _require(self.num_blocks >= 0, "cache.num_blocks", "must be >= 0 (0 = auto)")
        _require(0.0 < self.memory_fraction <= 0.98, "cache.memory_fraction", "must be in (0, 0.98]")
        _require(self.cpu_cache_gib > 0, "cache.cpu_cache_gib", "must be > 0")
        _require(self.kv_dtype == "auto" or self.kv_dtype in KV_DTYPES, "cache.kv_dtype",
                 f"got {self.kv_dtype!r}; use auto or one of {KV_DTYPES}")

    @property
    def tokens_per_block(self) -> int:
        """block_size, with 0 (auto) resolved: 32 for FP8 caches (bench/results/
        decode-sweep-2026-11-29-s6.md: their V page rows are 16 bytes at 16 tokens, half an L2
        sector, and FP8 decode ran at 2.9 TB/s; at 32 tokens 3.5 TB/s), else 16."""
        if self.block_size:
            return self.block_size
        return 32 if self.kv_dtype == "fp8_e4m3" else 16


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = _f(64, "most sequences in the running batch")
    max_num_batched_tokens: int = _f(2048, "token budget of one step (chunked prefill splits above it)")
    max_model_len: int = _f(0, "longest prompt+output (0 = the model's context length)")
    overlap_decode: bool = _f(True, "launch a greedy decode step before reading the previous step's tokens, so the "
                              "device does not idle while the host schedules (engine/overlap.py); false = every "
                              "step synchronous")

    def __post_init__(self) -> None:
        _require(self.max_num_seqs >= 1, "scheduler.max_num_seqs", "must be >= 1")
        _require(self.max_num_batched_tokens >= 16, "scheduler.max_num_batched_tokens", "must be >= 16")
        _require(self.max_model_len >= 0, "scheduler.max_model_len", "must be >= 0")
        _require(isinstance(self.overlap_decode, bool), "scheduler.overlap_decode",
                 f"must be true or false, got {self.overlap_decode!r}")


@dataclass(frozen=True)
class TransferConfig:
    lease_timeout_s: float = _f(30.0, "a KV reservation expires if not completed within this")
    lease_retention_s: float = _f(0.0, "a finished lease's record and status are kept this long, then forgotten "
                                  "(poll_lease answers 'unknown lease'); 0: max(2 x lease_timeout_s, 60 s)")
    expected_transports: str = _f("auto", "auto, tcp, cuda_ipc or rdma: warn loudly if UCX picks less")
    self_test: bool = _f(True, "run a loopback bandwidth self-test at agent start-up")
    self_test_mib: int = _f(64, "MiB moved by the start-up self-test")
    listen_host: str = _f("127.0.0.1", "address the transfer agent listens on (peers connect to it)")
    listen_port: int = _f(0, "port the transfer agent listens on (0 = any free port)")
    connect_timeout_s: float = _f(5.0, "connecting to a peer agent and its handshake must finish within this")
    direct_min_blocks: int = _f(128, "block runs at least this long go straight into place (a message per layer and "
                               "K|V); shorter ones are staged (gathered into multi-layer bundles): a UCX send costs "
                               "~50-100 us of host time, more than a GPU gather of tens of blocks "
                               "(bench/results/transfer-cuda-v6*.md)")
    bundle_kib: int = _f(16384, "a staged message spans as many layers as fit in this many KiB")
    max_bundles: int = _f(8, "the decode side grows a transfer's bundles past bundle_kib so that its staged "
                          "layers take at most this many messages, up to half the staging budget (0: always "
                          "bundle_kib; kvtransfer.layout.bundle_bytes_for)")
    staging_layers: int = _f(8, "staged layers in flight per transfer (bounds staging memory)")
    staging_budget_kib: int = _f(262144, "staged bytes a transfer may keep in flight per side (KiB); more layers than "
                                 "staging_layers while they fit")
    staged_path: str = _f("auto", "how this side moves staged bundles: buffer (gathered into / scattered out of a "
                          "staging buffer), iov (a descriptor list of the regions in place: no copy; host pools "
                          "only) or auto (iov for host pools, buffer for CUDA pools, whose gather is one kernel); "
                          "a local choice, the bytes on the wire are the same")
    sweep_interval_s: float = _f(0.05, "how often leases are checked for expiry and stray writes drained")
    spin_us: int = _f(2000, "CUDA: how long the agent's loop polls the GPU work of a step it just queued "
                      "(gather, scatter, checksums) before waiting for it on a thread (0 = always a thread)")
    data_path: str = _f("tag", "tag: the decode side posts tag receives (direct runs, staged bundles); rma: the "
                        "prefill side puts straight into the reserved blocks (UCP RMA, both pools registered "
                        "once); auto: rma for transfers of at most rma_max_runs block runs when both agents registered their "
                        "pools, else tag")
    prepost: bool = _f(True, "tag path: the decode side posts its receives when it reserves the blocks, so the "
                       "prefill side sends data and then `complete` with no begin/ready round trip (the plan's "
                       "message boundaries then come from the destination ids alone); false: receives are "
                       "posted on the sender's `begin` (docs/kvtransfer.md)")
    rma_max_runs: int = _f(4, "auto: a transfer is put-based only if its blocks form at most this many runs "
                           "(consecutive on both sides; one put per layer, K|V and run), else tag messages")
    rma_min_kib: int = _f(0, "auto: puts only for transfers of at least this many KiB (0: any size); puts wait a "
                          "`ready` round trip before the first write, which costs small transfers 3-4 ms on "
                          "CPU loopback (bench/results/transfer-2026-11-30-s12.md)")
    rma_fence_grace_s: float = _f(1.0, "rma: after a dead sender's endpoint breaks, wait this long for copies it had "
                                  "queued before its lease's blocks are freed")
    rma_fence_timeout_s: float = _f(5.0, "rma: how long an abort waits for the sender's `fenced` before returning "
                                    "(the blocks stay reserved until the sender answers or goes away)")
    progress_mode: str = _f("thread", "UCX progress: thread (a blocking progress thread) or thread-polling (a "
                            "thread that spins: lower latency per message, one busy core)")

    def __post_init__(self) -> None:
        _require(self.lease_timeout_s > 0, "transfer.lease_timeout_s", "must be > 0")
        _require(self.lease_retention_s >= 0, "transfer.lease_retention_s", "must be >= 0 (0: the default)")
        _require(self.expected_transports in ("auto", "tcp", "cuda_ipc", "rdma"),
                 "transfer.expected_transports",
                 f"got {self.expected_transports!r}; use auto, tcp, cuda_ipc or rdma")
        _require(self.self_test_mib >= 1, "transfer.self_test_mib", "must be >= 1")
        _require(bool(self.listen_host), "transfer.listen_host", "must name an address")
        _require(0 <= self.listen_port < 65536, "transfer.listen_port", "must be in [0, 65535]")
        _require(self.connect_timeout_s > 0, "transfer.connect_timeout_s", "must be > 0")
        _require(self.direct_min_blocks >= 1, "transfer.direct_min_blocks", "must be >= 1")
        _require(self.staging_layers >= 1, "transfer.staging_layers", "must be >= 1")
        _require(self.bundle_kib >= 1, "transfer.bundle_kib", "must be >= 1")
        _require(self.max_bundles >= 0, "transfer.max_bundles", "must be >= 0")
        _require(self.staging_budget_kib >= 1, "transfer.staging_budget_kib", "must be >= 1")
        _require(self.staged_path in ("auto", "buffer", "iov"), "transfer.staged_path",
                 f"got {self.staged_path!r}; use auto, buffer or iov")
        _require(0 < self.sweep_interval_s <= 1.0, "transfer.sweep_interval_s", "must be in (0, 1]")
        _require(0 <= self.spin_us <= 1_000_000, "transfer.spin_us", "must be in [0, 1000000]")
        _require(self.data_path in ("tag", "rma", "auto"), "transfer.data_path",
                 f"got {self.data_path!r}; use tag, rma or auto")
        _require(self.rma_max_runs >= 1, "transfer.rma_max_runs", "must be >= 1")
        _require(self.rma_min_kib >= 0, "transfer.rma_min_kib", "must be >= 0")
        _require(self.rma_fence_grace_s >= 0, "transfer.rma_fence_grace_s", "must be >= 0")
        _require(self.rma_fence_timeout_s > 0, "transfer.rma_fence_timeout_s", "must be > 0")
        _require(self.progress_mode in ("thread", "thread-polling"), "transfer.progress_mode",
                 f"got {self.progress_mode!r}; use thread or thread-polling")


@dataclass(frozen=True)
class RouterConfig:
    host: str = _f("127.0.0.1", "address the gRPC API listens on")
    grpc_port: int = _f(50051, "gRPC API port (0 = any free port, -1 = no gRPC server: in-process callers only)")
    metrics_port: int = _f(9400, "Prometheus /metrics port of the router (0 = any free port, -1 = off)")
    local_prefill_max_tokens: int = _f(64, "uncached prompts up to this many tokens prefill on the decode worker")
    max_queued_requests: int = _f(256, "requests in flight above this are refused with RESOURCE_EXHAUSTED")
    health_interval_s: float = _f(1.0, "how often workers are pinged and their load snapshots refreshed")
    prefill_retries: int = _f(2, "times a failed remote prefill is retried on another prefill worker")
    request_timeout_s: float = _f(600.0, "a request still running after this is aborted")
    policy: str = _f("load_aware", "placement policy: load_aware, slo_aware, round_robin or colocated")
    cost_profile: str = _f("cpu-smollm2", "cost-model profile for slo_aware (router/profiles/NAME.json or a path)")
    slo_ttft_ms: float = _f(2000.0, "default TTFT target (slo_aware; requests may carry their own)")
    slo_tpot_ms: float = _f(100.0, "default TPOT target (slo_aware; requests may carry their own)")
    overlap_reserve: bool = _f(True, "start a remote prefill while the decode worker reserves its blocks "
                               "(the handoff reaches the prefill worker mid-forward)")

    def __post_init__(self) -> None:
        _require(self.policy in ("load_aware", "slo_aware", "round_robin", "colocated"), "router.policy",
                 f"got {self.policy!r}; use load_aware, slo_aware, round_robin or colocated")
        _require(self.slo_ttft_ms > 0 and self.slo_tpot_ms > 0, "router.slo_ttft_ms/slo_tpot_ms", "must be > 0")
        _require(-1 <= self.grpc_port < 65536, "router.grpc_port", "must be in [0, 65535] or -1 (off)")
        _require(-1 <= self.metrics_port < 65536, "router.metrics_port", "must be -1 (off) or a port")
        _require(self.local_prefill_max_tokens >= 0, "router.local_prefill_max_tokens", "must be >= 0")
        _require(self.max_queued_requests >= 1, "router.max_queued_requests", "must be >= 1")
        _require(self.health_interval_s > 0, "router.health_interval_s", "must be > 0")
        _require(self.prefill_retries >= 0, "router.prefill_retries", "must be >= 0")
        _require(self.request_timeout_s > 0, "router.request_timeout_s", "must be > 0")


@dataclass(frozen=True)
class ClusterConfig:
    num_prefill: int = _f(1, "prefill workers at start")
    num_decode: int = _f(1, "decode workers at start")
    ray_address: str = _f("", "Ray cluster to join ('' = start a local one)")
    cpus_per_worker: float = _f(1.0, "Ray CPUs reserved by each worker actor")
    gpus_per_worker: float = _f(0.0, "Ray GPUs reserved by each worker actor (1 = one GPU each)")
    placement_strategy: str = _f("PACK", "placement group strategy for the workers: PACK or SPREAD")
    drain_timeout_s: float = _f(120.0, "a removed worker's requests get this long to finish; the rest then migrate")
    gpu_visibility: str = _f("all", "GPU workers see 'all' the node's GPUs (their own first, as dask-cuda does for "
                             "peer mappings) or only their 'own' (Ray's CUDA_VISIBLE_DEVICES); UCX 1.21 used "
                             "cuda_ipc between two H200s either way")

    def __post_init__(self) -> None:
        _require(self.num_prefill >= 0, "cluster.num_prefill", "must be >= 0")
        _require(self.num_decode >= 1, "cluster.num_decode", "must be >= 1 (decode workers serve every request)")
        _require(self.cpus_per_worker > 0, "cluster.cpus_per_worker", "must be > 0")
        _require(self.gpus_per_worker >= 0, "cluster.gpus_per_worker", "must be >= 0")
        _require(self.gpu_visibility in ("all", "own"), "cluster.gpu_visibility", "must be 'all' or 'own'")
        _require(self.placement_strategy in ("PACK", "SPREAD"), "cluster.placement_strategy",
                 "use PACK or SPREAD")
        _require(self.drain_timeout_s > 0, "cluster.drain_timeout_s", "must be > 0")


@dataclass(frozen=True)
class PlannerConfig:
    """The capacity planner (router/planner.py, run by deploy/autoscaler.py); SLO from router.slo_*_ms."""
    enabled: bool = _f(False, "resize the prefill/decode pools at run time from p90 TTFT/TPOT and queues")
    interval_s: float = _f(10.0, "seconds per planning interval (one observation of p90s and queues)")
    min_prefill: int = _f(1, "fewest prefill workers the planner keeps (0 = all prefill may go local)")
    max_prefill: int = _f(4, "most prefill workers the planner asks Ray for")
    min_decode: int = _f(1, "fewest decode workers the planner keeps")
    max_decode: int = _f(4, "most decode workers the planner asks Ray for")
    high: float = _f(1.0, "p90 / SLO above this: the pool is short")
    low: float = _f(0.5, "p90 / SLO below this: the pool has slack (between low and high: hold)")
    patience: int = _f(3, "consecutive intervals a signal must hold before the planner acts")
    cooldown: int = _f(4, "intervals without action after an action (its effect shows first)")

    def __post_init__(self) -> None:
        _require(self.interval_s > 0, "planner.interval_s", "must be > 0")
        _require(0 <= self.min_prefill <= self.max_prefill, "planner.min_prefill/max_prefill",
                 f"need 0 <= min_prefill <= max_prefill, got {self.min_prefill} and {self.max_prefill}")
        _require(1 <= self.min_decode <= self.max_decode, "planner.min_decode/max_decode",
                 f"need 1 <= min_decode <= max_decode, got {self.min_decode} and {self.max_decode}")
        _require(0 < self.low < self.high, "planner.low/high", f"need 0 < low < high, got {self.low} and {self.high}")
        _require(self.patience >= 1, "planner.patience", "must be >= 1")
        _require(self.cooldown >= 0, "planner.cooldown", "must be >= 0")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)

    def __post_init__(self) -> None:
        pl, cc = self.planner, self.cluster
        if pl.enabled:   # the pools start inside the planner's bounds
            _require(pl.min_prefill <= cc.num_prefill <= pl.max_prefill, "cluster.num_prefill",
                     f"{cc.num_prefill} is outside planner bounds [{pl.min_prefill}, {pl.max_prefill}]; "
                     "change one or the other")
            _require(pl.min_decode <= cc.num_decode <= pl.max_decode, "cluster.num_decode",
                     f"{cc.num_decode} is outside planner bounds [{pl.min_decode}, {pl.max_decode}]; "
                     "change one or the other")

    def replace(self, section: str, **changes: Any) -> "Config":
        """A copy with `changes` applied to one section (validated again)."""
        sub = dataclasses.replace(getattr(self, section), **changes)
        return dataclasses.replace(self, **{section: sub})


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ValueError(f"config section '{where}': unknown field(s) {sorted(unknown)}; "
                         f"known: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        ftype = known[name].type
        sub = _SECTIONS.get(name) if cls is Config else None
        if sub is not None:
            if not isinstance(value, dict):
                raise ValueError(f"config section '{name}' must be a mapping")
            kwargs[name] = _build(sub, value, name)
        else:
            kwargs[name] = value
        del ftype
    return cls(**kwargs)


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "cache": CacheConfig,
    "scheduler": SchedulerConfig,
    "transfer": TransferConfig,
    "router": RouterConfig,
    "cluster": ClusterConfig,
    "planner": PlannerConfig,
}


def config_from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data or {}, "<root>")


def load_config(path: str | Path) -> Config:
    """Load and validate a YAML config file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {p} does not exist")
    with p.open() as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {p}: top level must be a mapping of sections")
    return config_from_dict(data)


def field_docs(cls: type) -> dict[str, str]:
    """name -> one-line doc, for --help."""
    return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(cls)}
