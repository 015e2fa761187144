"""Prefill side of a put-based (RMA) transfer: `KVSender._transfer` runs this when both agents
registered their pools (transfer.data_path rma or auto) and the decode agent published its key.

    begin (mode rma) ->                 <- ready      (the lease admitted our write)
    per batch of computed layers: wait for their KV (CUDA events), queue their checksums, then,
    once `ready` is in, one put per (layer, K|V, run of consecutive src and dst blocks) straight
    from our pool into the lease's blocks -- no gather, no staging, no receive to post
    flush (every put landed) -> complete {checksums} ->   <- ack (verified) | reject

The decode side cannot refuse a one-sided write, so a sender never puts before `ready`, stops at
a `fence` (agent._on_fence flushes and answers `fenced`), and posts nothing once fenced;
rma_receiver.py has the receive side's argument.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from . import pool, readback, rma
from .layout import coalesce, ids_digest
from .state import TransferState
from .wire import encode

if TYPE_CHECKING:
    from .agent import Peer
    from .sender import KVSender


def ep_handle(peer: "Peer") -> int:
    h = peer.ep._ep.handle
    if not h or peer.lost:
        raise RuntimeError(f"peer {peer.name} lost")
    return h


async def transfer(s: "KVSender", peer: "Peer") -> None:
    h = s.handoff
    loop = asyncio.get_running_loop()
    ready = s.reply = loop.create_future()
    peer.senders[s.xid] = s
    begin = asyncio.ensure_future(peer.send(encode(
        "begin", xid=s.xid, lease=h.lease_id, epoch=h.epoch, key=h.tag_key, nonce=s.nonce,
        src=s.src_ids, dst_digest=ids_digest(h.block_ids), mode="rma")))
    s._t("begin_sent")
    layers = asyncio.ensure_future(_put_layers(s, peer, ready))
    try:
        msg = await ready
        if msg["t"] != "ready":
            raise RuntimeError(f"decode worker refused the transfer: {msg.get('reason')}")
        s.fsm.to(TransferState.TRANSFERRING)
        s._t("ready")
        await begin
        sums = await layers
        s._t("posted")
        await rma.flush(ep_handle(peer))
        s._t("flushed")
        s.reply = loop.create_future()
        completion = {"xid": s.xid, "lease": h.lease_id, "epoch": h.epoch, "checksums": sums}
        if s.complete_hook is not None:
            completion = s.complete_hook(completion)
        await peer.send(encode("complete", **completion))
        msg = await s.reply
        s._t("acked")
        if msg["t"] != "ack":
            raise RuntimeError(f"decode worker rejected the completion: {msg.get('reason')}")
    finally:
        for task in (layers, begin):
            if not task.done():
                task.cancel()
            elif not task.cancelled():
                task.exception()
    s.fsm.to(TransferState.SUCCESS)


async def _put_layers(s: "KVSender", peer: "Peer", ready: asyncio.Future) -> list[int]:
    """Put each batch of computed layers as soon as its KV is written and `ready` is in; each
    batch's checksums are queued beside its puts (both only read the source) and read back at
    the end. Returns the layers' checksums."""
    agent, layout = s.agent, s.plan.layout

    def make() -> pool.Checksummer:   # index tensors to the device: off the loop (ready may arrive)
        with agent.setup_stream():
            return pool.Checksummer(agent.kv, s.src_ids, agent.scales)
    sums = await asyncio.get_running_loop().run_in_executor(agent.executor, make)
    runs = coalesce(s.src_ids, list(s.handoff.block_ids))
    remote = peer.rma
    nb_src, nb_dst, rb = layout.num_blocks, remote.num_blocks, layout.region_bytes
    L = layout.num_layers
    pending: list = []
    l = 0
    while l < L:
        await s._units_ready((l, 1))
        batch = [l]
        while l + len(batch) < L and s._is_computed((l + len(batch), 1)):
            batch.append(l + len(batch))
        s._t(f"prep {batch[0]}-{batch[-1]}")
        pending.append(await _written_then_sums(s, sums, batch))   # their checksums, later
        if not ready.done():
            await asyncio.shield(ready)
        if ready.result()["t"] != "ready" or s.fenced:
            raise RuntimeError("transfer refused or fenced: no puts")
        epH = ep_handle(peer)
        for layer in batch:
            for kv_idx in (0, 1):
                base = layer * 2 + kv_idx
                for r in runs:
                    agent.putter.put(epH, (base * nb_src + r.src0) * rb, r.n * rb, remote,
                                     (base * nb_dst + r.dst0) * rb)
                    s.msgs_posted += 1
                    s.bytes_sent += r.n * rb
        s._t(f"put {batch[0]}-{batch[-1]}")
        l += len(batch)
    out: list[int] = []
    for item in pending:
        out += await item
    s._t("sums")
    return out


async def _written_then_sums(s: "KVSender", sums: pool.Checksummer, layers: list[int]) -> asyncio.Future:
    """Wait until the layers' KV is written (their CUDA events; UCX copies on its own streams,
    so it must not read earlier) and start their checksums behind the same events; returns the
    future of the checksums (CPU: computed on the executor; the forward wrote the KV already)."""
    agent = s.agent
    if not agent.kv.is_cuda:
        return asyncio.get_running_loop().run_in_executor(agent.executor, sums.layers, layers)
    import torch
    events = s._layer_events(layers)
    with agent.side_stream():
        for ev in events:
            torch.cuda.current_stream().wait_event(ev)
        rbk = readback.Readback(sums.layers_dev(layers))
    spin = agent.config.spin_us * 1e-6
    for ev in events:
        await readback.wait_gpu(ev, agent.executor, spin if ev.query() else 0.0)

    async def values() -> list[int]:   # wanted only after the flush: waited on a thread, so a
        await readback.wait_gpu(rbk.event, agent.executor, 0.0)   # spinning loop holds no GIL meanwhile
        return rbk.values()
    return asyncio.ensure_future(values())
