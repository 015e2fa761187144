"""splitserve.kvtransfer: moving paged KV blocks between workers over UCX (ucxx).

Public API (see docs/kvtransfer.md):
    KVLayout, TransferAgent, KVSender, HandoffRecord, TransferState, TransferStatus,
    LeaseTable, LeaseState
`TransferAgent` (and with it ucxx/torch) is imported lazily so the plain-Python parts
(lease table, state machine, layout/plan) load without them.
"""
from __future__ import annotations

from .layout import KVLayout, TransferPlan
from .lease import LeaseError, LeaseState, LeaseTable
from .state import TransferFSM, TransferState, TransferStatus

__all__ = ["KVLayout", "TransferPlan", "LeaseError", "LeaseState", "LeaseTable", "TransferFSM",
           "TransferState", "TransferStatus", "TransferAgent", "KVSender", "HandoffRecord"]


def __getattr__(name: str):
    if name == "TransferAgent":
        from .agent import TransferAgent
        return TransferAgent
    if name == "KVSender":
        from .sender import KVSender
        return KVSender
    if name == "HandoffRecord":
        from .wire import HandoffRecord
        return HandoffRecord
    raise AttributeError(name)
