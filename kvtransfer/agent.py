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
is described in docs/kvtransfer.md; the receive side's safety argument in receiver.py. The
decode half (leases, incoming transfers, late-write handling) is the DecodeSide mixin in
decode_side.py.
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

from . import metrics, pool, rma
from .layout import KVLayout, compat_mismatch
from .lease import LeaseTable
from .receiver import RecvAttempt
from .selftest import SelfTestReport, check_transports, ep_info, lane_transports
from .decode_side import DecodeSide
from .sender import KVSender
from .state import TransferFSM, TransferState
from .wire import HandoffRecord, decode, encode

log = logging.getLogger("splitserve.kvtransfer")
LOCAL_HANDSHAKE_S = 30.0   # handshake limit for the agent's own endpoint and incoming ones


class Peer:
    """One endpoint to another agent, with the transfers that use it."""

    def __init__(self, ep, name: str) -> None:
        self.ep, self.name = ep, name
        self.senders: dict[int, KVSender] = {}   # by transfer id (xid)
        self.hello: asyncio.Future = asyncio.get_running_loop().create_future()
        self.lost = False
        self.pong: asyncio.Future | None = None   # agent.rtt's outstanding probe
        self.rma: rma.RemoteRegion | None = None   # its KV pool, when it takes our puts
        self.device = ""   # its pool's GPU (UUID; "" for host pools or an older peer)

    async def send(self, payload: np.ndarray) -> None:
        await self.ep.am_send(payload)


