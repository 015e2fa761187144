"""PrefillWorker: computes a prompt's KV and its first token, then pushes the KV into the blocks a
decode worker reserved.

Life cycle of one prefill (`prefill()`):
    PrefillQueue   the request waits in the engine's batch (with hold_blocks: its blocks outlive it)
    Prefilling     chunked prefill under the engine's token budget; prefix-cache hits skip work
    Pushing        in the step that completes the prompt, a kvtransfer sender is opened before the
                   forward and each layer is pushed as soon as its KV is written (layer-wise
                   overlap: the handshake and early layers travel while later layers compute);
                   then the completion with per-layer checksums; the decode side verifies
    done           blocks released (they stay in this worker's prefix cache), timings returned

The destination may come late: the router can start the prefill while the decode worker is still
reserving blocks (`prefill(..., handoff=None)`, then `attach()`). Until then each finished layer
is noted with its CUDA event (`_Ledger`); `attach` opens the sender and pushes the noted layers
with those events, and the layers still to come are pushed as they finish.
"""
from __future__ import annotations

import threading
import time

from ..config import Config
from ..engine.request import SamplingParams
from ..kvtransfer.state import TransferState
from ..kvtransfer.wire import HandoffRecord
from ..worker_runtime import WorkerRuntime


class _Ledger:
    """One prompt's push: its destination (plan), its blocks once the completing step begins,
    the layers finished before a sender existed, and the sender. `lock` orders the engine
    thread's layer notes against an RPC thread's attach."""

    def __init__(self, plan: tuple[HandoffRecord, int] | None):
        self.lock = threading.Lock()
        self.plan = plan                       # (handoff, first block to send) once known
        self.blocks: list[int] | None = None   # the prompt's block ids, set by the completing step
        self.t_step: float | None = None       # the completing step's start
        self.events: dict[int, object] = {}    # layer -> CUDA event (None on CPU), no sender yet
        self.all_done = False                  # every layer is in the pool (no completing step ran)
        self.sender = None
        self.attached = threading.Event()      # a sender exists, or the push was called off
        self.cancelled = False

    def open(self, agent) -> None:
        """(under lock) The plan and the blocks are both known: open the sender and push the
        layers already finished, each with the event recorded when it finished."""
        handoff, first_block = self.plan
        self.sender = agent.open_sender(handoff, self.blocks[first_block:])
        if self.all_done:
            self.sender.push_all()
        for layer, ev in sorted(self.events.items()):
            self.sender.push_layer(layer, event=ev)
        self.events.clear()
        self.attached.set()

    def layer_done(self, layer: int, is_cuda: bool) -> None:
        with self.lock:
            if self.sender is not None:
                self.sender.push_layer(layer)
                return
            ev = None
            if is_cuda:
                import torch
                ev = torch.cuda.Event()
                ev.record()
            self.events[layer] = ev


