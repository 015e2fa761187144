"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step (every sequence adds one token) has the same kernels for every batch of a given
size, so it is captured once per bucket (1, 2, 4, ... up to the largest running batch) and
replayed with the batch padded to its bucket. Inputs live in static device buffers that the
graphs read; each step copies the host-built inputs into them (pinned staging, asynchronous),
replays, and leaves logits and the greedy tokens (argmax on the device, inside the graph) in
static outputs. The only host sync of a step is the caller reading the sampled tokens.

Padding rows (bucket - n of them): token 0 at position 0, slot -1 (write_kv skips it),
seq_len 0 (decode attention returns a zero row without reading the block table). Their logits
and tokens are computed and ignored.

Without CUDA (tests under TRITON_INTERPRET=1) the same static-buffer path runs eagerly, so the
padding and buffer logic is exercised on CPU; only capture/replay needs a GPU.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch

from .attention import AttentionMetadata

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def decode_buckets(max_num_seqs: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> tuple[int, ...]:
    """The buckets needed for batches up to max_num_seqs (the last one covers it)."""
    out = [b for b in sorted(buckets) if b < max_num_seqs]
    return tuple(out + [next((b for b in sorted(buckets) if b >= max_num_seqs), max_num_seqs)])


def bucket_for(n: int, buckets: Sequence[int]) -> int | None:
    """Smallest bucket holding n sequences, or None when n exceeds the largest."""
    return next((b for b in buckets if b >= n), None)


class DecodeInputs(NamedTuple):
    """One decode step's host-side inputs, one entry per sequence."""
    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    seq_lens: list[int]            # context length including the new token
    block_tables: list[list[int]]


class PaddedDecode(NamedTuple):
    i64: np.ndarray       # int64 [3, bucket]: input ids, positions, slots
    seq_lens: np.ndarray  # int32 [bucket]
    tables: np.ndarray    # int32 [bucket, width]


def pad_decode_inputs(inp: DecodeInputs, bucket: int, width: int) -> PaddedDecode:
    """Pad a step's inputs to `bucket` rows: padding rows get slot -1 and seq_len 0."""
    n = len(inp.input_ids)
    if n > bucket:
        raise ValueError(f"{n} sequences do not fit bucket {bucket}")
    i64 = np.zeros((3, bucket), dtype=np.int64)
    i64[2] = -1
    i64[0, :n], i64[1, :n], i64[2, :n] = inp.input_ids, inp.positions, inp.slots
    seq_lens = np.zeros(bucket, dtype=np.int32)
    seq_lens[:n] = inp.seq_lens
    tables = np.zeros((bucket, width), dtype=np.int32)
    for i, t in enumerate(inp.block_tables):
        if len(t) > width:
            raise ValueError(f"sequence {i} has {len(t)} blocks, the graph's table holds {width}")
        tables[i, :len(t)] = t
    return PaddedDecode(i64, seq_lens, tables)


class DecodeGraphRunner:
    """Runs decode steps of `model` over `attn` from static buffers, replaying CUDA graphs on GPU.

    width: block-table entries per sequence (max_model_len / block_size, rounded up); fixed so
    that one graph serves every context length."""

    def __init__(self, model, attn, width: int, buckets: Sequence[int], use_graphs: bool):
        self.model, self.attn, self.width = model, attn, width
        self.buckets = tuple(sorted(buckets))
        self.use_graphs = use_graphs
        dev, top = model.device, self.buckets[-1]
        pin = dev.type == "cuda"
        self._i64 = torch.zeros(3, top, dtype=torch.int64, device=dev)
        self._i64[2] = -1
        self._seq_lens = torch.zeros(top, dtype=torch.int32, device=dev)
        self._tables = torch.zeros(top, width, dtype=torch.int32, device=dev)
        self._qsl = torch.arange(top + 1, dtype=torch.int32, device=dev)
        self._h_i64 = torch.zeros(3, top, dtype=torch.int64, pin_memory=pin)
        self._h_seq = torch.zeros(top, dtype=torch.int32, pin_memory=pin)
        self._h_tables = torch.zeros(top, width, dtype=torch.int32, pin_memory=pin)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(self._qsl[:b + 1], self._seq_lens[:b], self._tables[:b],
                                 self._i64[2, :b], [1] * b, [self.width * self._block_size()] * b)

    def _block_size(self) -> int:
        return self.attn.cache.block_size

    def _forward(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model.forward(self._i64[0, :b], self._i64[1, :b], self.attn)   # [b, V] f32
        return logits, logits.argmax(dim=-1)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, all sharing one memory pool."""
        if not self.use_graphs:
            return
        pool = None
        for b in reversed(self.buckets):
            self.attn.prepare(self._meta(b))     # plans splits, allocates scratch outside capture
            self._forward(b)                     # warm-up: Triton compile, cuBLAS handles
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self._outputs[b] = self._forward(b)
            pool = g.pool()
            self._graphs[b] = g
        torch.cuda.synchronize()

    @torch.inference_mode()
    def run(self, inp: DecodeInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step -> (float32 logits [n, V], greedy tokens int64 [n]) on the device."""
        n = len(inp.input_ids)
        b = bucket_for(n, self.buckets)
        if b is None:
            raise ValueError(f"decode batch {n} exceeds the largest graph bucket {self.max_batch}")
        p = pad_decode_inputs(inp, b, self.width)
        self._h_i64[:, :b].copy_(torch.from_numpy(p.i64))
        self._h_seq[:b].copy_(torch.from_numpy(p.seq_lens))
        self._h_tables[:b].copy_(torch.from_numpy(p.tables))
        # the previous step's sampled tokens were read on the host, so its copies are done
        self._i64.copy_(self._h_i64, non_blocking=True)
        self._seq_lens[:b].copy_(self._h_seq[:b], non_blocking=True)
        self._tables[:b].copy_(self._h_tables[:b], non_blocking=True)
        if b in self._graphs:
            self._graphs[b].replay()
            logits, tokens = self._outputs[b]
        else:
            self.attn.prepare(self._meta(b))
            logits, tokens = self._forward(b)
        return logits[:n], tokens[:n]
