"""Small CUDA values on their way to the host without a stream sync: `Readback` (a pinned copy
and an event, reused), `wait_gpu` (poll an event from the asyncio loop), `host_ints`.

The transfer agent reads its checksums back this way, from its loop thread, behind the kernels
that produced them, while the forward pass keeps running on other streams.
"""
from __future__ import annotations

import threading

import torch


def host_ints(t: torch.Tensor) -> list[int]:
    """A small int tensor's values. CUDA: copied right behind the work that produced it and waited
    for by an event, not a stream sync (tolist() would wait for everything on the stream,
    e.g. another thread's wait for a later layer of the forward)."""
    if not t.is_cuda:
        return t.tolist()
    rb = Readback(t)
    rb.event.synchronize()
    return rb.values()


class Readback:
    """A small CUDA int tensor's values on their way to the host: a pinned copy queued on the
    current stream behind the work that produced them, and an event after it. Poll `event`
    (`wait_gpu`) instead of blocking a thread; read `values()` once it has fired. With t=None it
    is only the event (work queued so far on the current stream is done). `pick`: the flat
    positions whose values `values()` returns, in that order (default: all).

    The pinned buffer and the event are reused: `values()` (called once the copy has landed)
    hands them back to a free list, so a transfer's read-backs allocate no pinned memory and
    create no CUDA event after the first few (fewer driver calls on the handoff's critical path;
    bench/results/transfer-cuda-s17.md, section 2: within the noise end to end). One whose
    values are never read is simply dropped."""

    _free: dict = {}   # (numel, dtype) -> [pinned tensors]; ("event", device) -> [CUDA events]
    _lock = threading.Lock()

    def __init__(self, t: torch.Tensor | None = None, pick: list[int] | None = None) -> None:
        self.host, self.pick = None, pick
        if t is not None:
            self.host = self._take((t.numel(), t.dtype))
            if self.host is None:
                self.host = torch.empty(t.numel(), dtype=t.dtype, pin_memory=True)
            self.host.copy_(t.reshape(-1), non_blocking=True)
        self._device = torch.cuda.current_device()   # an event records on its own device's streams
        self.event = self._take(("event", self._device)) or torch.cuda.Event()
        self.event.record()

    @classmethod
    def _take(cls, key):
        with cls._lock:
            lst = cls._free.get(key)
            return lst.pop() if lst else None

    @classmethod
    def _give(cls, key, obj) -> None:
        with cls._lock:
            lst = cls._free.setdefault(key, [])
            if len(lst) < 64:
                lst.append(obj)

    def values(self) -> list[int]:
        """The values, flattened (row-major), or those at `pick`. Call once, after the event."""
        host, self.host = self.host, None
        self._give(("event", self._device), self.event)
        if host is None:
            return []
        flat = host.tolist()
        self._give((host.numel(), host.dtype), host)
        return flat if self.pick is None else [flat[k] for k in self.pick]


async def wait_gpu(event, executor, spin_s: float) -> None:
    """Wait on the asyncio loop for a CUDA event: poll it, yielding to the loop, for up to
    `spin_s` (GPU work that is already runnable: a handful of kernels, tens of microseconds),
    then block for it in `executor`. Polling saves the executor round trip and its GIL hand-offs
    (0.5-1.8 ms per hop in a busy process, bench/results/transfer-cuda-v13.md)."""
    import asyncio
    import time
    end = time.perf_counter() + spin_s
    while not event.query():
        if time.perf_counter() >= end:
            await asyncio.get_running_loop().run_in_executor(executor, event.synchronize)
            return
        await asyncio.sleep(0)
