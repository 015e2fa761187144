"""The data half of `KVSender` (sender.py): pushed layers -> posted sends, with their checksums.

Per batch of pushed (and computed) layers: wait for their KV (CUDA events), gather each staged
bundle into a pooled staging buffer (or, host pools with `plan.staged_iov`, describe its regions
in place: iov.py), compute the layers' checksums, post the direct runs', the bundles' and the
FP8 scales' tag sends. The protocol around it (begin, ready, complete, ack, cancel) is in
sender.py; this mixin reads the sender's plan, handoff, agent and trace.
"""
from __future__ import annotations

import asyncio
import time

import torch
from ucxx._lib.arr import Array
from ucxx.types import Tag

from . import iov, pool, readback
from .wire import data_tag

_UNSET = asyncio.Event()   # never set: "not pushed yet"
# CUDA, to a peer on another GPU: the most data one prep step (wait, gather, checksums, then the
# sends) covers. A step's sends are posted only after its checksums are read back, so one step
# over a whole big transfer held every byte back until all of it was summed (two H200s, 8 GiB
# contiguous: first send at 8.5 ms of 33.7). Smaller steps start the data at once and sum the
# next step's layers while the previous step's data crosses NVLink: same-call A/B on two H200s,
# 512 MiB 9.00 -> 5.77 ms (contiguous) and 10.27 -> 8.85 (scattered), 8 GiB 34.1 -> 32.5 and
# 44.6 -> 38.1 ms. When both processes share one GPU the sums and the copies compete for the
# same HBM and the cap lost (8 GiB 13.5 -> 22.5 ms, 29.8 -> 41.4), so it is not applied there
# (transfer-cuda-x2-v26-ab.md, transfer-cuda-v26-ab.md).
PREP_STEP_BYTES = 256 << 20   # 0: no cap (one step takes every computed unit the window allows)


