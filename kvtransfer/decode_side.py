"""The decode side of the TransferAgent (a mixin of agent.TransferAgent): leases and their
handoff records, the begin/complete/cancel handlers of incoming transfers, and the safety net for
late writes (plugs, tombstones, the sweeper that expires leases and drains strays).

Every `_on_*` handler and every coroutine here runs on the agent's event loop thread; the public
methods (reserve, poll_lease, wait_lease, cancel, reissue) are synchronous and thread-safe.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING, Sequence

import numpy as np

from . import metrics
from .layout import NONCE_BITS, TransferPlan, bundle_bytes_for, ids_digest
from .lease import LeaseError, LeaseState
from .receiver import RecvAttempt
from .rma_receiver import RmaAttempt
from .state import TransferFSM, TransferState, TransferStatus
from .wire import KEY_MASK, HandoffRecord, encode, key_prefix

if TYPE_CHECKING:
    from .agent import Peer

log = logging.getLogger("splitserve.kvtransfer")


class DecodeSide:
    """Mixed into TransferAgent; uses its loop, peers, lease table, config and layout."""

    # ---- decode side ---------------------------------------------------------------------
    def reserve(self, block_ids: Sequence[int], *, prepost: bool | None = None) -> HandoffRecord:
        """Put `block_ids` (already taken from the engine's pool) under a new lease; with
        transfer.prepost (tag path; `prepost` overrides it for this lease) also post every
        receive now (`_prepost`)."""
        lease = self.leases.reserve(block_ids)
        self._tombstones.pop(lease.tag_key, None)   # a recycled key: its old strays are long gone
        self._rx_status[lease.lease_id] = TransferFSM()
        metrics.leases_live().set(self.leases.live_count())
        # the tag path only: a put needs a `ready` before its first write
        pre = (self.config.prepost if prepost is None else prepost) and self.config.data_path == "tag"
        self._preposting[lease.lease_id] = pre
        if pre:
            try:
                self.call(self._prepost(lease), timeout=30)
            except BaseException:
                self.cancel(lease.lease_id)
                raise
        return self._record(lease)

    def _record(self, lease) -> HandoffRecord:
        a = self._attempts.get(lease.lease_id)
        pre = a is not None and a.preposted and a.epoch == lease.epoch
        return HandoffRecord(self.host, self.port, lease.lease_id, lease.epoch, lease.block_ids,
                             lease.tag_key, self.config.lease_timeout_s,
                             self.config.direct_min_blocks, self.bundle_bytes(len(lease.block_ids)),
                             preposted=pre, nonce=a.nonce if pre else 0)

    def bundle_bytes(self, num_blocks: int) -> int:
        """This side's bundle size for a transfer of `num_blocks` blocks (layout.bundle_bytes_for);
        the handoff record carries it, so both plans use the same."""
        c = self.config
        return bundle_bytes_for(num_blocks * self.layout.block_bytes, c.bundle_kib << 10,
                                c.max_bundles, c.staging_budget_kib << 10)

    async def _prepost(self, lease) -> None:
        """A pre-posted handoff: the attempt of this (lease, epoch) is made now, its plan from
        the destination ids alone, every receive posted (on our own endpoint: the sender is not
        known yet) with a fresh nonce that only the handoff record carries. The sender sends its
        data and then `complete`, which binds it to the attempt (`_complete`). Until then a
        dead sender is noticed by the lease's deadline, not by its endpoint."""
        plan = TransferPlan.build(self.layout, lease.block_ids, lease.block_ids,
                                  self.config.direct_min_blocks,
                                  self.bundle_bytes(len(lease.block_ids)),
                                  staged_iov=self.staged_iov, dst_runs=True)
        attempt = RecvAttempt(self, lease.lease_id, lease.epoch, lease.tag_key, plan, None,
                              self._rx_status[lease.lease_id],
                              random.randrange(1, 1 << NONCE_BITS), post_ep=self._self_ep)
        attempt.preposted = True
        attempt.dst_digest = ids_digest(lease.block_ids)
        self._attempts[lease.lease_id] = attempt
        self._keep_trace(lease.lease_id, attempt)
        if not attempt.post_all():
            await attempt.abort("lease resolved while posting receives")
            raise LeaseError(f"lease {lease.lease_id} resolved while its receives were posted")
        attempt.prewarm()
        attempt.trace.append(("posted", time.perf_counter()))

    def _keep_trace(self, lease_id: int, attempt) -> None:
        attempt.started = time.perf_counter()
        attempt.trace.append(("attempt_made", attempt.started))
        self.rx_traces[lease_id] = attempt.trace
        while len(self.rx_traces) > 64:
            del self.rx_traces[next(iter(self.rx_traces))]

    def poll_lease(self, lease_id: int) -> TransferStatus:
        """Non-blocking receive status of the lease's current epoch."""
        fsm = self._rx_status.get(lease_id)
        if fsm is None:
            return TransferStatus(TransferState.FAILED, f"unknown lease {lease_id}")
        return fsm.poll()

    def wait_lease(self, lease_id: int, timeout: float | None = None) -> TransferStatus:
        fsm = self._rx_status.get(lease_id)
        return fsm.wait(timeout) if fsm else self.poll_lease(lease_id)

    def cancel(self, lease_id: int, timeout: float = 10.0) -> bool:
        """Cancel a lease; True once its blocks are back in the pool, False if it had already
        resolved (completed: the blocks belong to the request; expired: already freed)."""
        return self.call(self._cancel_lease(lease_id, "cancelled by decode worker"), timeout)

    def reissue(self, lease_id: int, timeout: float = 10.0) -> HandoffRecord:
        """A new epoch of a live lease (retry on another prefill worker); the old attempt is
        aborted and drained first, so its late writes can never mix with the new one's."""
        return self.call(self._reissue(lease_id), timeout)

    async def _reissue(self, lease_id: int) -> HandoffRecord:
        old = self._attempts.pop(lease_id, None)
        lease = self.leases.get(lease_id)
        if old is not None:
            await old.abort("superseded by a reissued epoch")
            await self._notify_sender(old, "reject", "lease reissued to another sender")
        old_key = lease.tag_key if lease is not None else None
        lease = self.leases.reissue(lease_id)
        if old_key is not None:
            self.tombstone(old_key)   # the old epoch's data, even if it never sent a begin
        self._rx_status[lease_id] = TransferFSM()
        if self._preposting.get(lease_id, False):   # as the lease was reserved
            await self._prepost(lease)
        return self._record(lease)

    async def _cancel_lease(self, lease_id: int, reason: str, notify: bool = True) -> bool:
        try:
            self.leases.cancel(lease_id)
        except LeaseError:
            return False
        self._rx_status[lease_id].fail(reason)
        self.tombstone(self.leases.get(lease_id).tag_key)
        attempt = self._attempts.pop(lease_id, None)
        if attempt is not None:
            await attempt.abort(reason)
            if notify:
                await self._notify_sender(attempt, "cancel", reason)
        for fencing in [a for a in self.fencing.values() if a.lease_id == lease_id]:
            await fencing.wait_ended()   # an earlier attempt's sender is still being fenced
        metrics.leases_live().set(self.leases.live_count())
        lease = self.leases.get(lease_id)
        return bool(lease and lease.freed)

    async def _notify_sender(self, attempt: RecvAttempt, kind: str, reason: str) -> None:
        if attempt.ep is None:   # pre-posted, no sender has completed: nobody to tell
            return
        try:
            await attempt.ep.am_send(encode(kind, xid=attempt.xid, lease=attempt.lease_id,
                                            epoch=attempt.epoch, reason=reason))
        except Exception:
            pass   # the sender is gone; nothing to tell

    def _on_begin(self, peer: Peer, msg: dict) -> None:
        asyncio.ensure_future(self._begin(peer, msg))

    async def _begin(self, peer: Peer, msg: dict) -> None:
        t_begin = time.perf_counter()
        lease_id, epoch, xid = msg["lease"], msg["epoch"], msg["xid"]
        lease = self.leases.get(lease_id)
        why = None
        if lease is None or lease.state is not LeaseState.LIVE:
            why = f"lease {lease_id} is {'unknown' if lease is None else lease.state.value}"
        elif lease.epoch != epoch:
            why = f"stale epoch {epoch} (lease {lease_id} is at epoch {lease.epoch})"
        elif msg["dst_digest"] != ids_digest(lease.block_ids):
            why = "the sender's destination block list differs from the lease's"
        elif lease_id in self._attempts:
            why = f"lease {lease_id} epoch {epoch} already has a sender"
        elif msg.get("mode") == "rma" and self.rma_local is None:
            why = "this decode worker takes no puts (transfer.data_path is tag)"
        if why is None:
            try:
                plan = TransferPlan.build(self.layout, msg["src"], lease.block_ids,
                                          self.config.direct_min_blocks,
                                          self.bundle_bytes(len(lease.block_ids)),
                                          staged_iov=self.staged_iov)
            except ValueError as e:
                why = str(e)
        if why is not None:
            # the sender posts its data without waiting for `ready`: drain whatever it sent under
            # this tag key -- unless the key is still a live lease's (e.g. a second sender of one
            # epoch): its data may then match that lease's receives, and the checksums decide
            # (nothing lands unverified); the key is tombstoned when the lease resolves
            key = msg.get("key")
            if key and not (lease is not None and lease.state is LeaseState.LIVE and lease.tag_key == key):
                self.tombstone(key)
            await peer.send(encode("reject", xid=xid, lease=lease_id, epoch=epoch, reason=why))
            return
        fsm = self._rx_status[lease_id]
        if msg.get("mode") == "rma":
            attempt = RmaAttempt(self, lease_id, epoch, lease.tag_key, lease.block_ids, peer.ep,
                                 fsm, xid)
        else:
            attempt = RecvAttempt(self, lease_id, epoch, lease.tag_key, plan, peer.ep, fsm,
                                  int(msg.get("nonce", 0)))
            attempt.xid = xid
        self._attempts[lease_id] = attempt
        attempt.trace.append(("begin_rx", t_begin))
        self._keep_trace(lease_id, attempt)
        if not attempt.post_all():
            await attempt.abort("lease resolved while posting receives")
            await peer.send(encode("reject", xid=xid, lease=lease_id, epoch=epoch,
                                    reason=fsm.poll().reason))
            return
        fsm.to(TransferState.TRANSFERRING)
        attempt.prewarm()
        attempt.trace.append(("posted", time.perf_counter()))
        await peer.send(encode("ready", xid=xid, lease=lease_id, epoch=epoch))

    def _on_complete(self, peer: Peer, msg: dict) -> None:
        asyncio.ensure_future(self._complete(peer, msg))

    async def _complete(self, peer: Peer, msg: dict) -> None:
        lease_id, epoch, xid = msg["lease"], msg["epoch"], msg["xid"]
        attempt = self._attempts.get(lease_id)
        lease = self.leases.get(lease_id)
        if attempt is not None:
            attempt.trace.append(("complete_rx", time.perf_counter()))
            if attempt.ep is None and attempt.epoch == epoch:   # pre-posted: bind the sender
                if msg.get("dst_digest") != attempt.dst_digest:
                    # its data may have landed in (only) this lease's blocks: never accepted;
                    # the attempt is dropped, the lease stays live for a reissue
                    del self._attempts[lease_id]
                    why = "the sender's destination block list differs from the lease's"
                    await attempt.abort(why)
                    await peer.send(encode("reject", xid=xid, lease=lease_id, epoch=epoch, reason=why))
                    return
                attempt.ep, attempt.xid = peer.ep, xid
                attempt.fsm.to(TransferState.TRANSFERRING)
        if attempt is None or attempt.epoch != epoch or attempt.ep is not peer.ep:
            why = (f"stale epoch {epoch} (lease {lease_id} is at epoch {lease.epoch})"
                   if lease is not None and lease.epoch != epoch
                   else f"no live transfer for lease {lease_id} epoch {epoch}"
                   + (f" (lease {lease.state.value})" if lease is not None else ""))
            await peer.send(encode("reject", xid=xid, lease=lease_id, epoch=epoch, reason=why))
            return
        why = await attempt.verify(msg["checksums"])
        if why is None:
            why = self.leases.complete(lease_id, epoch)
        if self._attempts.get(lease_id) is attempt:
            del self._attempts[lease_id]
        side = "decode"
        if why is not None:
            await attempt.abort(why)
            metrics.transfers_total().labels(side=side, outcome="failed").inc()
            await peer.send(encode("reject", xid=xid, lease=lease_id, epoch=epoch, reason=why))
            return
        attempt.fsm.to(TransferState.SUCCESS)
        self.tombstone(attempt.tag_key)   # a duplicate of this transfer is drained, not landed
        metrics.transfers_total().labels(side=side, outcome="success").inc()
        metrics.bytes_total().labels(direction="rx").inc(attempt.bytes)
        metrics.transfer_seconds().labels(side=side).observe(time.perf_counter() - attempt.started)
        metrics.leases_live().set(self.leases.live_count())
        attempt.trace.append(("ack_send", time.perf_counter()))
        await peer.send(encode("ack", xid=xid, lease=lease_id, epoch=epoch))

    def _on_cancel(self, peer: Peer, msg: dict) -> None:
        sender = peer.senders.get(msg["xid"])
        if sender is not None:   # we are the prefill side: the decode side cancelled
            sender.fsm.fail(f"cancelled by the decode worker: {msg.get('reason')}")
            sender._task.cancel()
            return
        asyncio.ensure_future(self._cancel_from_sender(peer, msg))

    async def _cancel_from_sender(self, peer: Peer, msg: dict) -> None:
        attempt = self._attempts.get(msg["lease"])
        ok = False
        if (attempt is not None and attempt.epoch == msg["epoch"]
                and (attempt.ep is peer.ep or attempt.ep is None)):   # None: pre-posted, unbound
            ok = await self._cancel_lease(msg["lease"], f"cancelled by sender: {msg.get('reason')}",
                                          notify=False)
        await peer.send(encode("cancel_ack", xid=msg["xid"], lease=msg["lease"], epoch=msg["epoch"],
                               ok=ok))

    def _forget_finished(self) -> None:
        """About once a second (or per retention, if shorter): drop what the agent keeps per
        lease (record, status, choice) for leases finished longer ago than `lease_retention_s`:
        a serving decode worker makes one lease per request. poll_lease then answers "unknown
        lease"."""
        now = time.monotonic()
        if now < self._next_forget:
            return
        self._next_forget = now + min(1.0, self.lease_retention_s)
        for lid in self.leases.forget_resolved(self.lease_retention_s):
            self._rx_status.pop(lid, None)
            self._preposting.pop(lid, None)

    @property
    def lease_retention_s(self) -> float:
        return self.config.lease_retention_s or max(2 * self.config.lease_timeout_s, 60.0)

    # ---- late writes, expiry -------------------------------------------------------------
    async def plug(self, tag: int) -> None:
        """Complete our own posted receive with `tag` by a zero-length message (writes nothing)."""
        await self._self_ep.send(np.empty(0, dtype=np.uint8), tag=tag, force_tag=True)

    def tombstone(self, tag_key: int) -> None:
        self._tombstones[tag_key] = time.monotonic() + max(2 * self.config.lease_timeout_s, 10.0)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval_s)
            try:
                await self._sweep()
            except Exception:
                log.exception("kvtransfer sweeper")

    async def _expire_attempt(self, attempt) -> None:
        await attempt.abort("lease expired")
        await self._notify_sender(attempt, "reject", "lease expired")

    async def _sweep(self) -> None:
        self.top_up_futures()
        self._forget_finished()
        for lease in self.leases.expire_due():
            self._rx_status[lease.lease_id].fail("lease expired")
            self.tombstone(lease.tag_key)   # data a sender posted before (or without) a begin
            attempt = self._attempts.pop(lease.lease_id, None)
            # a put-based attempt's fencing takes a round trip: not inside the sweep; a tag
            # attempt is awaited, its plugs must match before this sweep drains the key below
            if isinstance(attempt, RmaAttempt):
                asyncio.ensure_future(self._expire_attempt(attempt))
            elif attempt is not None:
                await self._expire_attempt(attempt)
            metrics.leases_live().set(self.leases.live_count())
        from ucxx.types import Tag, TagMask
        from ucxx._lib.arr import Array
        worker = self._ucxx.core._get_ctx().worker
        now = time.monotonic()
        for key, until in list(self._tombstones.items()):
            while True:   # drain every stray message of this (lease, epoch) into scratch
                probe = worker.tag_probe(Tag(key_prefix(key)), TagMask(KEY_MASK), remove=True)
                if not probe.matched:
                    break
                scratch = np.empty(max(probe.length, 1), dtype=np.uint8)
                await worker.tag_recv_with_handle(Array(scratch), probe).wait()
                metrics.dropped_messages().inc()
            if now > until:
                self._tombstones.pop(key, None)