class TransferAgent(DecodeSide):
    def __init__(self, kv: torch.Tensor, layout: KVLayout, config: TransferConfig, *, model: str,
                 free_blocks: Callable[[list[int]], None] | None = None,
                 scales: torch.Tensor | None = None) -> None:
        pool.check_pool(kv, layout, scales)
        if config.staged_path == "iov" and kv.is_cuda:
            raise ValueError("transfer.staged_path iov is for host pools; a CUDA pool gathers its "
                             "staged regions on the GPU (use buffer or auto)")
        self.kv, self.layout, self.config, self.scales = kv, layout, config, scales
        # staged bundles sent / received in place as descriptor lists (iov.py), or through a
        # staging buffer; a local choice (the wire bytes are the same)
        self.staged_iov = config.staged_path == "iov" or (config.staged_path == "auto"
                                                          and not kv.is_cuda)
        self.compat = layout.compat_record(model)
        # which GPU the pool is on (told to peers in the handshake: a sender paces its steps
        # differently when the receiver shares its GPU, sender_data.PREP_STEP_BYTES)
        self.device_id = str(torch.cuda.get_device_properties(kv.device).uuid) if kv.is_cuda else ""
        self.leases = LeaseTable(free_blocks or (lambda ids: None), config.lease_timeout_s)
        self.peers: dict[tuple[str, int], Peer] = {}
        self._connecting: dict[tuple[str, int], asyncio.Future] = {}
        self._rx_status: dict[int, TransferFSM] = {}
        self._attempts: dict[int, RecvAttempt] = {}
        self._preposting: dict[int, bool] = {}   # lease -> receives posted at reservation
        self._next_forget = 0.0                   # when the sweeper next drops finished leases
        self._tombstones: dict[int, float] = {}
        self.rx_traces: dict[int, list] = {}   # lease -> last attempt's trace (benchmarks)
        self.self_test_report: SelfTestReport | None = None
        # put-based transfers (rma_sender / rma_receiver): our pool registered with UCX once
        self.rma_local: rma.Registration | None = None
        self.putter: rma.Putter | None = None
        self.fencing: dict[tuple[int, int], Any] = {}   # (endpoint id, xid) -> RmaAttempt being fenced
        # high priority: the gathers, scatters and checksums are a few short kernels per layer that
        # would otherwise queue behind the forward's long GEMMs and trail the prefill by many layers
        self._stream = torch.cuda.Stream(kv.device, priority=-1) if kv.is_cuda else None
        # a transfer's setup (index tensors to the GPU, FP8 scale checks) on the loop thread: on
        # the legacy default stream a synchronous host->device copy waits for every kernel queued
        # there, i.e. for the worker's whole forward in flight (prefill or decode step)
        self._setup = torch.cuda.Stream(kv.device) if kv.is_cuda else None
        # staging buffers reused across layers/transfers, allocated on the side stream that
        # uses them (pool.BufferPool says why)
        self.staging = pool.BufferPool(kv, stream=self._stream)
        # CPU pools: the numpy gathers, scatters and checksums run here, off the loop thread.
        # CUDA: that work is queued from the loop and polled; this only waits for what takes
        # longer than transfer.spin_us, and makes the receivers' checksummers.
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
            # the accepting side's handshake timeout is ucxx's global one (5 s by default): a
            # loaded host (CI: four workers booting on two cores) took longer for the agent's own
            # self-test endpoint, and the listener dropped it mid-handshake
            ucxx.init(progress_mode=self.config.progress_mode, enable_python_future=True,
                      enable_delayed_submission=False,
                      connect_timeout=max(self.config.connect_timeout_s, LOCAL_HANDSHAKE_S))
        elif not ucxx.core._ctx.enable_python_future:
            log.warning("kvtransfer: ucxx was initialised without python futures; transfers "
                        "will be slow (initialise ucxx after creating the TransferAgent)")
        self._worker = ucxx.core._get_ctx().worker
        self.top_up_futures()
        if self.staged_iov:
            try:   # descriptor-list messages are posted from this loop, beside UCX's progress thread
                rma.check_worker(self._worker.handle)
            except Exception as e:
                log.warning("kvtransfer: staged bundles through staging buffers (%s)", e)
                self.staged_iov = False
        self._setup_rma()
        self._listener = ucxx.create_listener(self._accept, port=self.config.listen_port or None)
        host = self.config.listen_host
        self._self_ep = await ucxx.create_endpoint(host, self._listener.port,
                                                   connect_timeout=LOCAL_HANDSHAKE_S)
        self._sweeper = asyncio.ensure_future(self._sweep_forever())
        return host, self._listener.port

    def _setup_rma(self) -> None:
        """transfer.data_path rma|auto: register the pool for peers' puts (auto: on failure,
        log it and keep to tag messages)."""
        if self.config.data_path == "tag":
            return
        try:
            rma.check_worker(self._worker.handle)
            ctx = self._ucxx.core._get_ctx()
            nbytes = self.kv.numel() * self.kv.element_size()
            self.rma_local = rma.Registration(ctx.context.handle, self.kv.data_ptr(), nbytes,
                                              self.kv.is_cuda)
            self.putter = rma.Putter(self.rma_local)
        except Exception as e:
            if self.config.data_path == "rma":
                raise
            log.warning("kvtransfer: no put-based transfers (%s); using tag messages", e)
            self.rma_local = self.putter = None

    def rma_info(self) -> dict | None:
        """What a peer needs to put into our pool (sent in hello_ok), or None."""
        if self.rma_local is None:
            return None
        return {**self.rma_local.info(), "num_blocks": self.layout.num_blocks}

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
        await peer.send(encode("hello", compat=self.compat, device=self.device_id))
        reply = await asyncio.wait_for(peer.hello, self.config.connect_timeout_s)
        if reply["t"] != "hello_ok":
            ep.abort()
            raise RuntimeError(f"peer {peer.name} refused us: {reply['reason']}")
        peer.device = reply.get("device", "")
        check_transports(peer.name, lane_transports(ep_info(ep)),
                         self.config.expected_transports, self.kv.is_cuda)
        if reply.get("rma") and self.putter is not None:
            try:
                peer.rma = rma.RemoteRegion(ep._ep.handle, reply["rma"])
            except Exception as e:
                log.warning("kvtransfer: %s's remote key did not unpack (%s); tag messages to it", peer.name, e)
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
        for attempt in list(self.fencing.values()):
            if attempt.ep is peer.ep:
                attempt.sender_lost()
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
        peer.device = msg.get("device", "")
        asyncio.ensure_future(peer.send(encode("hello_ok", rma=self.rma_info(), device=self.device_id)))

    def _on_hello_ok(self, peer: Peer, msg: dict) -> None:
        if not peer.hello.done():
            peer.hello.set_result(msg)

    _on_hello_err = _on_hello_ok

    # ---- round-trip probe ------------------------------------------------------------------
    def rtt(self, addr: tuple[str, int], n: int = 20) -> list[float]:
        """Seconds of `n` control-message round trips (ping -> pong) to the agent at `addr`:
        the latency floor of every protocol step (begin/ready, complete/ack)."""
        return self.call(self._rtt(tuple(addr), n), timeout=30 + n)

    async def _rtt(self, addr: tuple[str, int], n: int) -> list[float]:
        peer = await self.peer(addr)
        out = []
        for i in range(n):
            peer.pong = asyncio.get_running_loop().create_future()
            t0 = time.perf_counter()
            await peer.send(encode("ping", n=i))
            await asyncio.wait_for(peer.pong, 10)
            out.append(time.perf_counter() - t0)
        return out

    def _on_ping(self, peer: Peer, msg: dict) -> None:
        asyncio.ensure_future(peer.send(encode("pong", n=msg["n"])))

    def _on_pong(self, peer: Peer, msg: dict) -> None:
        fut = getattr(peer, "pong", None)
        if fut is not None and not fut.done():
            fut.set_result(msg)

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

    def _on_fence(self, peer: Peer, msg: dict) -> None:
        """The decode side stops our put-based transfer: post nothing more, flush, confirm."""
        sender = peer.senders.get(msg["xid"])
        if sender is not None:
            sender.fence(msg.get("reason", ""))
        asyncio.ensure_future(self._fenced(peer, msg))

    async def _fenced(self, peer: Peer, msg: dict) -> None:
        try:
            if not peer.lost and peer.ep._ep.handle:
                await rma.flush(peer.ep._ep.handle)
        except Exception:
            log.debug("kvtransfer: flush before fenced", exc_info=True)
        try:
            await peer.send(encode("fenced", xid=msg["xid"], lease=msg["lease"], epoch=msg["epoch"]))
        except Exception:
            pass   # the decode side went away: nothing waits for us

    def _on_fenced(self, peer: Peer, msg: dict) -> None:
        attempt = self.fencing.get((id(peer.ep), msg["xid"]))
        if attempt is not None:
            attempt.on_fenced()

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
            if peer.rma is not None:   # unpacked on the endpoint: released while it is alive
                peer.rma.destroy()     # (a lost peer's key is left to the worker's teardown)
            peer.ep.abort()
        self._self_ep.abort()
        self._listener.close()
        if self.rma_local is not None:
            self.rma_local.close()

    def __enter__(self) -> "TransferAgent":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