class LayerPipeline:
    """Mixin of KVSender: its layer-by-layer data path (see the module docstring)."""

    async def _send_layers(self, peer):
        """Post every layer's sends as soon as it is pushed, unit by unit: a unit is one staged
        bundle's layers (plan.bundles(); one layer when nothing is staged). Per batch of units
        that are ready together, one step waits for their KV (CUDA event) and gathers each
        bundle's staged regions into a pooled buffer (one kernel per bundle), and the layers'
        checksums are computed (staged regions from the gathered buffer, a contiguous read).
        On CUDA the gathers and the sums are one step queued from this loop, its read-back
        polled (`_prepare_on_loop`), then the sends are posted: a second hop for the sums cost
        0.6-1.5 ms of host time on a busy process (v11 traces), and sums running beside the
        copies made 8 GiB contiguous 10-15% slower on one H200 (their HBM reads). On CPU the
        sends go first: one bundle's gather per executor step, its sends posted, the sums run
        on the executor while UCX sends (512 MiB over TCP loopback: -15% contiguous, -25%
        scattered). Both A/Bs: bench/results/transfer-2026-11-30-s11.md. Returns (send
        futures, checksum futures per batch)."""
        kv, plan, loop = self.agent.kv, self.plan, asyncio.get_running_loop()
        if plan.staged_iov and plan.staged_idx:
            return await self._send_layers_iov(peer)
        with self.agent.setup_stream():   # not behind the forward on the default stream
            if kv.is_cuda:   # one kernel per bundle: gather + checksums (pool.FusedSums)
                src_staged = None
                self._fused = pool.FusedSums(kv, self.src_ids, plan.staged_idx, self.agent.scales,
                                             sums=plan.layout.num_layers)
                self._sums_dev = self._fused.sums
            else:
                src_staged = pool.index_tensor([self.src_ids[i] for i in plan.staged_idx], kv.device)
                self._sums = pool.Checksummer(kv, self.src_ids, self.agent.scales, plan.staged_idx)
            if kv.is_cuda:   # direct runs whose src ids are scattered (pre-posted plans)
                self._gather_runs = {r.i0: (r, pool.index_tensor(self.src_ids[r.i0:r.i0 + r.n], kv.device))
                                     for r in self._scattered_runs()}
        self._t("setup")
        units = plan.bundles() if plan.staged_idx else [(l, 1) for l in range(plan.layout.num_layers)]
        cfg = self.agent.config
        win = plan.staging_window(cfg.staging_layers, cfg.staging_budget_kib << 10)
        window = asyncio.Semaphore(win)
        sends: list = []
        u = 0
        # CPU gathers are long (numpy, ~1-2 GB/s): one bundle per step, so each bundle's send
        # starts as soon as it is gathered and overlaps the next gather. CUDA: steps of at most
        # PREP_STEP_BYTES, and, when the staging window cannot hold every bundle, of at most
        # half of it (the next step's gathers then run while the previous step's buffers are
        # on the wire)
        most = win
        paced = kv.is_cuda and PREP_STEP_BYTES > 0 and peer.device != self.agent.device_id
        if plan.staged_idx and not kv.is_cuda:
            most = 1
        elif plan.staged_idx and paced and win < len(units):
            most = max(1, win // 2)
        if paced:   # another GPU (module comment; PREP_STEP_BYTES 0: no cap)
            unit_bytes = units[0][1] * plan.total_bytes // plan.layout.num_layers
            most = min(most, max(1, PREP_STEP_BYTES // max(unit_bytes, 1)))
        while u < len(units):
            await self._units_ready(units[u])
            batch = [units[u]]
            while (len(batch) < most and u + len(batch) < len(units)
                   and self._is_computed(units[u + len(batch)])):
                batch.append(units[u + len(batch)])
            stagings = []
            for _, k in batch:
                if plan.staged_idx:
                    await window.acquire()
                    stagings.append(self.agent.staging.get(len(plan.staged_idx), k))
                else:
                    stagings.append(None)
            first, last = batch[0][0], batch[-1][0] + batch[-1][1] - 1
            self._t(f"prep {first}-{last}")
            layers = list(range(first, last + 1))
            t0 = time.perf_counter()
            if kv.is_cuda:   # sums before sends (see the docstring)
                sums = loop.create_future()
                sums.set_result(await self._prepare_on_loop(batch, src_staged, stagings, layers))
            else:
                per_layer = [None if st is None else st[x] for st, (_, k) in zip(stagings, batch)
                             for x in range(k)]
                # a batch with nothing to gather (direct runs only) posts its sends at once: the
                # executor's one thread is usually still summing the previous batch
                # (bench/results/transfer-cpu-s16-inline-ab.md: 32 MiB -1.5 / -2.7 ms)
                if any(st is not None for st in stagings):
                    await loop.run_in_executor(self.agent.executor, self._queue_gathers, batch,
                                               src_staged, stagings)
                sums = loop.run_in_executor(self.agent.executor, self._sums.layers, layers, per_layer)
            self.prep_s += time.perf_counter() - t0
            self._t(f"prepped {first}-{last}")
            self._sum_futs.append(sums)
            # CPU: the checksums read the staging buffers while they are sent; a buffer goes back
            # to the pool only after both (CUDA: summed before the sends)
            read_by = None if kv.is_cuda else sums
            self._post_direct(peer, layers, sends)
            for (l0, _), staging in zip(batch, stagings):
                if staging is not None:
                    sends.append(self._send(peer, pool.as_buffer(staging), l0, plan.staged_msg,
                                            window, staging, read_by))
            u += len(batch)
        return sends, self._sum_futs

    def _scattered_runs(self) -> list:
        """Direct runs whose src ids are not consecutive: a pre-posted plan's runs come from the
        dst ids alone (layout.TransferPlan). Sent from a gathered buffer (CUDA) or as a
        descriptor list of the regions in place (host pools)."""
        if self._scattered is None:
            runs = {d.run.i0: d.run for d in self.plan.direct}
            self._scattered = [r for r in runs.values() if not self.plan.src_contiguous(r)]
        return self._scattered

    def _post_direct(self, peer, layers: list[int], sends: list) -> None:
        """The direct runs' and the FP8 scales' messages of these layers."""
        kv, plan = self.agent.kv, self.plan
        scattered = {r.i0 for r in self._scattered_runs()} if plan.direct else set()
        for l in layers:
            for m, d in enumerate(plan.direct):
                if d.run.i0 not in scattered:
                    sends.append(self._send(peer, pool.direct_view(kv, l, d.kv, d.run.src0, d.run.n),
                                            l, m, None))
                elif kv.is_cuda:   # gathered with the layer's staged regions (_queue_gathers)
                    buf = self._gathered.pop((l, d.run.i0, d.kv))
                    sends.append(self._send(peer, pool.as_buffer(buf), l, m, None))
                else:
                    desc = iov.Descriptors.regions(kv, l, d.kv, self.src_ids[d.run.i0:d.run.i0 + d.run.n])
                    sends.append(self._send_iov(peer, desc, l, m))
            if self.agent.scales is not None:
                sends.append(self._send(peer, pool.as_buffer(self.agent.scales[l]), l,
                                        plan.scales_msg, None))

    async def _send_layers_iov(self, peer):
        """Host pools (`plan.staged_iov`): each staged bundle leaves as a descriptor list of its
        regions in the pool (iov.py) as soon as its layers are pushed: no gather, no staging
        buffer. The checksums (from the blocks) run on the executor while UCX sends."""
        kv, plan, loop = self.agent.kv, self.plan, asyncio.get_running_loop()
        self._sums = pool.Checksummer(kv, self.src_ids, self.agent.scales)
        self._t("setup")
        sends: list = []
        for l0, k in plan.bundles():
            await self._units_ready((l0, k))
            layers = list(range(l0, l0 + k))
            self._post_direct(peer, layers, sends)
            desc = iov.Descriptors.bundle(plan, l0, k, self.src_ids, kv.shape[2], kv.data_ptr())
            sends.append(self._send_iov(peer, desc, l0, plan.staged_msg))
            self._sum_futs.append(loop.run_in_executor(self.agent.executor, self._sums.layers,
                                                       layers))
            self._t(f"prepped {l0}-{l0 + k - 1}")
        return sends, self._sum_futs

    def _send_iov(self, peer, desc: "iov.Descriptors", layer: int, msg: int):
        tag = data_tag(self.handoff.tag_key, layer, msg, self.nonce)
        fut = iov.send(peer.ep._ep.handle, desc, tag, keep=self.agent.kv)
        self.msgs_posted += 1

        async def done():
            await fut
            self._t(f"sent {layer}.{msg}")
            self.bytes_sent += desc.nbytes
        return asyncio.ensure_future(done())

    def _is_computed(self, unit: tuple[int, int]) -> bool:
        """Pushed *and* already computed on the GPU (its event has fired). The host runs ahead of
        the GPU: every layer is usually pushed long before it is computed, and a batch that took
        every pushed unit would make its hop wait for the last of them, so the final batch
        (gathered, sent and summed after the forward ends) would span many layers. Batching only
        what is computed keeps the batches in step with the GPU and the last one small
        (measured alone, v8: no change in the exposed time; the stall was elsewhere, see v9)."""
        l0, k = unit
        for l in range(l0, l0 + k):
            if not self._layer_ready.get(l, _UNSET).is_set():
                return False
            ev = self._events.get(l)
            if ev is not None and not ev.query():
                return False
        return True

    async def _units_ready(self, unit: tuple[int, int]) -> None:
        l0, k = unit
        for l in range(l0, l0 + k):
            await self._layer_ready.setdefault(l, asyncio.Event()).wait()

    def _layer_events(self, layers) -> list:
        """The distinct CUDA events of these layers' pushes (push_all shares one among all)."""
        out, seen = [], set()
        for layer in layers:
            ev = self._events.get(layer)
            if ev is not None and id(ev) not in seen:
                seen.add(id(ev))
                out.append(ev)
        return out

    def _queue_gathers(self, units: list[tuple[int, int]], staged_idx: torch.Tensor | None,
                       stagings: list) -> bool:
        """On the current (side) stream: wait for each layer's KV (its CUDA event, so the forward
        on the main stream is not blocked; push_all shares one event among all layers) and gather
        each bundle's staged regions (CPU; on CUDA, `staged_idx` None, the checksum kernel
        gathers them). True if every event had already fired (the work is runnable now)."""
        events = self._layer_events(l for l0, k in units for l in range(l0, l0 + k))
        for ev in events:
            torch.cuda.current_stream().wait_event(ev)
        runnable = all(ev.query() for ev in events)
        for (l0, _), staging in zip(units, stagings):
            if staging is not None and staged_idx is not None:
                pool.gather_staged(self.agent.kv, l0, staged_idx, staging)
        for r, idx in self._gather_runs.values():   # scattered-src direct runs
            for l0, k in units:
                for l in range(l0, l0 + k):
                    buf = pool.staging_tensor(self.agent.kv, r.n)   # [2, n, *region]
                    pool.gather_staged(self.agent.kv, l, idx, buf)
                    self._gathered[(l, r.i0, 0)], self._gathered[(l, r.i0, 1)] = buf[0], buf[1]
        return runnable

    async def _prepare_on_loop(self, units: list[tuple[int, int]], staged_idx: torch.Tensor,
                               stagings: list, layers: list[int]) -> list[int]:
        """CUDA: the gathers and the layers' checksums queued from the loop thread (nothing here
        blocks): one fused kernel per bundle (gather + sums), or one over the batch's layers when
        nothing is staged; then their read-back event polled while the work is runnable, else
        waited for on the executor (the forward has not reached those layers yet). Returns the
        checksums."""
        with self.agent.side_stream():
            runnable = self._queue_gathers(units, staged_idx, stagings)
            if stagings[0] is None:   # nothing staged: the units are consecutive layers
                self._fused.add(self._sums_dev[layers[0]:], layers[0], len(layers))
            else:
                for (l0, k), staging in zip(units, stagings):
                    self._fused.add(self._sums_dev[l0:], l0, k, "gather", staging)
            rb = readback.Readback(self._sums_dev[layers[0]:layers[-1] + 1])
        self._t(f"queued {units[0][0]}{'' if runnable else ' (waits for the forward)'}")
        spin = self.agent.config.spin_us * 1e-6 if runnable else 0.0
        await readback.wait_gpu(rb.event, self.agent.executor, spin)
        return rb.values()

    def _send(self, peer, buf, layer: int, msg: int, window: asyncio.Semaphore | None,
              staging: torch.Tensor | None = None, read_by: asyncio.Future | None = None):
        t0 = time.perf_counter()
        arr = Array(buf)
        self.agent.top_up_futures()
        req = peer.ep._ep.tag_send(arr, Tag(data_tag(self.handoff.tag_key, layer, msg, self.nonce)))
        self.msgs_posted += 1
        self.send_s += time.perf_counter() - t0

        async def done():
            ok = False
            try:
                await req.wait()
                ok = True
                self._t(f"sent {layer}.{msg}")
                self.bytes_sent += arr.nbytes
            finally:
                # the buffer goes back to the pool once UCX and the checksums (`read_by`) are
                # done with it; a failed/cancelled send's, or a failed sum's, is not reused
                if staging is not None and ok:
                    self._release_after(staging, window, read_by)
                elif window is not None:
                    window.release()
        return asyncio.ensure_future(done())

    def _release_after(self, staging: torch.Tensor, window: asyncio.Semaphore | None,
                       read_by: asyncio.Future | None) -> None:
        """Return a sent staging buffer (and its window slot) once `read_by` (the checksums
        reading it) is done; the slot only, if they failed."""
        def release(f=None) -> None:
            if f is None or (not f.cancelled() and f.exception() is None):
                self.agent.staging.put(staging)
            if window is not None:
                window.release()
        if read_by is None or read_by.done():
            release(read_by)
        else:
            read_by.add_done_callback(release)
