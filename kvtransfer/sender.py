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

from . import rma_sender
from .layout import NONCE_BITS, TransferPlan, coalesce, ids_digest
from .sender_data import LayerPipeline
from .state import TransferFSM, TransferState, TransferStatus
from .wire import HandoffRecord, encode

if TYPE_CHECKING:
    from .agent import TransferAgent


_XIDS = itertools.count(1)
_NONCE0 = random.randrange(1 << 16)   # this process's senders: consecutive nonces from a random start


class KVSender(LayerPipeline):
    """One KV handoff from this (prefill) worker into a decode worker's reserved blocks."""

    def __init__(self, agent: "TransferAgent", handoff: HandoffRecord, src_block_ids: Sequence[int],
                 on_done: Callable[["KVSender"], None] | None = None) -> None:
        self.agent, self.handoff = agent, handoff
        self.src_ids = [int(b) for b in src_block_ids]
        self.plan = TransferPlan.build(agent.layout, self.src_ids, list(handoff.block_ids),
                                       handoff.direct_min_blocks, handoff.bundle_bytes,
                                       staged_iov=agent.staged_iov, dst_runs=handoff.preposted)
        self.fsm = TransferFSM()
        self.xid = next(_XIDS)   # names this transfer in every control message and reply
        # in its data tags (wire.data_tag): two senders of one process never share it, two of
        # different processes rarely (and a shared one only lets the checksums decide)
        self.nonce = (_NONCE0 + self.xid) % ((1 << NONCE_BITS) - 1) + 1
        if handoff.preposted:   # the decode side's receives carry the record's nonce
            self.nonce = handoff.nonce
        self.deadline = time.monotonic() + handoff.ttl_s
        self._on_done = on_done
        self._lock = threading.Lock()
        self._pushed: set[int] = set()
        self._events: dict[int, torch.cuda.Event | None] = {}
        self._layer_ready: dict[int, asyncio.Event] = {}
        self._sum_futs: list[asyncio.Future] = []   # per batch: its checksums, while data moves
        # direct runs whose src ids are not consecutive (pre-posted plans; sender_data): the
        # runs, their index tensors (CUDA) and the gathered (layer, run, k|v) buffers
        self._scattered: list | None = None
        self._gather_runs: dict = {}
        self._gathered: dict = {}
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
        if h.preposted:   # the receives are posted: data, then `complete`
            await self._transfer_preposted(peer)
            return peer
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
            await self._complete_and_ack(peer, *await data)
        finally:
            _stop(data, begin, *self._sum_futs)
        self.fsm.to(TransferState.SUCCESS)
        return peer

    async def _transfer_preposted(self, peer) -> None:
        """A pre-posted handoff: no begin/ready. Post the data at once (it matches receives the
        decode side posted when it reserved), then `complete` with the checksums and the digest
        of our destination list (binds us to the attempt), then Success on `ack`."""
        peer.senders[self.xid] = self
        self.fsm.to(TransferState.TRANSFERRING)
        data = asyncio.ensure_future(self._send_layers(peer))
        try:
            await self._complete_and_ack(peer, *await data,
                                         dst_digest=ids_digest(self.handoff.block_ids))
        finally:
            _stop(data, *self._sum_futs)
        self.fsm.to(TransferState.SUCCESS)

    async def _complete_and_ack(self, peer, sends: list, sum_batches: list, **extra) -> None:
        """Every send is posted: wait for the layers' checksums, send `complete` (before the
        sends have completed: the decode side verifies once its receives ended), wait for
        `ack`, then collect the send completions (acked => every receive matched)."""
        h = self.handoff
        self._t("posted")
        sums = [int(x) for batch in await asyncio.gather(*sum_batches) for x in batch]
        self.reply = asyncio.get_running_loop().create_future()
        completion = {"xid": self.xid, "lease": h.lease_id, "epoch": h.epoch, "checksums": sums,
                      **extra}
        if self.complete_hook is not None:
            completion = self.complete_hook(completion)
        self._t("sums")
        await peer.send(encode("complete", **completion))
        msg = await self.reply
        self._t("acked")
        if msg["t"] != "ack":
            raise RuntimeError(f"decode worker rejected the completion: {msg.get('reason')}")
        await asyncio.gather(*sends)
        self._t("sends_done")

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


def _stop(*tasks) -> None:
    """On a refusal or failure: cancel what is still running, and consume any error."""
    for task in tasks:
        if not task.done():
            task.cancel()
        elif not task.cancelled():
            task.exception()
