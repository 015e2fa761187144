"""Raw ucxx baselines beside the paged handoff, run in a `testing.PoolWorker` (issue 5).

The same bytes of the worker's pool sent as one or `parts` plain tag messages (bench/transfer.py's
"raw" column, bench/raw_parts.py), optionally followed by the least verification a handoff can
do (one 8-byte checksum message, one read of every landed byte); and round trips of pre-posted
tag messages beside the agent's active-message `rtt`. Mixed into `PoolWorker`: uses its `agent`
and `kv`.
"""
from __future__ import annotations

import asyncio
import time

import numpy as np
import torch

VERIFY_MODES = ("", "sent", "summed")


def _word_sum(flat: torch.Tensor) -> torch.Tensor:
    """Wrapping sum of a uint8 view's bytes as int64 words (a 0-d tensor on its device; int32
    words summed into int64 read at 0.76 TB/s on the H200)."""
    return flat.view(torch.int64).sum()


class RawBaseline:
    """PoolWorker's raw-send methods (module docstring)."""

    def raw_recv(self, nbytes: int, tag: int, parts: int = 1, verify: bool = False) -> None:
        """Post receives of the pool's first `nbytes` as `parts` equal consecutive messages (raw
        tags tag + 16 + i; one message: tag itself); ack on tag + 1 once all have landed.
        verify: also receive the sender's checksum (tag + 2), sum the landed bytes and ack 1
        if they match (the least a verified handoff does: `raw_sum`)."""
        self.agent.call(self._raw_recv(nbytes, tag, parts, verify))

    async def _raw_recv(self, nbytes: int, tag: int, parts: int, verify: bool) -> None:
        from ucxx._lib.arr import Array
        from ucxx.types import Tag, TagMaskFull
        from .pool import as_buffer
        ep = self.agent._self_ep   # tag matching is per worker: any endpoint of ours will do
        reqs = [ep._ep.tag_recv(Array(as_buffer(view)), Tag(t), TagMaskFull)
                for t, view in self._raw_parts(nbytes, tag, parts)]
        want = np.zeros(1, np.int64)
        if verify:
            reqs.append(ep._ep.tag_recv(Array(want), Tag(tag + 2), TagMaskFull))

        async def then_ack():   # tell the sender the bytes have landed (and match)
            total = 0
            for req, (_, view) in zip(reqs, self._raw_parts(nbytes, tag, parts)):
                await req.wait()
                if verify:   # each part summed as it lands (queued: the GPU overlaps the next)
                    total = total + self._landed_sum(view)
            if verify:
                await reqs[-1].wait()
            ok = not verify or int(total) == int(want[0])
            await self._raw_peer.send(np.full(1, ok, np.uint8), tag=tag + 1, force_tag=True)
        asyncio.ensure_future(then_ack())

    def _landed_sum(self, view: torch.Tensor) -> torch.Tensor:
        """The receiver's check of one landed message (a fault test replaces it)."""
        return _word_sum(view)

    def raw_sum_seconds(self, nbytes: int, reps: int = 5) -> float:
        """Median seconds of `raw_sum` alone (the read rate of the verification)."""
        times = []
        for _ in range(reps + 1):
            if self.kv.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            self.raw_sum(nbytes)
            times.append(time.perf_counter() - t0)
        return sorted(times[1:])[reps // 2]

    def raw_sum(self, nbytes: int) -> int:
        """The wrapping sum of the pool's first `nbytes` as int64 words: one read of every byte
        and one value back, the cheapest whole-buffer check (the handoff's is per layer)."""
        return int(_word_sum(self.kv.view(-1).view(torch.uint8)[:nbytes]))

    def _raw_parts(self, nbytes: int, tag: int, parts: int) -> list:
        flat = self.kv.view(-1).view(torch.uint8)
        if parts == 1:
            return [(tag, flat[:nbytes])]
        step = nbytes // parts
        return [(tag + 16 + i, flat[i * step:(i + 1) * step]) for i in range(parts)]

    def raw_connect(self, addr) -> None:
        """Decode side of the raw baseline: an endpoint back to the sender for the ack."""
        self._raw_peer = self.agent.call(self.agent.peer(tuple(addr))).ep

    def raw_send(self, addr, nbytes: int, tag: int, parts: int = 1, verify: str = "") -> float:
        """Send the pool's first `nbytes` as `parts` messages posted at once; seconds until the
        receiver's ack. verify "sent": then the checksum, summed before the timing starts (as if
        computed when the KV was written); "summed": summed after it starts, before the send.
        Either needs raw_recv(verify=True); a mismatch raises."""
        if verify not in VERIFY_MODES:
            raise ValueError(f"raw_send: verify must be one of {VERIFY_MODES}, got {verify!r}")
        return self.agent.call(self._raw_send(tuple(addr), nbytes, tag, parts, verify), timeout=300)

    async def _raw_send(self, addr, nbytes: int, tag: int, parts: int, verify: str = "") -> float:
        from ucxx._lib.arr import Array
        from ucxx.types import Tag
        from .pool import as_buffer
        peer = await self.agent.peer(addr)
        ack = np.zeros(1, np.uint8)
        bufs = ([] if parts == 1 else   # one message: as before, ucxx makes its Array in send
                [(t, Array(as_buffer(view))) for t, view in self._raw_parts(nbytes, tag, parts)])
        check = np.zeros(1, np.int64)
        if verify == "sent":
            check[0] = self.raw_sum(nbytes)
        if self.kv.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        recv = asyncio.ensure_future(
            self.agent._self_ep.recv(ack, tag=tag + 1, force_tag=True))
        if verify == "summed":
            check[0] = self.raw_sum(nbytes)
        if verify:   # the checksum may overtake the data: the receiver waits for both
            checked = asyncio.ensure_future(
                peer.ep.send(check, tag=tag + 2, force_tag=True))
        if parts == 1:
            await peer.ep.send(as_buffer(self.kv.view(-1).view(torch.uint8)[:nbytes]), tag=tag,
                               force_tag=True)
        else:
            self.agent.top_up_futures()
            reqs = [peer.ep._ep.tag_send(arr, Tag(t)) for t, arr in bufs]
            for req in reqs:
                await req.wait()
        await recv
        dt = time.perf_counter() - t0
        if verify:
            await checked
            if not ack[0]:
                raise RuntimeError("raw_send: the receiver's sum does not match")
        return dt

    def tag_echo(self, tag: int, n: int) -> None:
        """Answer `n` tag pings (tag + 2i) with pongs (tag + 2i + 1), for `tag_rtt`: the round
        trip of pre-posted tag messages, beside `rtt`'s active messages."""
        async def echo():
            buf = np.zeros(8, np.uint8)
            for i in range(n):
                await self.agent._self_ep.recv(buf, tag=tag + 2 * i, force_tag=True)
                await self._raw_peer.send(buf, tag=tag + 2 * i + 1, force_tag=True)
        self.agent.submit(echo())

    def tag_rtt(self, addr, tag: int, n: int) -> list[float]:
        """Seconds of `n` tag ping -> pong round trips to the worker at `addr` (its `tag_echo`
        answers), each pong's receive posted before its ping."""
        async def pings():
            peer = await self.agent.peer(tuple(addr))
            ping, pong, out = np.zeros(8, np.uint8), np.zeros(8, np.uint8), []
            for i in range(n):
                recv = asyncio.ensure_future(
                    self.agent._self_ep.recv(pong, tag=tag + 2 * i + 1, force_tag=True))
                t0 = time.perf_counter()
                await peer.ep.send(ping, tag=tag + 2 * i, force_tag=True)
                await recv
                out.append(time.perf_counter() - t0)
            return out
        return self.agent.call(pings(), timeout=30 + n)

