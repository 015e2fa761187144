"""Prefill side of one transfer: `KVSender`, driven by the prefill forward, layer by layer.

    sender = agent.open_sender(handoff, src_block_ids)    # Bootstrapping
    for layer in model:                                      # the forward pass
        ...compute layer, write its KV into the pool...
        sender.push_layer(layer_idx)                         # non-blocking, thread-safe
    sender.poll()   # Transferring ... Success | Failed(reason)

On the agent's loop: connect (cached endpoint, compatibility checked at first contact), send
`begin` and, without waiting for the decode side's `ready`, per pushed layer: wait until the
layer's KV is written (a CUDA event recorded by push_layer), gather the staged regions into a
staging buffer (at most `staging_layers` in flight), post all tag sends of that layer without
waiting for the previous ones, and compute the layer's checksum (on CPU while its data moves,
on CUDA just before; both measured, see `_send_layers`). Data posted before the decode side has
posted its receives waits in UCX's tag matching (unexpected queue / pending rendezvous) until
it does; a refused `begin` tombstones the tag key there, so such data is drained, never landed.
Once `ready` arrived and every layer's checksum is known: `complete` with the per-layer
checksums, sent while the last sends may still be in flight (the decode side verifies only
after all its receives ended), then Success on the decode side's `ack`. So the critical path of
a handoff is its data plus one verification and one ack, not begin -> ready -> data -> complete
-> ack. Any refusal, a dead peer or the lease's deadline ends in Failed; `on_done` (release of the
source blocks) runs exactly once.
"""
from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from ucxx._lib.arr import Array
from ucxx.types import Tag

from . import iov, pool, rma_sender
from .layout import NONCE_BITS, TransferPlan, coalesce, ids_digest
from .state import TransferFSM, TransferState, TransferStatus
from .wire import HandoffRecord, data_tag, encode

if TYPE_CHECKING:
    from .agent import TransferAgent


_XIDS = itertools.count(1)
_NONCE0 = random.randrange(1 << 16)   # this process's senders: consecutive nonces from a random start
_UNSET = asyncio.Event()   # never set: "not pushed yet"


