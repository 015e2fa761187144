"""DecodeWorker: runs the decode batch; a request's prompt KV either arrives over the wire from a
prefill worker or is computed here (colocated path).

Life cycle (named after the queues in engine/scheduler.py):
    TransferQueue  start_remote() reserved blocks under a kvtransfer lease; a prefill worker is
                   pushing KV into them. Lease expiry or cancel aborts the request (its blocks
                   are freed once, by the abort).
    RunningBatch   commit_remote() accepted a verified completion (lease Success) and appended the
                   prefill's first token; or generate_local() admitted the prompt for local prefill.
    done           finished or aborted; outputs are collected by the router with take_outputs().
"""
from __future__ import annotations

import logging
import threading
import time

from ..config import Config
from ..engine.request import SamplingParams
from ..kvtransfer.state import TransferState
from ..logs import req
from ..worker_runtime import WorkerRuntime, output_record

log = logging.getLogger("splitserve.decode")


class DecodeWorker(WorkerRuntime):
    role = "decode"

    def __init__(self, config: Config, name: str = "decode-0"):
        self._lease_requests: dict[int, str] = {}      # lease id -> request id (TransferQueue)
        self._lease_blocks: dict[tuple[int, ...], int] = {}
        super().__init__(config, name)

    # ------------------------------------------------------------ remote prefill
    def start_remote(self, request_id: str, prompt_token_ids: list[int], params: dict) -> dict | None:
        """Reserve blocks for the prompt (after a local prefix match) and put them under a lease.

        Returns {"handoff": HandoffRecord dict, "first_block": index of the first block the
        prefill worker must send, "num_cached_tokens": ...}, or None when there is no room now."""
        sp = SamplingParams(**params)
        if self.fault and self.fault[0] == "slow_reserve":
            delay_s, self.fault = self.fault[1] / 1e3, None
            time.sleep(delay_s)

        def reserve(e):
            got = e.reserve_remote(prompt_token_ids, sp, request_id)
            if got is None:
                return None
            block_ids, cached = got
            rec = self.agent.reserve(block_ids)
            self._lease_requests[rec.lease_id] = request_id
            self._lease_blocks[tuple(block_ids)] = rec.lease_id
            return {"handoff": rec.to_dict(), "first_block": cached // e.pool.block_size,
                    "num_cached_tokens": cached}
        return self.loop.run(reserve)

    def reissue(self, request_id: str, lease_id: int) -> dict:
        """A new epoch of the lease for a retry on another prefill worker."""
        rec = self.agent.reissue(lease_id)
        return rec.to_dict()

    def commit_remote(self, request_id: str, lease_id: int, first_token: int, timeout: float = 10.0) -> bool:
        """Accept the transfer only if the lease reached Success (epoch and checksums verified)."""
        status = self.agent.wait_lease(lease_id, timeout)
        if status.state is not TransferState.SUCCESS:
            log.warning("lease %d not successful (%s); aborting", lease_id, status.reason,
                        extra=req(request_id, worker=self.name, lease_id=lease_id))
            self.loop.run(lambda e: e.abort(request_id))
            self._forget_lease(lease_id)
            return False
        self._forget_lease(lease_id)
        out = self.loop.run(lambda e: e.commit_remote(request_id, first_token))
        if out is not None:
            self.loop.push_outputs([out])
        return True

    def cancel_remote(self, request_id: str, lease_id: int) -> None:
        self.agent.cancel(lease_id)
        self.loop.run(lambda e: e.abort(request_id))
        self._forget_lease(lease_id)

    def _forget_lease(self, lease_id: int) -> None:
        self._lease_requests.pop(lease_id, None)
        for k, v in list(self._lease_blocks.items()):
            if v == lease_id:
                del self._lease_blocks[k]

    def _lease_freed(self, block_ids: list[int]) -> None:
        """kvtransfer gave up a lease (expiry/cancel): abort its request, which frees its blocks once."""
        lease_id = self._lease_blocks.pop(tuple(block_ids), None)
        request_id = self._lease_requests.pop(lease_id, None) if lease_id is not None else None
        if request_id is not None:
            log.warning("lease %s ended without completion; aborting", lease_id,
                        extra=req(request_id, worker=self.name, lease_id=lease_id))
            self.loop.run(lambda e: e.abort(request_id))

    # ------------------------------------------------------------ colocated path
    def generate_local(self, request_id: str, prompt_token_ids: list[int], params: dict) -> None:
        sp = SamplingParams(**params)
        self.loop.run(lambda e: e.add_request(list(prompt_token_ids), sp, request_id=request_id))

    # ------------------------------------------------------------ streaming
    def take_outputs(self, timeout: float = 0.5) -> list[dict]:
        """Token deltas of every request on this worker since the last call (long poll)."""
        recs = [output_record(o) for o in self.loop.take_outputs(timeout)]
        if self.fault and self.fault[0] == "die_after_tokens":
            self._delivered = getattr(self, "_delivered", 0) + sum(len(r["new_token_ids"]) for r in recs)
            if self._delivered >= self.fault[1]:
                threading.Timer(0.3, self._die).start()   # after these outputs reach the router
        return recs
