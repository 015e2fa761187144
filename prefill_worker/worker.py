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
"""
from __future__ import annotations

import threading
import time

from ..config import Config
from ..engine.request import SamplingParams
from ..kvtransfer.state import TransferState
from ..kvtransfer.wire import HandoffRecord
from ..worker_runtime import WorkerRuntime


class PrefillWorker(WorkerRuntime):
    role = "prefill"

    def __init__(self, config: Config, name: str = "prefill-0"):
        self._done: dict[str, threading.Event] = {}
        self._first: dict[str, tuple[int, str | None, int]] = {}
        self._plans: dict[str, tuple[HandoffRecord, int]] = {}     # request -> (handoff, first block)
        self._senders: dict[str, tuple[object, float]] = {}        # request -> (sender, step start)
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
        """Open a sender for every planned request whose prompt completes in this step; the
        returned after_layer(i) pushes layer i of all of them (None: nothing to push here)."""
        opened = []
        for c in sched.chunks:
            plan = self._plans.pop(c.request.request_id, None)
            if plan is None:
                continue
            if not c.samples:            # an earlier chunk: plan again for the completing one
                self._plans[c.request.request_id] = plan
                continue
            handoff, first_block = plan
            if self.fault and self.fault[0] == "die_before_push":
                self._die()
            src = [b.block_id for b in c.request.blocks][first_block:]
            sender = self.agent.open_sender(handoff, src)
            self._senders[c.request.request_id] = (sender, time.monotonic())
            opened.append(sender)
        if not opened:
            return None
        mid = self.engine.arch.num_layers // 2

        def after_layer(i: int) -> None:
            for s in opened:
                s.push_layer(i)
            if i == mid and self.fault and self.fault[0] == "die_mid_push":
                time.sleep(0.2)
                self._die()
        return after_layer

    def prefill(self, request_id: str, prompt_token_ids: list[int], params: dict, handoff: dict,
                first_block: int, timeout: float = 120.0) -> dict:
        """Prefill, push the KV of blocks [first_block:] into the handoff's blocks, return
        {"first_token", "finish_reason", "ok", "reason", "prefill_s", "transfer_s", "step_s",
        "num_cached_tokens"}: transfer_s is the push time left after the forward (exposed),
        step_s the completing step's duration (the layers the push overlapped)."""
        t0 = time.monotonic()
        done = self._done[request_id] = threading.Event()
        self._plans[request_id] = (HandoffRecord.from_dict(handoff), first_block)
        sp = SamplingParams(**{**params, "max_tokens": 1, "stop": ()})
        self.loop.run(lambda e: e.add_request(list(prompt_token_ids), sp, request_id=request_id,
                                              hold_blocks=True))
        sender = None
        try:
            if not done.wait(timeout):
                self.loop.run(lambda e: e.abort(request_id))
                return {"ok": False, "reason": f"prefill timed out after {timeout}s"}
            first, reason, cached = self._first.pop(request_id)
            sender, t_step = self._senders.pop(request_id, (None, None))
            if reason == "abort":
                return {"ok": False, "reason": "aborted"}
            t1 = time.monotonic()
            if sender is None:           # the engine never ran a completing step for it
                src = self.loop.run(lambda e: e.held_block_ids(request_id))[first_block:]
                sender = self.agent.open_sender(HandoffRecord.from_dict(handoff), src)
                sender.push_all()
            status = sender.wait(timeout)
            t2 = time.monotonic()
            ok = status.state is TransferState.SUCCESS
            sender = None if ok else sender
            return {"ok": ok, "reason": status.reason, "first_token": first, "finish_reason": reason,
                    "prefill_s": t1 - t0, "transfer_s": t2 - t1, "step_s": t1 - (t_step or t1),
                    "num_cached_tokens": cached}
        finally:
            self._done.pop(request_id, None)
            self._plans.pop(request_id, None)
            late, _ = self._senders.pop(request_id, (None, None))
            for s in (sender, late):
                if s is not None and not s.poll().state.terminal:
                    s.cancel()
            self.loop.run(lambda e: e.release_held(request_id))