class PrefillWorker(WorkerRuntime):
    role = "prefill"

    def __init__(self, config: Config, name: str = "prefill-0"):
        self._done: dict[str, threading.Event] = {}
        self._first: dict[str, tuple[int, str | None, int]] = {}
        self._ledgers: dict[str, _Ledger] = {}
        self._ledgers_cv = threading.Condition()   # attach() may overtake its prefill() call
        super().__init__(config, name)
        self.loop._on_step = self._on_step
        self.engine.step_hook = self._step_hook

    def _on_step(self, outs) -> None:
        for o in outs:
            if o.finished and o.request_id in self._done:
                self._first[o.request_id] = (o.token_ids[0] if o.token_ids else -1, o.finish_reason,
                                             o.num_cached_tokens)
                self._done[o.request_id].set()

    # ------------------------------------------------------------ layer-wise push (engine thread)
    def _step_hook(self, sched):
        """For every prefill request whose prompt completes in this step: note its blocks and open
        its sender if the destination is known; the returned after_layer(i) pushes (or notes)
        layer i of all of them (None: nothing to push here)."""
        active = []
        for c in sched.chunks:
            led = self._ledgers.get(c.request.request_id)
            if led is None or not c.samples or led.blocks is not None:
                continue                 # not ours, an earlier chunk, or already under way
            if self.fault and self.fault[0] == "die_before_push":
                self._die()
            with led.lock:
                led.blocks, led.t_step = [b.block_id for b in c.request.blocks], time.monotonic()
                if led.plan is not None and not led.cancelled:
                    led.open(self.agent)
            active.append(led)
        if not active:
            return None
        mid, is_cuda = self.engine.arch.num_layers // 2, self.engine.device.type == "cuda"

        def after_layer(i: int) -> None:
            for led in active:
                led.layer_done(i, is_cuda)
            if i == mid and self.fault and self.fault[0] == "die_mid_push":
                time.sleep(0.2)
                self._die()
        return after_layer

    def attach(self, request_id: str, handoff: dict, first_block: int, wait_s: float = 5.0) -> bool:
        """The destination of a prefill started without one: push the layers finished so far and
        the rest as they come. False if the request is not here (aborted, failed, or its
        prefill() call did not arrive within wait_s: an actor's calls may run out of order)."""
        with self._ledgers_cv:
            self._ledgers_cv.wait_for(lambda: request_id in self._ledgers, wait_s)
            led = self._ledgers.get(request_id)
        if led is None:
            return False
        with led.lock:
            if led.cancelled or led.plan is not None:
                return False
            led.plan = (HandoffRecord.from_dict(handoff), first_block)
            if led.blocks is not None:
                led.open(self.agent)
        return True

    def abort(self, request_id: str) -> bool:
        led = self._ledgers.get(request_id)
        if led is not None:
            with led.lock:
                led.cancelled = True
            led.attached.set()
        return super().abort(request_id)

    def prefill(self, request_id: str, prompt_token_ids: list[int], params: dict, handoff: dict | None,
                first_block: int = 0, timeout: float = 120.0) -> dict:
        """Prefill, push the KV of blocks [first_block:] into the handoff's blocks, return
        {"first_token", "finish_reason", "ok", "reason", "prefill_s", "transfer_s", "step_s",
        "num_cached_tokens"}: transfer_s is the push time left after the forward (exposed),
        step_s the completing step's duration (the layers the push overlapped). With handoff
        None the destination comes later through attach()."""
        t0 = time.monotonic()
        done = self._done[request_id] = threading.Event()
        led = _Ledger(None if handoff is None else (HandoffRecord.from_dict(handoff), first_block))
        with self._ledgers_cv:
            self._ledgers[request_id] = led
            self._ledgers_cv.notify_all()
        sp = SamplingParams(**{**params, "max_tokens": 1, "stop": ()})
        self.loop.run(lambda e: e.add_request(list(prompt_token_ids), sp, request_id=request_id,
                                              hold_blocks=True))
        try:
            if not done.wait(timeout):
                self.loop.run(lambda e: e.abort(request_id))
                return {"ok": False, "reason": f"prefill timed out after {timeout}s"}
            first, reason, cached = self._first.pop(request_id)
            if reason == "abort":
                return {"ok": False, "reason": "aborted"}
            t1 = time.monotonic()
            with led.lock:
                if led.blocks is None:       # the engine never ran a completing step for it
                    led.blocks, led.all_done = self.loop.run(lambda e: e.held_block_ids(request_id)), True
                    if led.plan is not None and not led.cancelled:
                        led.open(self.agent)
            if not led.attached.wait(max(timeout - (t1 - t0), 0.001)) or led.sender is None:
                return {"ok": False, "reason": "aborted" if led.cancelled else "no destination for the KV arrived"}
            status = led.sender.wait(timeout)
            t2 = time.monotonic()
            ok = status.state is TransferState.SUCCESS
            return {"ok": ok, "reason": status.reason, "first_token": first, "finish_reason": reason,
                    "prefill_s": t1 - t0, "transfer_s": t2 - t1, "step_s": t1 - (led.t_step or t1),
                    "num_cached_tokens": cached}
        finally:
            self._done.pop(request_id, None)
            self._ledgers.pop(request_id, None)
            with led.lock:
                led.cancelled = True
                s = led.sender
            if s is not None and not s.poll().state.terminal:
                s.cancel()
            self.loop.run(lambda e: e.release_held(request_id))
