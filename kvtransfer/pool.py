"""The bridge between the plan and torch memory: buffer views, gather/scatter, checksums.

Everything that touches the KV tensor lives here; the rest of kvtransfer deals in ids.
`kv` is the pool tensor [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim] on CPU or
CUDA; `scales` (FP8 pools) is [num_layers, 2, num_kv_heads] float32.
"""
from __future__ import annotations

import numpy as np
import torch

from .layout import KVLayout, TransferPlan
from .readback import host_ints

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "fp8_e4m3": torch.float8_e4m3fn, "uint8": torch.uint8}
_MIX = 0x9E3779B97F4A7C15 - (1 << 64)   # odd 64-bit constant, as a signed int64


def torch_dtype(layout: KVLayout) -> torch.dtype:
    return _TORCH_DTYPES[layout.dtype]


def check_pool(kv: torch.Tensor, layout: KVLayout, scales: torch.Tensor | None) -> None:
    if tuple(kv.shape) != layout.shape or kv.dtype != torch_dtype(layout):
        raise ValueError(f"KV pool is {tuple(kv.shape)} {kv.dtype}; layout says "
                         f"{layout.shape} {torch_dtype(layout)}")
    if not kv.is_contiguous():
        raise ValueError("KV pool tensor must be contiguous")
    if layout.has_scales != (scales is not None):
        raise ValueError("layout.has_scales must match whether a scales tensor is given")
    if scales is not None and (tuple(scales.shape) != (layout.num_layers, 2, layout.num_kv_heads)
                               or scales.dtype != torch.float32 or not scales.is_contiguous()):
        raise ValueError("scales must be contiguous float32 [num_layers, 2, num_kv_heads]")


def as_buffer(t: torch.Tensor):
    """A contiguous tensor as something ucxx's Array accepts (no copy)."""
    flat = t.reshape(-1).view(torch.uint8)
    return flat if flat.is_cuda else flat.numpy()


def words(kv: torch.Tensor, layer: int) -> torch.Tensor:
    """One layer as int64 words per region: [2, num_blocks, region_bytes // 8]."""
    return kv[layer].reshape(2, kv.shape[2], -1).view(torch.int64)


def direct_view(kv: torch.Tensor, layer: int, kv_idx: int, start: int, n: int):
    """Blocks [start, start + n) of (layer, k|v) as a buffer for ucxx. CUDA: a raw span computed
    from the pool's base pointer (no torch view: torch's __cuda_array_interface__ costs tens of
    microseconds per message, and a transfer posts one per run and layer)."""
    if kv.is_cuda:
        region = kv.shape[3] * kv.shape[4] * kv.shape[5] * kv.element_size()
        first = ((layer * 2 + kv_idx) * kv.shape[2] + start) * region
        return CudaSpan(kv.data_ptr() + first, n * region)
    return as_buffer(kv[layer, kv_idx, start:start + n])


class CudaSpan:
    """`nbytes` of device memory at `ptr`, as ucxx's Array reads it (the pool outlives it)."""
    __slots__ = ("__cuda_array_interface__",)

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                         "version": 3, "strides": None}


