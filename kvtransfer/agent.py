"""TransferAgent: one per worker; owns the UCX listener, the endpoints, the lease table and an
asyncio event loop on a background thread. Every public method is synchronous, thread-safe and
cheap (poll() never blocks), so plain worker classes (and the Ray actors wrapping them) can use
it without an event loop of their own.

Decode worker:                                      Prefill worker:
    rec = agent.reserve(block_ids)  -> handoff          s = agent.open_sender(rec, src_block_ids)
    agent.poll_lease(rec.lease_id)  -> status           s.push_layer(i) per layer; s.poll()
    agent.cancel(lease_id) / agent.reissue(lease_id)    s.cancel()

First contact between two agents exchanges a compatibility record (model, dtype, block size,
layer/head layout, protocol version) and refuses a mismatch with a clear error. The protocol
is described in docs/kvtransfer.md; the receive side's safety argument in receiver.py.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from typing import Any, Callable, Coroutine, Sequence

import numpy as np
import torch

from splitserve.config import TransferConfig

from . import metrics, pool
from .layout import KVLayout, TransferPlan, compat_mismatch, ids_digest
from .lease import LeaseError, LeaseState, LeaseTable
from .receiver import RecvAttempt
from .selftest import SelfTestReport, check_transports, ep_info, lane_transports
from .sender import KVSender
from .state import TransferFSM, TransferState, TransferStatus
from .wire import KEY_MASK, HandoffRecord, decode, encode, key_prefix

log = logging.getLogger("splitserve.kvtransfer")


class Peer:
    """One endpoint to another agent, with the transfers that use it."""

    def __init__(self, ep, name: str) -> None:
        self.ep, self.name = ep, name
        self.senders: dict[int, KVSender] = {}   # by transfer id (xid)
        self.hello: asyncio.Future = asyncio.get_running_loop().create_future()
        self.lost = False

    async def send(self, payload: np.ndarray) -> None:
        await self.ep.am_send(payload)


class TransferAgent:
    def __init__(self, kv: torch.Tensor, layout: KVLayout, config: TransferConfig, *, model: str,
                 free_blocks: Callable[[list[int]], None] | None = None,
                 scales: torch.Tensor | None = None) -> None:
        pool.check_pool(kv, layout, scales)
        self.kv, self.layout, self.config, self.scales = kv, layout, config, scales
        self.compat = layout.compat_record(model)
        self.leases = LeaseTable(free_blocks or (lambda ids: None), config.lease_timeout_s)
        self.peers: dict[tuple[str, int], Peer] = {}
        self._connecting: dict[tuple[str, int], asyncio.Future] = {}
        self._rx_status: dict[int, TransferFSM] = {}
        self._attempts: dict[int, RecvAttempt] = {}
        self._tombstones: dict[int, float] = {}
        self.rx_traces: dict[int, list] = {}   # lease -> last attempt's trace (benchmarks)
        self.self_test_report: SelfTestReport | None = None
        # high priority: the gathers, scatters and checksums are a few short kernels per layer that
        # would otherwise queue behind the forward's long GEMMs and trail the prefill by many layers
        self._stream = torch.cuda.Stream(kv.device, priority=-1) if kv.is_cuda else None
        # the sender's checksums get their own stream: on the side stream they would queue behind
        # the next layers' waits for the forward, and a batch's staging buffers (released once
        # its sums are read) would come back only after those layers are computed
        self._sum_stream = torch.cuda.Stream(kv.device, priority=-1) if kv.is_cuda else None
        # a transfer's setup (index tensors to the GPU, FP8 scale checks) on the loop thread: on
        # the legacy default stream a synchronous host->device copy waits for every kernel queued
        # there, i.e. for the worker's whole forward in flight (prefill or decode step)
        self._setup = torch.cuda.Stream(kv.device) if kv.is_cuda else None
        self.staging = pool.BufferPool(kv)   # staging buffers reused across layers/transfers
        # torch work (gather, scatter, checksums) runs here, off the loop thread
        self.executor = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="kvtransfer-torch")
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="kvtransfer", daemon=True)
        self._thread.start()
        self.host, self.port = self.call(self._start(), timeout=config.connect_timeout_s + 30)
        if config.self_test:
            self.self_test_report = self.call(self._self_test(), timeout=120)

    # ---- plumbing ------------------------------------------------------------------------
    def call(self, coro: Coroutine, timeout: float | None = None) -> Any:
        """Run `coro` on the agent's loop and wait for its result (not from the loop thread)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("TransferAgent.call from the agent's own loop thread would deadlock")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def transports(self) -> dict:
        """What UCX chose: the start-up self-test's lanes and each connected peer's lanes."""
        async def peers():
            return {p.name: lane_transports(ep_info(p.ep)) for p in self.peers.values()}
        st = self.self_test_report
        return {"self_test": None if st is None else {"transports": st.transports, "gbps": st.bandwidth_gbps},
                "peers": self.call(peers(), timeout=10)}

    def top_up_futures(self) -> None:
        """Refill ucxx's pool of Python futures (to 100 once under 50) from this loop's thread,
        before posting requests. A drained pool is refilled by whichever thread next needs a
        future; on UCX's progress thread (an incoming active message) that fails, for want of
        an asyncio loop there, and the worker later aborts (seen under 48 concurrent transfers)."""
        self._worker.populate_python_futures_pool()

    def submit(self, coro: Coroutine) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def _start(self) -> tuple[str, int]:
        import ucxx
        self._ucxx = ucxx
        if ucxx.core._ctx is None:
            # Python futures: a request's wait() then awaits a future that ucxx's notifier
            # thread completes. Without them every pending request polls with sleep(0), which
            # keeps the loop busy and starves every other thread of the GIL (measured: ~1 ms per
            # tag send and a ~60-150 ms floor per transfer; 3-10x slower end to end on CPU).
            # Immediate (not delayed) submission: requests and their futures are made on this
            # loop's thread. Delayed submission makes them on the progress thread, which has no
            # asyncio loop: once a burst (48 concurrent transfers on an H200) drains the futures
            # pool, refilling it there fails and the worker aborts in Request::cancel.
            ucxx.init(progress_mode="thread", enable_python_future=True, enable_delayed_submission=False)
        elif not ucxx.core._ctx.enable_python_future:
            log.warning("kvtransfer: ucxx was initialised without python futures; transfers "
                        "will be slow (initialise ucxx after creating the TransferAgent)")
        self._worker = ucxx.core._get_ctx().worker
        self.top_up_futures()
        self._listener = ucxx.create_listener(self._accept, port=self.config.listen_port or None)
        host = self.config.listen_host
        self._self_ep = await ucxx.create_endpoint(host, self._listener.port)
        self._sweeper = asyncio.ensure_future(self._sweep_forever())
        return host, self._listener.port

    def side_stream(self):
        """Context in which gathers, scatters and checksums run (CUDA: a non-blocking stream
        of the agent, so they overlap the forward pass; CPU: nothing)."""
        return torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def setup_stream(self):
        """Context of a transfer's small setup work on the loop thread (CUDA: a stream of its own,
        synchronized on exit, so what was made is ready for any stream; CPU: nothing)."""
        if self._setup is None:
            yield
            return
        with torch.cuda.stream(self._setup):
            yield
        self._setup.synchronize()

    def sum_stream(self):
        """Context of the sender's checksums (CUDA: a stream of their own; CPU: nothing)."""
        return torch.cuda.stream(self._sum_stream) if self._sum_stream is not None else contextlib.nullcontext()

    def sync_side_stream(self) -> None:
        """Wait for the side-stream work queued so far (an event, not a stream sync: work the
        other executor thread queues meanwhile, e.g. a wait for a later layer's forward, is not
        waited for)."""
        if self._stream is not None:
            ev = torch.cuda.Event()
            ev.record(self._stream)
            ev.synchronize()

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    # ---- connections ---------------------------------------------------------------------
    async def _accept(self, ep) -> None:
        peer = Peer(ep, f"accepted-{ep.uid:#x}")
        await self._serve(peer)

    async def peer(self, addr: tuple[str, int]) -> Peer:
        """The cached, handshaken endpoint to the agent listening at `addr`."""
        if addr in self.peers and not self.peers[addr].lost:
            return self.peers[addr]
        if addr not in self._connecting:
            self._connecting[addr] = asyncio.ensure_future(self._connect(addr))
        try:
            return await asyncio.shield(self._connecting[addr])
        finally:
            fut = self._connecting.get(addr)
            if fut is not None and fut.done():
                del self._connecting[addr]

    async def _connect(self, addr: tuple[str, int]) -> Peer:
        ep = await self._ucxx.create_endpoint(addr[0], addr[1],
                                              connect_timeout=self.config.connect_timeout_s)
        peer = Peer(ep, f"{addr[0]}:{addr[1]}")
        asyncio.ensure_future(self._serve(peer))
        await peer.send(encode("hello", compat=self.compat))
        reply = await asyncio.wait_for(peer.hello, self.config.connect_timeout_s)
        if reply["t"] != "hello_ok":
            ep.abort()
            raise RuntimeError(f"peer {peer.name} refused us: {reply['reason']}")
        check_transports(peer.name, lane_transports(ep_info(ep)),
                         self.config.expected_transports, self.kv.is_cuda)
        self.peers[addr] = peer
        return peer

    async def _serve(self, peer: Peer) -> None:
        """Control loop of one endpoint: dispatch every active message until the peer goes."""
        try:
            while True:
                msg = decode(await peer.ep.am_recv())
                handler = getattr(self, "_on_" + msg["t"], None)
                if handler is None:
                    log.warning("kvtransfer: unknown control message %r from %s", msg["t"], peer.name)
                    continue
                handler(peer, msg)
        except Exception as e:   # the endpoint broke: the peer died or closed
            if not peer.lost:
                self._peer_lost(peer, f"peer {peer.name} lost: {e!r}")

    def _peer_lost(self, peer: Peer, reason: str) -> None:
        peer.lost = True
        for addr, p in list(self.peers.items()):
            if p is peer:
                del self.peers[addr]
        for sender in list(peer.senders.values()):
            sender.fsm.fail(reason)
            if sender.reply is not None and not sender.reply.done():
                sender.reply.set_exception(RuntimeError(reason))
        for attempt in list(self._attempts.values()):
            if attempt.ep is peer.ep and not attempt.fsm.poll().done:
                asyncio.ensure_future(attempt.abort(f"sender lost: {reason}"))
        if not peer.hello.done():
            peer.hello.set_result({"t": "hello_err", "reason": reason})

    # ---- handshake ---------------------------------------------------------------------
    def _on_hello(self, peer: Peer, msg: dict) -> None:
        why = compat_mismatch(self.compat, msg["compat"])
        if why:
            log.error("kvtransfer: refusing %s: %s", peer.name, why)
            asyncio.ensure_future(peer.send(encode("hello_err", reason=why)))
            return
        peer.hello.set_result(msg)
        asyncio.ensure_future(peer.send(encode("hello_ok")))

    def _on_hello_ok(self, peer: Peer, msg: dict) -> None:
        if not peer.hello.done():
            peer.hello.set_result(msg)

    _on_hello_err = _on_hello_ok

    # ---- decode side ---------------------------------------------------------------------
    def reserve(self, block_ids: Sequence[int]) -> HandoffRecord:
        """Put `block_ids` (already taken from the engine's pool) under a new lease."""
        lease = self.leases.reserve(block_ids)
        self._rx_status[lease.lease_id] = TransferFSM()
        metrics.leases_live().set(self.leases.live_count())
        return self._record(lease)

    def _record(self, lease) -> HandoffRecord:
        return HandoffRecord(self.host, self.port, lease.lease_id, lease.epoch, lease.block_ids,
                             lease.tag_key, self.config.lease_timeout_s,
                             self.config.direct_min_blocks, self.config.bundle_kib << 10)

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
            await old.abort(f"superseded by a reissued epoch")
            await self._notify_sender(old, "reject", "lease reissued to another sender")
        lease = self.leases.reissue(lease_id)
        self._rx_status[lease_id] = TransferFSM()
        return self._record(lease)

    async def _cancel_lease(self, lease_id: int, reason: str, notify: bool = True) -> bool:
        try:
            self.leases.cancel(lease_id)
        except LeaseError:
            return False
        self._rx_status[lease_id].fail(reason)
        attempt = self._attempts.pop(lease_id, None)
        if attempt is not None:
            await attempt.abort(reason)
            if notify:
                await self._notify_sender(attempt, "cancel", reason)
        metrics.leases_live().set(self.leases.live_count())
        lease = self.leases.get(lease_id)
        return bool(lease and lease.freed)

    async def _notify_sender(self, attempt: RecvAttempt, kind: str, reason: str) -> None:
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
        if why is None:
            try:
                plan = TransferPlan.build(self.layout, msg["src"], lease.block_ids,
                                          self.config.direct_min_blocks, self.config.bundle_kib << 10)
            except ValueError as e:
                why = str(e)
        if why is not None:
            await peer.send(encode("reject", xid=xid, lease=lease_id, epoch=epoch, reason=why))
            return
        fsm = self._rx_status[lease_id]
        attempt = RecvAttempt(self, lease_id, epoch, lease.tag_key, plan, peer.ep, fsm)
        attempt.xid = xid
        self._attempts[lease_id] = attempt
        attempt.started = time.perf_counter()
        attempt.trace.append(("begin_rx", t_begin))
        self.rx_traces[lease_id] = attempt.trace
        while len(self.rx_traces) > 64:
            del self.rx_traces[next(iter(self.rx_traces))]
        if not attempt.post_all():
            await attempt.abort("lease resolved while posting receives")
            await peer.send(encode("reject", xid=xid, lease=lease_id, epoch=epoch,
                                    reason=fsm.poll().reason))
            return
        fsm.to(TransferState.TRANSFERRING)
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
        if attempt is not None and attempt.epoch == msg["epoch"] and attempt.ep is peer.ep:
            ok = await self._cancel_lease(msg["lease"], f"cancelled by sender: {msg.get('reason')}",
                                          notify=False)
        await peer.send(encode("cancel_ack", xid=msg["xid"], lease=msg["lease"], epoch=msg["epoch"],
                               ok=ok))

    # ---- prefill side --------------------------------------------------------------------
    def open_sender(self, handoff: HandoffRecord, src_block_ids: Sequence[int],
                    on_done: Callable[[KVSender], None] | None = None) -> KVSender:
        """Start a transfer of our blocks `src_block_ids` into the handoff's blocks."""
        return self.call(self._open_sender(handoff, src_block_ids, on_done), timeout=30)

    async def _open_sender(self, handoff, src_block_ids, on_done) -> KVSender:
        return KVSender(self, handoff, src_block_ids, on_done)

    def _on_reply(self, peer: Peer, msg: dict) -> None:
        sender = peer.senders.get(msg["xid"])
        if sender is None:
            return
        if msg["t"] == "cancel_ack":
            if sender.cancel_ack is not None and not sender.cancel_ack.done():
                sender.cancel_ack.set_result(msg)
        elif sender.reply is not None and not sender.reply.done():
            sender.reply.set_result(msg)
        elif msg["t"] == "reject":   # refused mid-stream (expiry, reissue)
            sender.fsm.fail(f"decode worker rejected the transfer: {msg.get('reason')}")
            sender._task.cancel()

    _on_ready = _on_ack = _on_reject = _on_cancel_ack = _on_reply

    def sender_done(self, sender: KVSender, peer: Peer | None) -> None:
        h = sender.handoff
        p = self.peers.get((h.host, h.port))
        if p is not None:
            p.senders.pop(sender.xid, None)
        ok = sender.poll().state is TransferState.SUCCESS
        metrics.transfers_total().labels(side="prefill", outcome="success" if ok else "failed").inc()
        metrics.bytes_total().labels(direction="tx").inc(sender.bytes_sent)
        if ok:
            metrics.transfer_seconds().labels(side="prefill").observe(sender.elapsed_s)

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

    async def _sweep(self) -> None:
        self.top_up_futures()
        for lease in self.leases.expire_due():
            self._rx_status[lease.lease_id].fail("lease expired")
            attempt = self._attempts.pop(lease.lease_id, None)
            if attempt is not None:
                await attempt.abort("lease expired")
                await self._notify_sender(attempt, "reject", "lease expired")
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
                del self._tombstones[key]

    # ---- self-test -----------------------------------------------------------------------
    async def _self_test(self) -> SelfTestReport:
        from ucxx.types import Tag, TagMaskFull
        from ucxx._lib.arr import Array
        nbytes = self.config.self_test_mib << 20
        src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=self.kv.device)
        dst = torch.empty_like(src)
        times = []
        for i in range(4):
            tag = Tag((0x5B << 56) | i)
            rreq = self._self_ep._ep.tag_recv(Array(pool.as_buffer(dst)), tag, TagMaskFull)
            t0 = time.perf_counter()
            await self._self_ep.send(pool.as_buffer(src), tag=tag.value, force_tag=True)
            await rreq.wait()
            times.append(time.perf_counter() - t0)
        ok = torch.equal(src, dst)
        bw = nbytes / sorted(times)[len(times) // 2] / 1e9
        tls = lane_transports(ep_info(self._self_ep))
        ctx_info = self._ucxx.core._get_ctx().ucp_context_info
        resources = sorted({r.split("flags --")[-1].strip() for r in ctx_info.splitlines()
                            if "resource" in r and "flags --" in r})
        mem = "cuda" if self.kv.is_cuda else "host"
        metrics.selftest_bandwidth().labels(memory=mem, transports=",".join(tls)).set(bw * 1e9)
        log.info("kvtransfer self-test: loopback %s->%s %d MiB at %.2f GB/s over %s (data %s); "
                 "UCX resources: %s", mem, mem, nbytes >> 20, bw, tls, "ok" if ok else "CORRUPT",
                 ", ".join(resources))
        want = self.config.expected_transports
        if want not in ("auto", "tcp") and not any(want in r or (want == "rdma" and "mlx5" in r)
                                                   for r in resources):
            check_transports("self (available resources)", ["tcp"], want, self.kv.is_cuda)
        return SelfTestReport(tls, bw, nbytes, mem, resources, ok)

    # ---- shutdown ------------------------------------------------------------------------
    def close(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            self.call(self._close(), timeout=10)
        except Exception:
            log.debug("kvtransfer close", exc_info=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.executor.shutdown(wait=False)

    async def _close(self) -> None:
        self._sweeper.cancel()
        for peer in list(self.peers.values()):
            peer.ep.abort()
        self._self_ep.abort()
        self._listener.close()

    def __enter__(self) -> "TransferAgent":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
