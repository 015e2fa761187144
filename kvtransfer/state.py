"""The transfer state machine both sides expose through a non-blocking `poll()`.

    Bootstrapping -> Transferring -> Success
          \\               \\-------> Failed(reason)
           \\----------------------> Failed(reason)

Sender: Bootstrapping until the decode side accepted the attempt (READY), Transferring while
layers go out, Success once the decode side verified the completion (ACK), Failed on a refusal,
a dead peer, a cancel, or the deadline.
Receiver: Bootstrapping from reservation until a sender begins, Transferring while data lands,
Success once the completion matched the live lease (blocks now belong to the request), Failed
on rejection, expiry or cancel. Terminal states never change again.
"""
from __future__ import annotations

import enum
import threading
from dataclasses import dataclass


class TransferState(enum.Enum):
    BOOTSTRAPPING = "bootstrapping"
    TRANSFERRING = "transferring"
    SUCCESS = "success"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (TransferState.SUCCESS, TransferState.FAILED)


@dataclass(frozen=True)
class TransferStatus:
    state: TransferState
    reason: str = ""

    @property
    def done(self) -> bool:
        return self.state.terminal


_ALLOWED = {
    TransferState.BOOTSTRAPPING: {TransferState.TRANSFERRING, TransferState.FAILED},
    TransferState.TRANSFERRING: {TransferState.SUCCESS, TransferState.FAILED,
                                 TransferState.BOOTSTRAPPING},  # receiver: epoch reissued
    TransferState.SUCCESS: set(),
    TransferState.FAILED: set(),
}


class TransferFSM:
    """Thread-safe holder of one transfer's state; the first terminal state wins."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._status = TransferStatus(TransferState.BOOTSTRAPPING)
        self._done = threading.Event()

    def poll(self) -> TransferStatus:
        """Non-blocking: the current state (and the reason, once Failed)."""
        return self._status

    def wait(self, timeout: float | None = None) -> TransferStatus:
        self._done.wait(timeout)
        return self._status

    def to(self, state: TransferState, reason: str = "") -> bool:
        """Move to `state`; False (and no change) if the transition is not allowed."""
        with self._lock:
            if state not in _ALLOWED[self._status.state]:
                return False
            self._status = TransferStatus(state, reason)
            if state.terminal:
                self._done.set()
            return True

    def fail(self, reason: str) -> bool:
        return self.to(TransferState.FAILED, reason)