def index_tensor(ids, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(list(ids), dtype=torch.long, device=device)


# On CPU, gathers, scatters and sums go through numpy (single-threaded, no OpenMP): torch's
# OpenMP regions cost milliseconds each on small busy VMs and made CPU checksums run at ~80 MB/s.

def _np_words(kv: torch.Tensor, layer: int):
    return words(kv, layer).numpy()


def gather_staged(kv: torch.Tensor, layer: int, src_idx: torch.Tensor, out: torch.Tensor) -> None:
    """out[x, k|v, i] = kv[layer + x, k|v, src_idx[i]];  out: [layers, 2, n, *region] (or
    [2, n, *region] for one layer). One kernel for all the bundle's layers on CUDA."""
    k = out.shape[0] if out.dim() == kv.dim() else 1
    out4 = out.reshape(k, 2, src_idx.numel(), -1)
    if kv.is_cuda:
        src = kv[layer:layer + k].reshape(k, 2, kv.shape[2], -1)
        torch.index_select(src, 2, src_idx, out=out4)
    else:
        idx = src_idx.numpy()
        for x in range(k):
            np.take(_np_words(kv, layer + x), idx, axis=1, out=out4[x].view(torch.int64).numpy())


def scatter_staged(kv: torch.Tensor, layer: int, dst_idx: torch.Tensor, staged: torch.Tensor) -> None:
    """The inverse of gather_staged: kv[layer + x, k|v, dst_idx[i]] = staged[x, k|v, i]."""
    k = staged.shape[0] if staged.dim() == kv.dim() else 1
    st4 = staged.reshape(k, 2, dst_idx.numel(), -1)
    if kv.is_cuda:
        kv[layer:layer + k].reshape(k, 2, kv.shape[2], -1).index_copy_(2, dst_idx, st4)
    else:
        idx = dst_idx.numpy()
        for x in range(k):
            _np_words(kv, layer + x)[:, idx] = st4[x].view(torch.int64).numpy()


def staging_tensor(kv: torch.Tensor, n: int, layers: int = 0) -> torch.Tensor:
    """A staging buffer for n blocks' regions: [2, n, *region], or [layers, 2, n, *region]."""
    lead = (layers,) if layers else ()
    return torch.empty((*lead, 2, n, *kv.shape[3:]), dtype=kv.dtype, device=kv.device)


def region_sums(kv: torch.Tensor, layer: int, idx: torch.Tensor,
                runs: list[tuple[int, int, int]]) -> torch.Tensor:
    """Word sums of regions (layer, k|v, ids) in plan order: [2, n] int64.

    `runs` lists (position, first id, length) of coalesced runs: long runs are summed through
    views (no copy), the rest through one index_select.
    """
    cpu = not kv.is_cuda
    w = _np_words(kv, layer) if cpu else words(kv, layer)
    out = torch.empty((2, idx.numel()), dtype=torch.int64, device=kv.device)
    o = out.numpy() if cpu else out
    short = []
    for pos, first, n in runs:
        if n >= 8:
            o[:, pos:pos + n] = w[:, first:first + n].sum(-1)
        else:
            short.extend(range(pos, pos + n))
    if short:
        if cpu:
            sel = np.asarray(short)
            o[:, sel] = w[:, idx.numpy()[sel]].sum(-1)
        else:
            sel = torch.as_tensor(short, dtype=torch.long, device=kv.device)
            o[:, sel] = w.index_select(1, idx[sel]).sum(-1)
    return out


def ids_runs(ids) -> list[tuple[int, int, int]]:
    """(position, first id, length) of maximal runs of consecutive ids."""
    runs, i, ids = [], 0, list(ids)
    while i < len(ids):
        j = i + 1
        while j < len(ids) and ids[j] == ids[j - 1] + 1:
            j += 1
        runs.append((i, ids[i], j - i))
        i = j
    return runs


def layer_checksum(kv: torch.Tensor, layer: int, idx: torch.Tensor,
                   scales: torch.Tensor | None = None,
                   runs: list[tuple[int, int, int]] | None = None) -> torch.Tensor:
    """int64 (0-d tensor, on kv's device) over the regions (layer, k|v, idx[i]) in plan order.

    Per-region word sums, each weighted by an odd, position-dependent factor, so a corrupted
    byte and a region landing in the wrong block both change it. Integer arithmetic wraps
    mod 2^64 and is exact, so CPU and CUDA agree.
    """
    if runs is None:
        runs = ids_runs(idx.tolist())
    sums = region_sums(kv, layer, idx, runs).reshape(-1)                  # [2n]
    if not kv.is_cuda:
        with np.errstate(over="ignore"):
            s = sums.numpy()
            wts = (np.arange(s.size, dtype=np.int64) * 2 + 1) * np.int64(_MIX)
            total = torch.tensor(int((s * wts).sum()), dtype=torch.int64)
    else:
        weights = torch.arange(sums.numel(), device=kv.device, dtype=torch.int64) * 2 + 1
        total = (sums * (weights * _MIX)).sum()
    if scales is not None:
        total = total + scales[layer].reshape(-1).view(torch.int64).sum() * 7
    return total


def plan_checksums(kv: torch.Tensor, plan: TransferPlan, ids, scales=None) -> list[int]:
    """Checksums of all layers for the blocks `ids` (src ids on the sender, dst on the receiver)."""
    idx = index_tensor(ids, kv.device)
    runs = ids_runs(ids)
    sums = [layer_checksum(kv, l, idx, scales, runs) for l in range(plan.layout.num_layers)]
    return [int(x) for x in torch.stack(sums).tolist()]


class Checksummer:
    """Layer checksums of one transfer (same value as `layer_checksum`), with the indexing
    precomputed once per transfer instead of per layer (no per-layer host->device index copies).

    `ids` are the block ids in plan order. Positions listed in `staged_pos` are summed from a
    staging buffer that holds exactly those regions in that order (the sender's gathered bundle:
    a contiguous read instead of a second gather); long runs of consecutive ids are summed
    through views of the pool; the rest through one index_select.
    """

    def __init__(self, kv: torch.Tensor, ids, scales: torch.Tensor | None = None,
                 staged_pos=()) -> None:
        self.kv, self.scales, self.cpu = kv, scales, not kv.is_cuda
        ids = [int(i) for i in ids]
        self.n = len(ids)
        staged = set(staged_pos)
        self.staged_pos = [int(p) for p in staged_pos]
        self.views: list[tuple[int, int, int]] = []   # (position, first id, length)
        short_pos: list[int] = []
        i = 0
        while i < self.n:
            if i in staged:
                i += 1
                continue
            j = i + 1
            while j < self.n and j not in staged and ids[j] == ids[j - 1] + 1:
                j += 1
            if j - i >= 4:
                self.views.append((i, ids[i], j - i))
            else:
                short_pos.extend(range(i, j))
            i = j
        short_ids = [ids[p] for p in short_pos]
        # every region comes from the staging buffer, in plan order (a fully staged transfer):
        # a layer's checksum is then a few ops over that buffer alone (v12 traces: the general
        # path's ~15 dispatches were most of a hop's host time)
        self.all_staged = self.staged_pos == list(range(self.n))
        self.short_bytes = max(2 * len(short_ids) * kv[0, 0, 0].numel() * kv.element_size(), 1)
        dev = kv.device
        if self.cpu:
            self.short_pos, self.short_ids = np.asarray(short_pos, np.int64), np.asarray(short_ids, np.int64)
            self.staged_pos_i = np.asarray(self.staged_pos, np.int64)
            with np.errstate(over="ignore"):
                self.wts = (np.arange(2 * self.n, dtype=np.int64) * 2 + 1) * np.int64(_MIX)
        else:
            self.short_pos = torch.as_tensor(short_pos, dtype=torch.long, device=dev)
            self.short_ids = torch.as_tensor(short_ids, dtype=torch.long, device=dev)
            self.staged_pos_i = torch.as_tensor(self.staged_pos, dtype=torch.long, device=dev)
            self.wts = (torch.arange(2 * self.n, device=dev, dtype=torch.int64) * 2 + 1) * _MIX

    def layer(self, layer: int, staging: torch.Tensor | None = None):
        """The layer's checksum: an int (CPU) or a 0-d int64 tensor on the GPU (not synced)."""
        kv, n = self.kv, self.n
        if self.cpu:
            w = _np_words(kv, layer)
            o = np.empty((2, n), np.int64)
            for pos, first, ln in self.views:
                o[:, pos:pos + ln] = w[:, first:first + ln].sum(-1)
            if self.short_pos.size:
                o[:, self.short_pos] = w[:, self.short_ids].sum(-1)
            if self.staged_pos:
                o[:, self.staged_pos_i] = staging.reshape(2, len(self.staged_pos), -1) \
                    .view(torch.int64).numpy().sum(-1)
            with np.errstate(over="ignore"):
                total = int((o.reshape(-1) * self.wts).sum())
                if self.scales is not None:
                    total += int(self.scales[layer].reshape(-1).view(torch.int64).numpy().sum()) * 7
            return ((total + (1 << 63)) % (1 << 64)) - (1 << 63)
        return self._consecutive(layer, 1, [staging])[0]

    def layers(self, layers, stagings=None, budget: int = 256 << 20) -> list[int]:
        """Checksums of several layers as ints, equal to `layer()` one by one. On CUDA each run of
        consecutive layers is summed by one set of kernels over [k, 2, blocks] (k bounded so the
        gathered short regions stay within `budget` bytes) and read back with one copy: a
        32-layer transfer costs a handful of launches instead of ~6 per layer."""
        layers = [int(l) for l in layers]
        stagings = list(stagings) if stagings is not None else [None] * len(layers)
        if self.cpu:
            return [self.layer(l, s) for l, s in zip(layers, stagings)]
        return host_ints(self.layers_dev(layers, stagings, budget))

    def layers_dev(self, layers, stagings=None, budget: int = 256 << 20) -> torch.Tensor:
        """CUDA: `layers()` as an int64 tensor on the GPU, not read back (callers batch the
        read-backs of several checksummers into one)."""
        layers = [int(l) for l in layers]
        stagings = list(stagings) if stagings is not None else [None] * len(layers)
        out: list = []
        i = 0
        step = max(1, budget // self.short_bytes)
        while i < len(layers):
            j = i + 1
            while j < len(layers) and j - i < step and layers[j] == layers[j - 1] + 1:
                j += 1
            out.append(self._consecutive(layers[i], j - i, stagings[i:j]))
            i = j
        return torch.cat(out) if out else torch.empty(0, dtype=torch.int64, device=self.kv.device)

    def _consecutive(self, l0: int, k: int, stagings: list) -> torch.Tensor:
        """[k] int64 checksums of layers l0 .. l0 + k - 1 (torch; any device)."""
        kv, n = self.kv, self.n
        if self.all_staged:
            total = (self._staged_sums(stagings).reshape(k, -1) * self.wts).sum(-1)
            if self.scales is not None:
                total = total + self.scales[l0:l0 + k].reshape(k, -1).view(torch.int64).sum(-1) * 7
            return total
        w = kv[l0:l0 + k].reshape(k, 2, kv.shape[2], -1).view(torch.int64)
        o = torch.empty((k, 2, n), dtype=torch.int64, device=kv.device)
        for pos, first, ln in self.views:
            o[:, :, pos:pos + ln] = w[:, :, first:first + ln].sum(-1)
        if len(self.short_pos):
            o[:, :, self.short_pos] = w.index_select(2, self.short_ids).sum(-1)
        if self.staged_pos:
            o[:, :, self.staged_pos_i] = self._staged_sums(stagings)
        total = (o.reshape(k, -1) * self.wts).sum(-1)
        if self.scales is not None:
            total = total + self.scales[l0:l0 + k].reshape(k, -1).view(torch.int64).sum(-1) * 7
        return total


    def _staged_sums(self, stagings: list) -> torch.Tensor:
        """[k, 2, staged] word sums of per-layer staging views; consecutive layers of one bundle
        buffer ([layers, 2, n, *region]) are summed by one op over the buffer's slice."""
        ns, out, i = len(self.staged_pos), [], 0
        while i < len(stagings):
            s, base = stagings[i], stagings[i]._base
            step = s.numel() * s.element_size()
            j = i + 1
            if base is not None and base.dim() == self.kv.dim():
                while (j < len(stagings) and stagings[j]._base is base
                       and stagings[j].data_ptr() == s.data_ptr() + (j - i) * step):
                    j += 1
                x0 = (s.data_ptr() - base.data_ptr()) // step
                s = base[x0:x0 + j - i]
            out.append(s.reshape(j - i, 2, ns, -1).view(torch.int64).sum(-1))
            i = j
        return out[0] if len(out) == 1 else torch.cat(out)


class FusedSums:
    """CUDA: layer checksums (the same value as `layer_checksum`) computed by one kernel per
    bundle of layers, fused with the staging copy (kernels/kv_checksum.py: gather on the sender,
    scatter on the receiver; each region read once). The block ids in plan order, each
    position's staging slot (-1: not staged) and `sums` zeroed int64 accumulators (`.sums`, for
    the caller's checksums) go to the GPU in one copy from pageable memory, once per transfer
    (one driver call instead of a pinned allocation, a copy and a torch.zeros; end to end within
    the noise: bench/results/transfer-cuda-s17.md). ~3 launches per bundle instead of ~15 torch
    ops (a torch op costs ~30 us of host time on the H200 hosts)."""

    def __init__(self, kv: torch.Tensor, ids, staged_pos=(), scales: torch.Tensor | None = None,
                 sums: int = 0) -> None:
        from splitserve.kernels.kv_checksum import region_sums
        self._kernel, self.kv, self.scales = region_sums, kv, scales
        n = len(ids)
        host = np.zeros(2 * n + sums, dtype=np.int64)
        host[:n] = np.asarray(ids, dtype=np.int64)
        host[n:2 * n] = -1
        if len(staged_pos):
            host[n + np.asarray(staged_pos, dtype=np.int64)] = np.arange(len(staged_pos))
        dev = torch.from_numpy(host)
        if kv.is_cuda:   # (CPU: the kernel under TRITON_INTERPRET, in tests)
            dev = dev.to(kv.device)   # returns once the copy has landed
        self.ids, self.slots, self.sums = dev[:n], dev[n:2 * n], dev[2 * n:]

    def add(self, sums: torch.Tensor, l0: int, k: int, mode: str = "sum",
            buf: torch.Tensor | None = None) -> None:
        """Queue (current stream) layers l0 .. l0 + k - 1's checksums into sums[:k] (zeroed);
        mode gather / scatter copies the staged regions to / from `buf` [k, 2, staged, *region]
        as it reads them."""
        self._kernel(self.kv, l0, k, self.ids, sums, mode, self.slots, buf)
        if self.scales is not None:
            sums[:k] += self.scales[l0:l0 + k].reshape(k, -1).view(torch.int64).sum(-1) * 7


class BufferPool:
    """Staging buffers reused across layers and transfers (no allocation per layer: on CPU a
    fresh 100+ MiB buffer costs page faults on first touch). Keeps at most `cap_bytes` idle.

    CUDA: buffers are allocated *on `stream`*, the stream that uses them (the agent's side
    stream). torch's caching allocator hands a block freed on a stream to the next allocation on
    that same stream at once, trusting stream order: allocated on the default stream (the loop
    thread's current one), a staging buffer could get memory a forward on that stream had freed
    with its kernels still queued -- the side-stream gather then ran first and the queued kernel
    overwrote the buffer before the peer read it. Seen once on two H200s as a checksum mismatch in
    a streamed transfer that needed fresh buffers during a forward; the checksums refused it."""

    def __init__(self, kv: torch.Tensor, cap_bytes: int = 1 << 30, stream=None) -> None:
        import threading
        self.kv, self.cap, self.stream = kv, cap_bytes, stream
        self._free: dict[int, list[torch.Tensor]] = {}
        self._idle = 0
        self._lock = threading.Lock()

    def get(self, n: int, layers: int = 0) -> torch.Tensor:
        """A [2, n, *region] buffer, or [layers, 2, n, *region] (a multi-layer bundle)."""
        key = ((layers,) if layers else ()) + (2, n)
        with self._lock:
            lst = self._free.get(key)
            if lst:
                t = lst.pop()
                self._idle -= t.numel() * t.element_size()
                return t
        if self.stream is None:
            return staging_tensor(self.kv, n, layers)
        with torch.cuda.stream(self.stream):
            return staging_tensor(self.kv, n, layers)

    def put(self, t: torch.Tensor) -> None:
        nb = t.numel() * t.element_size()
        with self._lock:
            if self._idle + nb <= self.cap:
                self._free.setdefault(tuple(t.shape[:-3]), []).append(t)
                self._idle += nb
