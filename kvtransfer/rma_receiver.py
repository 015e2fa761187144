"""Decode side of a put-based (RMA) transfer attempt: the sender writes straight into the lease's
blocks, so there is nothing to post, land or scatter here.

Life of an attempt (one per lease epoch; the same interface as receiver.RecvAttempt, which
decode_side drives):
  begin     -> one admitted write covers all of the sender's puts (LeaseTable.begin_write);
               `ready` tells the sender it may write (it never puts before it)
  complete  -> the sender flushed its endpoint before sending it, so every put has landed:
               checksum the destination blocks, compare, end the write, and only then does the
               lease table hand the blocks to the request
  abort     -> (expiry, cancel, reissue, bad checksums, dead sender) the receiver cannot refuse
               a one-sided write, so it *fences* the writer instead: `fence` asks the sender to
               stop and flush, and only its `fenced` reply (or the loss of its endpoint, plus
               `transfer.rma_fence_grace_s` for copies already queued on a dying process) ends
               the admitted write. The lease table frees the blocks after that, exactly once:
               no late put can land in blocks that someone else owns by then.
Only agents of one deployment hold each other's remote keys (exchanged at first contact); a
put is trusted to come from the sender `ready` named, as a tag message is trusted to carry the
tag it was posted with. All methods run on the agent's event loop thread.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Sequence

from . import pool, readback
from .lease import LeaseTable
from .state import TransferFSM, TransferState
from .wire import encode

if TYPE_CHECKING:
    from .agent import TransferAgent

log = logging.getLogger("splitserve.kvtransfer")


class RmaAttempt:
    preposted = False   # put-based attempts start on the sender's `begin`, never at reservation

    def __init__(self, agent: "TransferAgent", lease_id: int, epoch: int, tag_key: int,
                 dst_ids: Sequence[int], ep, fsm: TransferFSM, xid: int) -> None:
        self.agent, self.lease_id, self.epoch, self.tag_key = agent, lease_id, epoch, tag_key
        self.dst_ids = [int(b) for b in dst_ids]
        self.ep, self.fsm, self.xid = ep, fsm, xid
        self.leases: LeaseTable = agent.leases
        self.aborted = False
        self.writing = False          # the sender's write is admitted and not yet ended
        self.ended = asyncio.Event()  # the admitted write has ended (verified or fenced)
        self.bytes = 0
        self.trace: list[tuple[str, float]] = []
        self._sums: pool.Checksummer | None = None

    # ---- the RecvAttempt interface --------------------------------------------------------
    def post_all(self) -> bool:
        """Admit the sender's write; False if the lease refused it (resolved or stale)."""
        if self.aborted or not self.leases.begin_write(self.lease_id, self.epoch):
            return False
        self.writing = True
        return True

    def prewarm(self) -> None:
        """Make the checksummer (index tensors on the GPU) on the executor, off the ready path."""
        asyncio.get_running_loop().run_in_executor(self.agent.executor, self._checksummer)

    def _checksummer(self) -> pool.Checksummer:
        if self._sums is None:
            with self.agent.setup_stream():
                self._sums = pool.Checksummer(self.agent.kv, self.dst_ids, self.agent.scales)
        return self._sums

    async def verify(self, checksums: list[int]) -> str | None:
        """The sender flushed every put before `complete`: checksum the blocks and compare. On
        success the admitted write ends (the lease may then complete)."""
        if self.aborted:
            return "attempt was aborted"
        L = self.agent.layout.num_layers
        if len(checksums) != L:
            return f"completion has {len(checksums)} layer checksums, expected {L}"
        ours = await self._layer_sums(L)
        self.trace.append(("checksummed", time.perf_counter()))
        if self.aborted:
            return "attempt was aborted"
        bad = [l for l, (a, b) in enumerate(zip(ours, checksums)) if a != b]
        if bad:
            return f"checksum mismatch in layers {bad[:8]}"
        self.bytes = len(self.dst_ids) * self.agent.layout.block_bytes
        self._end_write()
        return None

    async def _layer_sums(self, L: int) -> list[int]:
        agent = self.agent
        loop = asyncio.get_running_loop()
        if not agent.kv.is_cuda:
            cs = await loop.run_in_executor(agent.executor, self._checksummer)
            return await loop.run_in_executor(agent.executor, cs.layers, range(L))
        cs = self._checksummer()
        with agent.side_stream():
            rb = readback.Readback(cs.layers_dev(range(L)))
        await readback.wait_gpu(rb.event, agent.executor, agent.config.spin_us * 1e-6)
        return rb.values()

    async def abort(self, reason: str) -> None:
        """Fail the attempt and fence the sender; returns once its write has ended (or, if the
        sender neither answers nor goes away, after `rma_fence_timeout_s`: the write then stays
        admitted and the blocks stay out of the pool until it does)."""
        if not self.aborted:
            self.aborted = True
            self.fsm.fail(reason)
            if self.writing:
                self.agent.fencing[(id(self.ep), self.xid)] = self
                asyncio.ensure_future(self._fence(reason))
        await self.wait_ended()

    async def wait_ended(self) -> None:
        if not self.writing:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self.ended.wait()),
                                   self.agent.config.rma_fence_timeout_s)
        except asyncio.TimeoutError:
            log.error("kvtransfer: lease %d: the sender has not confirmed it stopped writing "
                      "after %.1fs; its blocks stay reserved until it does or goes away",
                      self.lease_id, self.agent.config.rma_fence_timeout_s)

    async def _fence(self, reason: str) -> None:
        try:
            await self.ep.am_send(encode("fence", xid=self.xid, lease=self.lease_id,
                                         epoch=self.epoch, reason=reason))
        except Exception:   # the sender is gone: its endpoint's loss fences it
            self.sender_lost()

    def on_fenced(self) -> None:
        """The sender confirmed: it stopped and every put it posted has landed."""
        self._end_write()

    def sender_lost(self) -> None:
        """The sender's endpoint broke: wait the grace period for copies it queued, then end."""
        async def later():
            await asyncio.sleep(self.agent.config.rma_fence_grace_s)
            self._end_write()
        if self.writing:
            asyncio.ensure_future(later())

    def _end_write(self) -> None:
        if self.writing:
            self.writing = False
            self.agent.fencing.pop((id(self.ep), self.xid), None)
            self.leases.end_write(self.lease_id)
        self.ended.set()

    @property
    def state(self) -> TransferState:
        return self.fsm.poll().state
