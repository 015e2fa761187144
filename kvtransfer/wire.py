"""Wire types: the handoff record, control messages (JSON over UCX active messages) and the
64-bit tags of data messages.

Control messages (one AM each, {"t": type, ...}); every transfer message carries `xid`, the
sender's transfer id, which the decode side echoes in its replies:
    hello        {compat}                      first contact, both directions; mismatch -> hello_err
    begin        {xid, lease, epoch, key, nonce, src, dst_digest}   P -> D, opens an attempt (data follows at once);
                                           not sent for a pre-posted handoff (record.preposted)
    ready        {lease, epoch}                D -> P, accepted, receives posted (complete waits for it)
    reject       {lease, epoch, reason}        D -> P, attempt refused or failed
    complete     {lease, epoch, checksums[, dst_digest]}  P -> D, all layers posted (may overtake the data);
                                           pre-posted: binds the sender to the attempt
    ack          {lease, epoch}                D -> P, verified; the blocks belong to the request
    cancel       {lease, epoch, reason}        either way; acknowledged with cancel_ack
    cancel_ack   {lease, epoch}
    ping / pong  {n}                           either way: a control-path round trip (agent.rtt)
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from .layout import MAX_LAYERS, MAX_MSGS_PER_LAYER, NONCE_BITS

TAG_MARK = 0x5A   # top byte of every kvtransfer data tag (ucxx's own tags are hashes)
FULL_MASK = (1 << 64) - 1
KEY_MASK = 0xFF_FFFFFF_00000000   # mark + tag key: every message of one (lease, epoch)


@dataclass(frozen=True)
class HandoffRecord:
    """What the decode side returns after reserving blocks; the prefill side needs only this."""
    host: str
    port: int
    lease_id: int
    epoch: int
    block_ids: tuple[int, ...]
    tag_key: int
    ttl_s: float               # the lease's remaining life when the record was issued
    direct_min_blocks: int     # plan parameters chosen by the decode side
    bundle_bytes: int = 16 << 20
    # the decode side posted its receives at reservation (plan from the dst ids alone, data tags
    # with this nonce): the sender sends data, then `complete`, with no begin/ready round trip
    preposted: bool = False
    nonce: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_ids"] = list(self.block_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HandoffRecord":
        return cls(**{**d, "block_ids": tuple(d["block_ids"])})

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, s: str) -> "HandoffRecord":
        return cls.from_dict(json.loads(s))


def data_tag(tag_key: int, layer: int, msg: int, nonce: int = 0) -> int:
    """mark(8) | tag_key(24) | layer(10) | nonce(8) | msg(14). The nonce is the sender's (sent
    in its `begin`): the decode side posts its receives with it, so data of a second sender of
    the same lease epoch never matches them (its strays wait until the key is tombstoned)."""
    if not (0 <= layer < MAX_LAYERS and 0 <= msg < MAX_MSGS_PER_LAYER and 0 < tag_key < 1 << 24
            and 0 <= nonce < 1 << NONCE_BITS):
        raise ValueError(f"data tag out of range: key={tag_key} layer={layer} msg={msg} nonce={nonce}")
    return (TAG_MARK << 56) | (tag_key << 32) | (layer << 22) | (nonce << 14) | msg


def key_prefix(tag_key: int) -> int:
    return (TAG_MARK << 56) | (tag_key << 32)


def encode(msg_type: str, **fields) -> np.ndarray:
    return np.frombuffer(json.dumps({"t": msg_type, **fields}).encode(), dtype=np.uint8)


def decode(buf) -> dict:
    return json.loads(bytes(buf))
