"""KV pool layout, the deterministic message plan both sides derive, and per-layer checksums.

Pool layout (one tensor per worker):
    kv: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
so one region (layer, k|v, block) is contiguous: block_size * num_kv_heads * head_dim * itemsize
bytes. An FP8 pool may carry scales: [num_layers, 2, num_kv_heads] float32, which travel per layer.

A transfer moves the regions of n source blocks into n destination blocks (src_ids[i] ->
dst_ids[i]) for every layer. `TransferPlan` turns that into tag messages, identically on both
sides (it is a pure function of the ids, `direct_min_blocks`, `bundle_bytes` and `staged_iov`,
which the decode side chooses and the handoff record carries):
  * maximal runs where src and dst ids both step by +1 are coalesced -- or, for a pre-posted
    handoff (`dst_runs`), where the dst ids alone do: the decode side posts its receives when it
    reserves, before any src id is known, so the message boundaries may depend on dst only; a
    direct run whose src ids are not consecutive is then gathered by the sender (`src_contiguous`);
    a run of at least
    `direct_min_blocks` blocks is sent *direct*: one message per (layer, k|v, run), read from the
    source pool and received straight into the destination blocks (zero copies);
  * every other block is *staged*: the sender gathers all such regions of `layers_per_bundle`
    consecutive layers (per layer K then V) into one contiguous buffer, sends it as one message,
    and the receiver scatters it into its blocks. A bundle spans as many layers as fit in
    BUNDLE_BYTES: a UCX send costs ~50-100 us of host time whatever its size, so a small transfer
    goes in one or two messages instead of one per layer, while a big one still streams layer by
    layer (a layer's bundle is sent as soon as its layers are written). With `staged_iov` (host
    pools) the same bundle travels as a descriptor list of the regions in place (iov.py): the
    same bytes in the same order, read from the source blocks and landing in the destination
    blocks, with no staging buffer on either side.
Per layer the message order is: direct K runs, direct V runs, the staged bundle (on the first
layer of each bundle), the scales.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import NamedTuple, Sequence

PROTOCOL_VERSION = 1
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8_e4m3": 1, "uint8": 1}
MAX_LAYERS = 1 << 10        # tag field widths, see wire.data_tag
MAX_MSGS_PER_LAYER = 1 << 14
NONCE_BITS = 8               # a sender's nonce in every data tag (wire.data_tag)
STAGING_BUDGET = 64 << 20   # bytes of staged layers a transfer may keep in flight per side
BUNDLE_BYTES = 16 << 20     # default: a staged message spans as many layers as fit in this


@dataclass(frozen=True)
class KVLayout:
    """Shape of one worker's KV pool tensor (see the module docstring)."""
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    has_scales: bool = False   # FP8 pools: per-layer [2, num_kv_heads] float32 scales travel too
    v_token_minor: bool = False   # V pages' bytes [heads, head_dim, block_size] (engine FP8 caches)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"KVLayout.dtype {self.dtype!r}: use one of {sorted(DTYPE_BYTES)}")
        for name in ("num_layers", "num_blocks", "block_size", "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"KVLayout.{name} must be >= 1")
        if self.num_layers > MAX_LAYERS:
            raise ValueError(f"KVLayout.num_layers {self.num_layers} > {MAX_LAYERS} (tag field)")
        if self.region_bytes % 8:
            raise ValueError("KVLayout: a block region must be a multiple of 8 bytes (checksums)")

    @property
    def itemsize(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def region_bytes(self) -> int:
        """Bytes of one (layer, k|v, block) region."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def block_bytes(self) -> int:
        """Bytes one block holds across all layers, K and V."""
        return self.region_bytes * 2 * self.num_layers

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.num_blocks, self.block_size, self.num_kv_heads,
                self.head_dim)

    def compat_record(self, model: str) -> dict:
        """What two peers must agree on (num_blocks may differ between pools)."""
        rec = asdict(self)
        rec.pop("num_blocks")
        rec["model"] = model
        rec["version"] = PROTOCOL_VERSION
        return rec


def compat_mismatch(mine: dict, theirs: dict) -> str | None:
    """None if compatible, else a sentence naming every differing field."""
    diffs = [f"{k}: ours={mine.get(k)!r} theirs={theirs.get(k)!r}"
             for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
    return ("incompatible KV peers (" + "; ".join(diffs) + ")") if diffs else None


class Run(NamedTuple):
    """Blocks src[i0:i0+n] -> dst[i0:i0+n] with both id lists stepping by one."""
    i0: int
    n: int
    src0: int
    dst0: int


def coalesce(src_ids: Sequence[int], dst_ids: Sequence[int]) -> list[Run]:
    """Maximal runs where both src and dst ids are consecutive."""
    runs: list[Run] = []
    i, n = 0, len(dst_ids)
    while i < n:
        j = i + 1
        while j < n and src_ids[j] == src_ids[j - 1] + 1 and dst_ids[j] == dst_ids[j - 1] + 1:
            j += 1
        runs.append(Run(i, j - i, src_ids[i], dst_ids[i]))
        i = j
    return runs


class DirectMsg(NamedTuple):
    kv: int     # 0 = K, 1 = V
    run: Run


@dataclass(frozen=True)
class TransferPlan:
    """Per-layer tag messages of one transfer (the same on both sides)."""
    layout: KVLayout
    direct: tuple[DirectMsg, ...]   # per layer, in this order
    staged_idx: tuple[int, ...]     # positions i (into the id lists) that go through staging
    src_ids: tuple[int, ...]
    dst_ids: tuple[int, ...]
    bundle_bytes: int = BUNDLE_BYTES
    staged_iov: bool = False        # staged bundles travel as descriptor lists (no staging copy)

    @classmethod
    def build(cls, layout: KVLayout, src_ids: Sequence[int], dst_ids: Sequence[int],
              direct_min_blocks: int, bundle_bytes: int = BUNDLE_BYTES,
              staged_iov: bool = False, dst_runs: bool = False) -> "TransferPlan":
        """`dst_runs`: runs from the dst ids alone (a pre-posted handoff; module docstring)."""
        if len(src_ids) != len(dst_ids) or not dst_ids:
            raise ValueError(f"transfer needs equal, non-empty block lists "
                             f"(src {len(src_ids)}, dst {len(dst_ids)})")
        if len(set(dst_ids)) != len(dst_ids):
            raise ValueError("destination block ids must be distinct")
        runs = coalesce(list(dst_ids) if dst_runs else list(src_ids), list(dst_ids))
        if dst_runs:
            runs = [Run(r.i0, r.n, int(src_ids[r.i0]), r.dst0) for r in runs]
        direct_runs = [r for r in runs if r.n >= direct_min_blocks]
        staged = [i for r in runs if r.n < direct_min_blocks for i in range(r.i0, r.i0 + r.n)]
        direct = tuple(DirectMsg(kv, r) for kv in (0, 1) for r in direct_runs)
        plan = cls(layout, direct, tuple(staged), tuple(src_ids), tuple(dst_ids), bundle_bytes,
                   staged_iov)
        if plan.msgs_per_layer > MAX_MSGS_PER_LAYER:
            raise ValueError("too many messages per layer for the tag field")
        return plan

    def src_contiguous(self, run: Run) -> bool:
        """Do the src ids of `run` step by one (always, unless the plan was built `dst_runs`)?"""
        ids = self.src_ids[run.i0:run.i0 + run.n]
        return ids[-1] - ids[0] == run.n - 1 and all(b == a + 1 for a, b in zip(ids, ids[1:]))

    @property
    def staged_bytes(self) -> int:
        """Bytes of one layer's staged bundle (K regions then V regions)."""
        return 2 * len(self.staged_idx) * self.layout.region_bytes

    @property
    def msgs_per_layer(self) -> int:
        return len(self.direct) + (1 if self.staged_idx else 0) + (1 if self.layout.has_scales else 0)

    @property
    def staged_msg(self) -> int:
        """Message index of the staged bundle within a layer."""
        return len(self.direct)

    @property
    def scales_msg(self) -> int:
        return len(self.direct) + (1 if self.staged_idx else 0)

    @property
    def layers_per_bundle(self) -> int:
        """Consecutive layers whose staged regions travel in one message (both sides derive it)."""
        if not self.staged_idx:
            return 1
        return max(1, min(self.layout.num_layers, self.bundle_bytes // self.staged_bytes))

    def bundles(self) -> list[tuple[int, int]]:
        """(first layer, layers) of each staged bundle, in order."""
        L, k = self.layout.num_layers, self.layers_per_bundle
        return [(l0, min(k, L - l0)) for l0 in range(0, L, k)]

    def staged_regions(self, l0: int, k: int, ids: Sequence[int],
                       num_blocks: int) -> list[tuple[int, int]]:
        """(byte offset in a pool of `num_blocks` blocks, bytes) of the staged regions of layers
        l0 .. l0 + k - 1 in message order -- per layer K then V, the staged positions in order,
        each at its block in `ids` (this side's ids) -- with adjacent regions merged: the
        descriptor list of a staged bundle sent or received in place (`staged_iov`)."""
        rb = self.layout.region_bytes
        out: list[tuple[int, int]] = []
        for layer in range(l0, l0 + k):
            for kv in (0, 1):
                base = (layer * 2 + kv) * num_blocks
                for i in self.staged_idx:
                    off = (base + ids[i]) * rb
                    if out and out[-1][0] + out[-1][1] == off:
                        out[-1] = (out[-1][0], out[-1][1] + rb)
                    else:
                        out.append((off, rb))
        return out

    def staging_window(self, staging_layers: int, budget: int = STAGING_BUDGET) -> int:
        """Staged bundles in flight (sender buffers, receiver ring): enough for `staging_layers`
        layers, or more while they fit in `budget` bytes (small transfers then post every receive
        up front, with no re-post round trip). Each side uses its own config: only the message
        boundaries (the bundles) must agree, and their size comes with the handoff record."""
        if not self.staged_idx:
            return self.layout.num_layers
        k = self.layers_per_bundle
        n = -(-self.layout.num_layers // k)
        if self.staged_iov:   # nothing is staged in a buffer: every bundle in flight at once
            return n
        return min(n, max(-(-staging_layers // k), budget // (k * self.staged_bytes), 1))

    @property
    def total_bytes(self) -> int:
        return len(self.dst_ids) * self.layout.block_bytes



def bundle_bytes_for(transfer_bytes: int, bundle_bytes: int, max_bundles: int,
                     staging_budget: int) -> int:
    """A transfer's bundle size: `bundle_bytes`, grown so that its staged layers take at most
    `max_bundles` messages (0: no growth), but not past half the staging budget (two bundles in
    flight). A pure function of the transfer's size, so the decode side derives the same value
    for its handoff record and both of its plans. Each message costs ~70 us of UCX rendezvous on
    the H200: 512 MiB went 10.2-10.5 ms in 16 MiB bundles, 6.1-6.7 ms in 64-128 MiB ones."""
    if not max_bundles:
        return bundle_bytes
    want = -(-transfer_bytes // max_bundles)
    return max(bundle_bytes, min(want, staging_budget // 2))


def ids_digest(ids: Sequence[int]) -> str:
    """Short hash of a block-id list, compared by both sides before any data moves."""
    return hashlib.sha1(json.dumps(list(ids)).encode()).hexdigest()[:16]