class KVSender:
    """One KV handoff from this (prefill) worker into a decode worker's reserved blocks."""

    def __init__(self, agent: "TransferAgent", handoff: HandoffRecord, src_block_ids: Sequence[int],
                 on_done: Callable[["KVSender"], None] | None = None) -> None:
        self.agent, self.handoff = agent, handoff
        self.src_ids = [int(b) for b in src_block_ids]
        self.plan = TransferPlan.build(agent.layout, self.src_ids, list(handoff.block_ids),
                                       handoff.direct_min_blocks, handoff.bundle_bytes,
                                       staged_iov=agent.staged_iov)
        self.fsm = TransferFSM()
        self.xid = next(_XIDS)   # names this transfer in every control message and reply
        # in its data tags (wire.data_tag): two senders of one process never share it, two of
        # different processes rarely (and a shared one only lets the checksums decide)
        self.nonce = (_NONCE0 + self.xid) % ((1 << NONCE_BITS) - 1) + 1
        self.deadline = time.monotonic() + handoff.ttl_s
        self._on_done = on_done
        self._lock = threading.Lock()
        self._pushed: set[int] = set()
        self._events: dict[int, torch.cuda.Event | None] = {}
        self._layer_ready: dict[int, asyncio.Event] = {}
        self._sum_futs: list[asyncio.Future] = []   # per batch: its checksums, while data moves
        self.reply: asyncio.Future | None = None    # set by the agent's control loop
        self.cancel_ack: asyncio.Future | None = None
        self.bytes_sent = 0
        self.msgs_posted = 0     # data messages handed to UCX (sent or not)
        # timings for benchmarks: (phase, absolute perf_counter), prepare-step and send-call totals
        self.trace: list[tuple[str, float]] = []
        self.prep_s = 0.0
        self.send_s = 0.0
        self.started = time.perf_counter()
        self.finished_at: float | None = None
        self.complete_hook: Callable[[dict], dict] | None = None   # tests: forge a completion
        self.fenced = False      # put-based: the decode side told us to stop writing
        self.data_path = "tag"   # or "rma", once the peer is known
        self._task = agent.submit(self._run())

    # ---- caller side (any thread) ------------------------------------------------------------
    def push_layer(self, layer: int, event: "torch.cuda.Event | None" = None) -> None:
        """Layer `layer`'s KV is written to the pool (on the current CUDA stream, or before
        `event`, recorded when it was): send it."""
        L = self.plan.layout.num_layers
        if not 0 <= layer < L:
            raise ValueError(f"push_layer({layer}): the model has {L} layers")
        with self._lock:
            if layer in self._pushed:
                raise ValueError(f"layer {layer} was already pushed")
            self._pushed.add(layer)
        ev = event
        if ev is None and self.agent.kv.is_cuda:
            ev = torch.cuda.Event()
            ev.record()
        self.agent.loop.call_soon_threadsafe(self._mark_ready, layer, ev)

    def push_all(self) -> None:
        """All layers are already in the pool (e.g. a prefix-cache hit): send everything
        (one CUDA event and one loop wake-up for all layers, not one per layer)."""
        L = self.plan.layout.num_layers
        with self._lock:
            if self._pushed:
                raise ValueError(f"layers {sorted(self._pushed)[:4]} were already pushed")
            self._pushed.update(range(L))
        ev = None
        if self.agent.kv.is_cuda:
            ev = torch.cuda.Event()
            ev.record()
        self.agent.loop.call_soon_threadsafe(self._mark_all_ready, ev)

    def poll(self) -> TransferStatus:
        """Non-blocking: Bootstrapping, Transferring, Success or Failed(reason)."""
        return self.fsm.poll()

    def wait(self, timeout: float | None = None) -> TransferStatus:
        return self.fsm.wait(timeout)

    def cancel(self, timeout: float = 5.0) -> bool:
        """Abort the transfer; True once the decode side acknowledged (its blocks are freed)."""
        return self.agent.call(self._cancel(), timeout)

    def _puts_pay(self) -> bool:
        """Put-based only for few runs: each (layer, K|V, run) is one put, ~11.5 us of host time
        on an H200 (bench/results/transfer-rma-2026-11-29.md: 256 scattered blocks took 0.19 s),
        while the tag path gathers short runs into one message per bundle; and, with
        transfer.rma_min_kib, only for transfers at least that big. data_path rma: always."""
        cfg = self.agent.config
        if cfg.data_path == "rma":
            return True
        if len(self.src_ids) * self.agent.layout.block_bytes < cfg.rma_min_kib * 1024:
            return False
        return len(coalesce(self.src_ids, list(self.handoff.block_ids))) <= cfg.rma_max_runs

    def fence(self, reason: str) -> None:
        """Loop side, put-based transfers: post no more puts (agent._on_fence flushes)."""
        self.fenced = True
        self.fsm.fail(f"fenced by the decode worker: {reason}")
        if self.cancel_ack is None:   # else our own cancel is underway and ends the task
            self._task.cancel()

    @property
    def elapsed_s(self) -> float:
        return (self.finished_at or time.perf_counter()) - self.started

    # ---- loop side ---------------------------------------------------------------------------
    def _t(self, what: str) -> None:
        self.trace.append((what, time.perf_counter()))

    def _mark_ready(self, layer: int, ev) -> None:
        self._events[layer] = ev
        self._layer_ready.setdefault(layer, asyncio.Event()).set()

    def _mark_all_ready(self, ev) -> None:
        for layer in range(self.plan.layout.num_layers):
            self._mark_ready(layer, ev)

    async def _run(self) -> None:
        peer = None
        try:
            remaining = self.deadline - time.monotonic()
            peer = await asyncio.wait_for(self._transfer(), timeout=max(remaining, 0.001))
        except asyncio.TimeoutError:
            self.fsm.fail(f"deadline ({self.handoff.ttl_s:.1f}s) passed in state "
                          f"{self.fsm.poll().state.value}")
        except asyncio.CancelledError:
            self.fsm.fail("agent closed")
        except Exception as e:   # dead peer, refusal, bad input: all end the transfer
            self.fsm.fail(str(e) or repr(e))
        finally:
            self.finished_at = time.perf_counter()
            self.agent.sender_done(self, peer)
            if self._on_done is not None:
                self._on_done(self)

    async def _transfer(self):
        h = self.handoff
        self._t("open")
        peer = await self.agent.peer((h.host, h.port))
        if peer.rma is not None and self._puts_pay():   # put straight into the blocks
            self.data_path = "rma"
            await rma_sender.transfer(self, peer)
            return peer
        loop = asyncio.get_running_loop()
        self.reply = loop.create_future()
        peer.senders[self.xid] = self
        begin = asyncio.ensure_future(peer.send(encode(
            "begin", xid=self.xid, lease=h.lease_id, epoch=h.epoch, key=h.tag_key, nonce=self.nonce,
            src=self.src_ids,
            dst_digest=ids_digest(h.block_ids))))
        self._t("begin_sent")
        # the data does not wait for `ready`: it queues in UCX's tag matching until the decode
        # side's receives are posted (module docstring)
        data = asyncio.ensure_future(self._send_layers(peer))
        try:
            msg = await self.reply
            if msg["t"] != "ready":
                raise RuntimeError(f"decode worker refused the transfer: {msg.get('reason')}")
            self.fsm.to(TransferState.TRANSFERRING)
            self._t("ready")
            await begin
            sends, sum_batches = await data
            self._t("posted")
            sums = [int(x) for batch in await asyncio.gather(*sum_batches) for x in batch]
            self.reply = loop.create_future()
            completion = {"xid": self.xid, "lease": h.lease_id, "epoch": h.epoch, "checksums": sums}
            if self.complete_hook is not None:
                completion = self.complete_hook(completion)
            self._t("sums")
            # before the sends have completed: the decode side verifies once its receives ended
            await peer.send(encode("complete", **completion))
            msg = await self.reply
            self._t("acked")
            if msg["t"] != "ack":
                raise RuntimeError(f"decode worker rejected the completion: {msg.get('reason')}")
            await asyncio.gather(*sends)   # acked => every receive matched; this is bookkeeping
            self._t("sends_done")
        finally:
            for task in (data, begin, *self._sum_futs):   # on a refusal or failure: stop, and
                if not task.done():                          # consume any error
                    task.cancel()
                elif not task.cancelled():
                    task.exception()
        self.fsm.to(TransferState.SUCCESS)
        return peer

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
            src_staged = pool.index_tensor([self.src_ids[i] for i in plan.staged_idx], kv.device)
            self._sums = pool.Checksummer(kv, self.src_ids, self.agent.scales, plan.staged_idx)
        self._t("setup")
        units = plan.bundles() if plan.staged_idx else [(l, 1) for l in range(plan.layout.num_layers)]
        cfg = self.agent.config
        win = plan.staging_window(cfg.staging_layers, cfg.staging_budget_kib << 10)
        window = asyncio.Semaphore(win)
        sends: list = []
        u = 0
        while u < len(units):
            await self._units_ready(units[u])
            batch = [units[u]]
            # CPU gathers are long (numpy, ~1-2 GB/s): one bundle per step, so each bundle's
            # send starts as soon as it is gathered and overlaps the next gather
            most = win if kv.is_cuda or not plan.staged_idx else 1
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
            per_layer = [None if st is None else st[x] for st, (_, k) in zip(stagings, batch) for x in range(k)]
            t0 = time.perf_counter()
            if kv.is_cuda:   # sums before sends (see the docstring)
                sums = loop.create_future()
                sums.set_result(await self._prepare_on_loop(batch, src_staged, stagings, layers,
                                                            per_layer))
            else:
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

    def _post_direct(self, peer, layers: list[int], sends: list) -> None:
        """The direct runs' and the FP8 scales' messages of these layers."""
        kv, plan = self.agent.kv, self.plan
        for l in layers:
            for m, d in enumerate(plan.direct):
                sends.append(self._send(peer, pool.direct_view(kv, l, d.kv, d.run.src0, d.run.n),
                                        l, m, None))
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
            sends.append(self._send_iov(peer, desc, l0))
            self._sum_futs.append(loop.run_in_executor(self.agent.executor, self._sums.layers,
                                                       layers))
            self._t(f"prepped {l0}-{l0 + k - 1}")
        return sends, self._sum_futs

    def _send_iov(self, peer, desc: "iov.Descriptors", layer: int):
        tag = data_tag(self.handoff.tag_key, layer, self.plan.staged_msg, self.nonce)
        fut = iov.send(peer.ep._ep.handle, desc, tag, keep=self.agent.kv)
        self.msgs_posted += 1

        async def done():
            await fut
            self._t(f"sent {layer}.{self.plan.staged_msg}")
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

    def _queue_gathers(self, units: list[tuple[int, int]], staged_idx: torch.Tensor,
                       stagings: list) -> bool:
        """On the current (side) stream: wait for each layer's KV (its CUDA event, so the forward
        on the main stream is not blocked; push_all shares one event among all layers) and gather
        each bundle's staged regions. True if every event had already fired (the work is
        runnable now)."""
        events = self._layer_events(l for l0, k in units for l in range(l0, l0 + k))
        for ev in events:
            torch.cuda.current_stream().wait_event(ev)
        runnable = all(ev.query() for ev in events)
        for (l0, _), staging in zip(units, stagings):
            if staging is not None:
                pool.gather_staged(self.agent.kv, l0, staged_idx, staging)
        return runnable

    async def _prepare_on_loop(self, units: list[tuple[int, int]], staged_idx: torch.Tensor,
                               stagings: list, layers: list[int], per_layer: list) -> list[int]:
        """CUDA: the gathers and the layers' checksums queued from the loop thread (nothing here
        blocks), then their read-back event polled while the work is runnable, else waited for
        on the executor (the forward has not reached those layers yet). Returns the checksums."""
        with self.agent.side_stream():
            runnable = self._queue_gathers(units, staged_idx, stagings)
            rb = pool.Readback(self._sums.layers_dev(layers, per_layer))
        self._t(f"queued {units[0][0]}{'' if runnable else ' (waits for the forward)'}")
        spin = self.agent.config.spin_us * 1e-6 if runnable else 0.0
        await pool.wait_gpu(rb.event, self.agent.executor, spin)
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

    async def _cancel(self) -> bool:
        if self.fsm.poll().done:
            return False
        h = self.handoff
        peer = self.agent.peers.get((h.host, h.port))
        if peer is None:
            self._task.cancel()
            return False
        self.cancel_ack = asyncio.get_running_loop().create_future()
        await peer.send(encode("cancel", xid=self.xid, lease=h.lease_id, epoch=h.epoch,
                               reason="prefill cancelled"))
        try:
            await asyncio.wait_for(self.cancel_ack, timeout=max(self.deadline - time.monotonic(), 0.01))
        finally:
            self.fsm.fail("cancelled by the prefill worker")
            self._task.cancel()
        return True
