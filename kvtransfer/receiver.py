"""Decode side of one transfer attempt: receives posted straight into reserved blocks.

Life of an attempt (one per lease epoch):
  begin     -> every direct message gets a tag receive posted on its destination blocks, the
               first staged bundles (plan.staging_window; a bundle spans plan.layers_per_bundle
               layers) get receives into a lease-owned ring -- or, with plan.staged_iov (host
               pools), every bundle a receive whose descriptor list is its destination regions;
               each posted receive is one admitted write on the lease (LeaseTable.begin_write)
  landing   -> a finished staged receive is scattered into the blocks (only while the lease is
               live), then its ring slot is re-posted for the bundle a ring's length ahead
  complete  -> wait for every receive, checksum the destination blocks, compare, and only then
               ask the lease table to hand the blocks to the request
  abort     -> (expiry, cancel, reissue, rejection, dead sender) every receive still posted is
               *plugged*: the agent sends a zero-length message with that tag to itself, which
               completes the receive without writing. When all receives have ended, the lease
               table frees the blocks (expired/cancelled) exactly once. A late write from the
               old sender then finds no receive: it waits in UCX's unexpected queue until the
               agent's sweeper drains it into scratch memory (see agent._sweep).
All methods run on the agent's event loop thread.
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import TYPE_CHECKING

import torch
from ucxx._lib.arr import Array
from ucxx.types import Tag, TagMaskFull

from . import iov, pool, readback
from .layout import TransferPlan
from .lease import LeaseTable
from .state import TransferFSM, TransferState
from .wire import data_tag

if TYPE_CHECKING:
    from .agent import TransferAgent


class RecvAttempt:
    def __init__(self, agent: "TransferAgent", lease_id: int, epoch: int, tag_key: int,
                 plan: TransferPlan, ep, fsm: TransferFSM, nonce: int = 0, post_ep=None) -> None:
        self.agent, self.lease_id, self.epoch, self.tag_key = agent, lease_id, epoch, tag_key
        # the sender's (from its `begin`), or the handoff record's (pre-posted): only data
        # tagged with it matches these receives
        self.nonce = nonce
        # ep: the sender's endpoint (None while a pre-posted attempt has no sender yet);
        # receives are posted on post_ep (tag matching is per worker: any endpoint of ours)
        self.plan, self.ep, self.fsm = plan, ep, fsm
        self.post_ep = post_ep if post_ep is not None else ep
        self.preposted = False     # made at reservation (decode_side._prepost)
        self.dst_digest: str | None = None   # pre-posted: what the sender's `complete` must name
        self.xid: int | None = None          # the sender's transfer id, once known
        self.landed_any = False
        self.started = time.perf_counter()
        self.leases: LeaseTable = agent.leases
        self.pending: dict[int, asyncio.Future] = {}   # tag -> receive still in flight
        self.tasks: list[asyncio.Future] = []
        self.errors: list[str] = []
        self.aborted = False
        self.drained = asyncio.Event()
        self.bundles = plan.bundles() if plan.staged_idx else []
        with agent.setup_stream():   # not behind this worker's decode step on the default stream
            self._make_buffers(agent, plan)
        self.left = [plan.msgs_per_layer] * plan.layout.num_layers
        self.layer_sums: list[int | None] = [None] * plan.layout.num_layers
        self._queue: list = []
        self._draining = False
        self.bytes = 0
        # benchmarks: (event, absolute perf_counter) on this side; comparable across processes
        self.trace: list[tuple[str, float]] = []

    def _make_buffers(self, agent: "TransferAgent", plan: TransferPlan) -> None:
        kv = agent.kv
        self.ring = []   # staged bundles received in place (plan.staged_iov) need none
        if not plan.staged_iov:
            self.dst_idx = pool.index_tensor([plan.dst_ids[i] for i in plan.staged_idx], kv.device)
            w = plan.staging_window(agent.config.staging_layers, agent.config.staging_budget_kib << 10)
            self.ring = [agent.staging.get(len(plan.staged_idx), plan.layers_per_bundle)
                         for _ in range(min(w, len(self.bundles)))]
        self.rx_scales = (torch.empty_like(agent.scales) if agent.scales is not None else None)
        # per-layer checksums, computed as soon as all of a layer's messages have landed, while
        # later layers are still in flight: from the landed ring slot when the staged bundle is
        # the layer's last message (a contiguous read of the bytes that were just scattered),
        # else from the destination blocks. Made by `prewarm` on the executor (not on the
        # begin -> posted path), or on first use.
        self._sums_blocks: pool.Checksummer | None = None
        self._sums_slot: pool.Checksummer | None = None
        self._fused: pool.FusedSums | None = None   # CUDA: the checksum kernels' ids and slots
        self._sums_lock = threading.Lock()   # made by the prewarm (executor) or on first use (loop)

    def _checksummer(self, from_slot: bool) -> pool.Checksummer:
        """The slot or block checksummer, made once (on its own stream, synced: usable from any
        stream or thread afterwards)."""
        kv, plan = self.agent.kv, self.plan
        with self._sums_lock:
            if from_slot and self._sums_slot is None:
                with self.agent.setup_stream():
                    self._sums_slot = pool.Checksummer(kv, plan.dst_ids, self.rx_scales, plan.staged_idx)
            elif not from_slot and self._sums_blocks is None:
                with self.agent.setup_stream():
                    self._sums_blocks = pool.Checksummer(kv, plan.dst_ids, self.rx_scales)
            return self._sums_slot if from_slot else self._sums_blocks

    # ---- posting -------------------------------------------------------------------------
    def post_all(self) -> bool:
        """Post the receives; False if the lease refused a write (then the attempt aborts)."""
        L = self.plan.layout.num_layers
        for layer in range(L):
            for m, d in enumerate(self.plan.direct):
                view = pool.direct_view(self.agent.kv, layer, d.kv, d.run.dst0, d.run.n)
                if not self._post(layer, m, view, None):
                    return False
            if self.rx_scales is not None:
                if not self._post(layer, self.plan.scales_msg, pool.as_buffer(self.rx_scales[layer]), None):
                    return False
        if self.plan.staged_iov:
            return all(self._post_iov(b) for b in range(len(self.bundles)))
        for b in range(len(self.ring)):
            if not self._post_staged(b):
                return False
        return True

    def _post_iov(self, b: int) -> bool:
        """Post staged bundle b's receive as a descriptor list of its destination regions
        (iov.py): the bytes land in the blocks themselves, in the plan's order."""
        if self.aborted or not self.leases.begin_write(self.lease_id, self.epoch):
            return False
        l0, k = self.bundles[b]
        kv = self.agent.kv
        desc = iov.Descriptors.bundle(self.plan, l0, k, self.plan.dst_ids, kv.shape[2],
                                      kv.data_ptr())
        tag = data_tag(self.tag_key, l0, self.plan.staged_msg, self.nonce)
        landing = iov.recv(self.agent._worker.handle, desc, tag, keep=kv)
        self._track(tag, landing, desc.nbytes, lambda: self._landed_in_place(l0, k))
        return True

    async def _landed_in_place(self, l0: int, k: int) -> None:
        """A bundle received in place landed: checksum, from the blocks, every layer of it whose
        messages have now all landed (one batch)."""
        done = []
        for layer in range(l0, l0 + k):
            self.left[layer] -= 1
            if self.left[layer] == 0:
                done.append(layer)
        sums = await asyncio.gather(*(self._work("sum", layer) for layer in done))
        for layer, v in zip(done, sums):
            self.layer_sums[layer] = v

    def _post_staged(self, b: int) -> bool:
        """Post the receive of staged bundle b into its ring slot (the last bundle may hold
        fewer layers: the slot's leading part)."""
        l0, k = self.bundles[b]
        slot = self.ring[b % len(self.ring)][:k]
        return self._post(l0, self.plan.staged_msg, pool.as_buffer(slot), (b, slot))

    def _post(self, layer: int, msg: int, buf, staged: tuple | None) -> bool:
        if self.aborted or not self.leases.begin_write(self.lease_id, self.epoch):
            return False
        tag = data_tag(self.tag_key, layer, msg, self.nonce)
        arr = buf if isinstance(buf, Array) else Array(buf)
        self.agent.top_up_futures()
        req = self.post_ep._ep.tag_recv(arr, Tag(tag), TagMaskFull)
        then = ((lambda: self._landed_bundle(*staged)) if staged is not None
                else (lambda: self._landed_layer(layer)))
        self._track(tag, req.wait(), arr.nbytes, then)
        return True

    def _track(self, tag: int, landing, nbytes: int, then) -> None:
        fut = asyncio.ensure_future(self._finish(tag, landing, nbytes, then))
        self.pending[tag] = fut
        self.tasks.append(fut)

    async def _finish(self, tag: int, landing, nbytes: int, then) -> None:
        """One posted receive: await its landing (a byte count, or None when UCX checked the
        size), then `then()` -- still inside the receive's admitted write -- and end the write."""
        try:
            got = await landing
            self.trace.append((f"recv {tag & 0x3FFFFFFF:#x}", time.perf_counter()))
            if self.preposted and not self.landed_any:   # a sender's data is landing
                self.landed_any, self.started = True, time.perf_counter()
                self.fsm.to(TransferState.TRANSFERRING)
            if not self.aborted:
                if got is not None and got != nbytes:
                    raise RuntimeError(f"carried {got} bytes, expected {nbytes}")
                self.bytes += nbytes
                await then()
        except Exception as e:   # cancelled by UCX (peer died), plugged after abort, short
            if not self.aborted:
                self.errors.append(f"receive {tag:#x} failed: {e!r}")
        finally:
            self.pending.pop(tag, None)
            self.leases.end_write(self.lease_id)
            if self.aborted and not self.pending:
                self.drained.set()

    async def _landed_layer(self, layer: int) -> None:
        """A direct run's or the scales' message landed: checksum the layer once it is whole."""
        self.left[layer] -= 1
        if self.left[layer] == 0:
            self.layer_sums[layer] = await self._work("sum", layer)

    async def _landed_bundle(self, b: int, slot: torch.Tensor) -> None:
        """Bundle b landed: scatter its layers (checksumming those whose other messages all
        landed already, in the same batch), re-post its ring slot for bundle b + ring size, then
        checksum the layers that completed during the scatter."""
        l0, k = self.bundles[b]
        layers = range(l0, l0 + k)
        done = [l for l in layers if self.left[l] == 1]
        sums = await self._work("scatter", l0, slot, done)
        nxt = b + len(self.ring)
        if nxt < len(self.bundles) and not self._post_staged(nxt):
            self.errors.append(f"lease refused the staged receive of bundle {nxt}")
        later = []
        for l in layers:
            self.left[l] -= 1
            if l in sums:
                self.layer_sums[l] = sums[l]
            elif self.left[l] == 0:
                later.append(l)
        for l in later:       # a direct message of the layer landed during the scatter
            if not self.aborted:
                self.layer_sums[l] = await self._work("sum", l)

    def prewarm(self) -> None:
        """Make the checksummers (index tensors to the GPU, ~0.3-0.7 ms) on the executor right
        after the receives are posted, so neither the first landed bundle nor this loop -- which
        must send `ready` and take the first data now -- pays for them."""
        asyncio.get_running_loop().run_in_executor(self.agent.executor, self._prewarm)

    def _prewarm(self) -> None:
        try:
            if self.agent.kv.is_cuda:
                self._fused_sums()
                return
            if self.plan.staged_idx and not self.plan.staged_iov:
                self._checksummer(True)
            if self.plan.direct or self.plan.staged_iov:
                self._checksummer(False)
        except Exception as e:   # surfaces again where the checksum is needed
            self.errors.append(f"checksum setup failed: {e!r}")

    def _work(self, kind: str, *args) -> asyncio.Future:
        """Queue torch work: ("scatter", first layer, slot, layers to checksum) or ("sum",
        layer). Everything queued while a batch runs goes in the next batch: one read-back per
        batch, not per message (CUDA: queued from this loop and polled; CPU: one executor hop).
        A scatter's result is {layer: checksum}, a sum's the int."""
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((kind, args, fut))
        if not self._draining:
            self._draining = True
            asyncio.ensure_future(self._drain())
        return fut

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    if self.agent.kv.is_cuda:   # queued from here, polled: no executor hop
                        out, wanted, rb = self._queue_batch(batch)
                        await readback.wait_gpu(rb.event, self.agent.executor,
                                            self.agent.config.spin_us * 1e-6)
                        res = self._finish_batch(out, wanted, rb.values())
                    else:
                        res = await self._run_batch_cpu(loop, batch)
                except Exception as e:
                    res = [e] * len(batch)
                for (_, _, fut), r in zip(batch, res):
                    if fut.done():
                        continue
                    if isinstance(r, Exception):
                        fut.set_exception(r)
                    else:
                        fut.set_result(r)
        finally:
            self._draining = False

    async def _run_batch_cpu(self, loop, batch) -> list:
        """CPU: a batch of checksums only (descriptor-list bundles) is split across two executor
        threads (numpy releases the GIL in its loops): the last bundle's sums are the tail of a
        transfer. A batch with scatters runs whole, in order (a sum may read what they wrote)."""
        ex = self.agent.executor
        if len(batch) < 2 or any(kind != "sum" for kind, _, _ in batch):
            return await loop.run_in_executor(ex, self._run_batch, batch)
        half = (len(batch) + 1) // 2
        a, b = await asyncio.gather(loop.run_in_executor(ex, self._run_batch, batch[:half]),
                                    loop.run_in_executor(ex, self._run_batch, batch[half:]))
        return a + b

    def _run_batch(self, batch) -> list:
        """CPU, on the executor: `_queue_batch` then `_finish_batch` (numpy work is synchronous)."""
        out, wanted, rb = self._queue_batch(batch)
        return self._finish_batch(out, wanted, rb)

    def _queue_batch(self, batch):
        """In queue order on the side stream: the scatters first (a scatter runs inside its
        receive's admitted write, so the lease cannot free the blocks under it), then the
        requested layer checksums -- of layers completed by a bundle, from its ring slot (before
        the slot is re-posted); the others from the blocks (queued after every scatter that could
        write them). Returns (per-item results so far, the wanted (item, layer) checksums, and
        their values: a list on CPU, a `readback.Readback` on CUDA whose event also covers the
        scatters -- the scattered slots are re-posted only once it fired)."""
        self.trace.append(("batch_start", time.perf_counter()))
        if self.agent.kv.is_cuda:
            return self._queue_batch_fused(batch)
        out: list = [None] * len(batch)
        from_slot: list[tuple[int, int, torch.Tensor]] = []   # (position in the batch, layer, slot row)
        from_blocks: list[tuple[int, int]] = []
        with self.agent.side_stream():
            for i, (kind, args, _) in enumerate(batch):
                if kind == "sum":
                    from_blocks.append((i, args[0]))
                    continue
                l0, slot, sum_layers = args
                try:
                    pool.scatter_staged(self.agent.kv, l0, self.dst_idx, slot)
                    out[i] = {}
                    from_slot += [(i, l, slot[l - l0]) for l in sum_layers]
                except Exception as e:
                    out[i] = e
            wanted = [(i, l) for i, l, _ in from_slot] + from_blocks
            try:
                values = self._sum_values(from_slot, from_blocks)
            except Exception as e:
                for i, _ in wanted:
                    out[i] = e
                wanted, values = [], (readback.Readback() if self.agent.kv.is_cuda else [])
        self.trace.append(("batch_queued", time.perf_counter()))
        return out, wanted, values

    def _queue_batch_fused(self, batch):
        """CUDA `_queue_batch`: one kernel per landed bundle scatters it and sums its layers
        (kernels/kv_checksum.py; the sums of layers still waiting for a direct message are
        dropped), one per run of consecutive layers summed from the blocks; every sum of the
        batch in one [2, layers] tensor (row 0: from a scatter, row 1: from the blocks), read
        back once."""
        out: list = [None] * len(batch)
        wanted: list[tuple[int, int, int]] = []     # (position in the batch, layer, row)
        L = self.plan.layout.num_layers
        with self.agent.side_stream():
            fused = self._fused_sums()
            sums = fused.sums.view(2, L)   # zeroed once per attempt; each (row, layer) is summed once
            blocks = sorted((args[0], i) for i, (kind, args, _) in enumerate(batch) if kind == "sum")
            for i, (kind, args, _) in enumerate(batch):
                if kind != "sum":
                    l0, slot, sum_layers = args
                    fused.add(sums[0, l0:], l0, slot.shape[0], "scatter", slot)
                    out[i] = {}
                    wanted += [(i, l, 0) for l in sum_layers]
            j = 0
            while j < len(blocks):   # runs of consecutive layers, queued after every scatter
                e = j + 1
                while e < len(blocks) and blocks[e][0] == blocks[e - 1][0] + 1:
                    e += 1
                fused.add(sums[1, blocks[j][0]:], blocks[j][0], e - j)
                wanted += [(i, l, 1) for l, i in blocks[j:e]]
                j = e
            rb = readback.Readback(sums, pick=[row * L + l for _, l, row in wanted])
        self.trace.append(("batch_queued", time.perf_counter()))
        return out, [(i, l) for i, l, _ in wanted], rb

    def _fused_sums(self) -> pool.FusedSums:
        with self._sums_lock:
            if self._fused is None:
                with self.agent.setup_stream():
                    self._fused = pool.FusedSums(self.agent.kv, self.plan.dst_ids,
                                                 self.plan.staged_idx, self.rx_scales,
                                                 sums=2 * self.plan.layout.num_layers)
            return self._fused

    def _finish_batch(self, out: list, wanted: list, values: list) -> list:
        for (i, l), v in zip(wanted, values):
            if isinstance(out[i], dict):
                out[i][l] = v
            elif not isinstance(out[i], Exception):
                out[i] = v
        self.trace.append(("batch_done", time.perf_counter()))
        return out

    def _sum_values(self, from_slot: list, from_blocks: list):
        """Checksums of the wanted layers in the order given (slot ones, then block ones): ints on
        CPU; on CUDA a `readback.Readback` (an event only, if none is wanted)."""
        slot_layers, slot_rows = [l for _, l, _ in from_slot], [r for *_, r in from_slot]
        block_layers = [l for _, l in from_blocks]
        if not self.agent.kv.is_cuda:
            return ((self._checksummer(True).layers(slot_layers, slot_rows) if from_slot else [])
                    + (self._checksummer(False).layers(block_layers) if from_blocks else []))
        parts = []
        if from_slot:
            parts.append(self._checksummer(True).layers_dev(slot_layers, slot_rows))
        if from_blocks:
            parts.append(self._checksummer(False).layers_dev(block_layers))
        return readback.Readback(torch.cat(parts) if parts else None)

    def release_ring(self) -> None:
        """All receives have ended (verified or drained): the ring buffers go back to the pool."""
        ring, self.ring = self.ring, []
        for t in ring:
            self.agent.staging.put(t)

    # ---- completion ----------------------------------------------------------------------
    async def verify(self, checksums: list[int]) -> str | None:
        """Wait for every receive, then compare checksums. None if the data is good."""
        while self.tasks:
            batch, self.tasks = self.tasks, []
            await asyncio.gather(*batch, return_exceptions=True)
        if not self.pending:   # no receive can still write into the ring
            self.release_ring()
        if self.aborted:
            return "attempt was aborted"
        if self.errors:
            return self.errors[0]
        self.trace.append(("recvs_done", time.perf_counter()))
        ours = self.layer_sums
        if any(x is None for x in ours):
            return "a layer's messages did not all land"
        self.trace.append(("checksummed", time.perf_counter()))
        if len(checksums) != len(ours):
            return f"completion has {len(checksums)} layer checksums, expected {len(ours)}"
        bad = [l for l, (a, b) in enumerate(zip(ours, checksums)) if a != b]
        if bad:
            return f"checksum mismatch in layers {bad[:8]}"
        if self.rx_scales is not None:
            with self.agent.setup_stream():
                same = torch.equal(self.rx_scales, self.agent.scales)
            if not same:
                return "FP8 scales differ from this pool's scales (KV quantized differently)"
        return None

    # ---- abort ---------------------------------------------------------------------------
    async def abort(self, reason: str) -> None:
        """Fail the attempt and plug every posted receive; returns once all have ended."""
        if not self.aborted:
            self.aborted = True
            self.fsm.fail(reason)
            for tag in list(self.pending):
                await self.agent.plug(tag)
            if not self.pending:
                self.drained.set()
            self.agent.tombstone(self.tag_key)
        await self.drained.wait()
        self.release_ring()

    @property
    def state(self) -> TransferState:
        return self.fsm.poll().state
