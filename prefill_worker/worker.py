"""PrefillWorker: computes a prompt's KV and its first token, then pushes the KV into the blocks a
decode worker reserved.

Life cycle of one prefill (`prefill()`):
    PrefillQueue   the request waits in the engine's batch (with hold_blocks: its blocks outlive it)
    Prefilling     chunked prefill under the engine's token budget; prefix-cache hits skip work
    Pushing        a kvtransfer sender pushes every layer of the blocks the decode side lacks,
                   then the completion with per-layer checksums; the decode side verifies
    done           blocks released (they stay in this worker's prefix cache), timings returned
On CPU the push starts after the forward pass; the sender's per-layer API (push_layer) is what a
layer-wise overlapped push calls (see docs/kvtransfer.md).
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
        super().__init__(config, name)
        self.loop._on_step = self._on_step

    def _on_step(self, outs) -> None:
        for o in outs:
            if o.finished and o.request_id in self._done:
                self._first[o.request_id] = (o.token_ids[0] if o.token_ids else -1, o.finish_reason,
                                             o.num_cached_tokens)
                self._done[o.request_id].set()

    def prefill(self, request_id: str, prompt_token_ids: list[int], params: dict, handoff: dict,
                first_block: int, timeout: float = 120.0) -> dict:
        """Prefill, push the KV of blocks [first_block:] into the handoff's blocks, return
        {"first_token", "finish_reason", "ok", "reason", "prefill_s", "transfer_s", "num_cached_tokens"}."""
        t0 = time.monotonic()
        done = self._done[request_id] = threading.Event()
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
            src = self.loop.run(lambda e: e.held_block_ids(request_id))[first_block:]
            if self.fault and self.fault[0] == "die_before_push":
                self._die()
            sender = self.agent.open_sender(HandoffRecord.from_dict(handoff), src)
            for layer in range(self.engine.arch.num_layers):
                sender.push_layer(layer)
                if self.fault and self.fault[0] == "die_mid_push" and layer == self.engine.arch.num_layers // 2:
                    time.sleep(0.2)
                    self._die()
            status = sender.wait(timeout)
            t2 = time.monotonic()
            ok = status.state is TransferState.SUCCESS
            return {"ok": ok, "reason": status.reason, "first_token": first, "finish_reason": reason,
                    "prefill_s": t1 - t0, "transfer_s": t2 - t1, "num_cached_tokens": cached}
        finally:
            self._done.pop(request_id, None)
            self.loop.run(lambda e: e.release_held(request_id))
