"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step (every sequence adds one token) has the same kernels for every batch of a given
size, so it is captured once per bucket (1, 2, 4, ... up to the largest running batch) and
replayed with the batch padded to its bucket. Inputs live in static device buffers that the
graphs read; each step copies the host-built inputs into them (pinned staging, asynchronous),
replays, and leaves logits and the greedy tokens (argmax on the device, inside the graph) in
static outputs. The only host sync of a step is the caller reading the sampled tokens.

Overlapped decode (engine/overlap.py): a step can be launched while the previous one still runs.
Input ids that the previous step sampled are not on the host: `DecodeInputs.prev` names them,
and after the input copy, before the replay, `ids[dst] = prev_tokens[src]` runs on the device
(two small ops, outside the graph). The staging buffers are rewritten only once the previous
step's copy out of them is done (an event), and the block table is kept across steps
(`BlockTableRows`): a row is rewritten only where its request's blocks changed.

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


class TokenGather(NamedTuple):
    """Input ids still on the device: row dst[i]'s id is tokens[src[i]] (the previous step's samples)."""
    tokens: torch.Tensor      # int64 [rows of the previous step], on the device
    dst: list[int]
    src: list[int]


class DecodeInputs(NamedTuple):
    """One decode step's host-side inputs, one entry per sequence."""
    input_ids: list[int]           # rows named in prev.dst: any value (replaced on the device)
    positions: list[int]
    slots: list[int]
    seq_lens: list[int]            # context length including the new token
    block_tables: Sequence[Sequence[int]]   # per row; see BlockTableRows for what is rewritten
    prev: TokenGather | None = None


class PaddedDecode(NamedTuple):
    i64: np.ndarray       # int64 [3, bucket]: input ids, positions, slots
    seq_lens: np.ndarray  # int32 [bucket]
    tables: np.ndarray    # int32 [bucket, width]


class BlockTableRows:
    """A host block table [rows, width] kept across steps; write(tables) rewrites what changed.

    Row i is known by the list object tables[i]. The engine passes `Request.block_ids`, the same
    list for as long as the request keeps its blocks, only growing, so a decode step usually
    writes just the entries of newly allocated blocks. A list seen before in a later row (a
    request ahead of it left the batch: rows only move up) has its row copied up; anything else
    is written whole. Entries past a row's length are stale and never read: seq_len bounds reads.
    Contract: a list passed again has only grown since (appends); anything else is a new list."""

    def __init__(self, table: np.ndarray):
        self.table = table
        self._rows: dict[int, tuple[int, int]] = {}   # id(list) -> (row, entries written)
        self._lists: list = []                        # keeps those lists alive: their ids stay unique

    def write(self, tables: Sequence[Sequence[int]]) -> None:
        width, rows = self.table.shape[1], {}
        for i, t in enumerate(tables):
            n = len(t)
            if n > width:
                self._rows, self._lists = {}, []     # rows were half rewritten: trust none of them
                raise ValueError(f"sequence {i} has {n} blocks, the graph's table holds {width}")
            row, done = self._rows.get(id(t), (i, 0))
            if done > n or row < i:       # shrank, or its old row may already hold another list
                done = 0
            elif row > i:                 # rows are written in order: row > i still holds it
                self.table[i, :done] = self.table[row, :done]
            if done < n:
                self.table[i, done:n] = t[done:n]
            rows[id(t)] = (i, n)
        self._rows, self._lists = rows, list(tables)


def _fill_rows(inp: DecodeInputs, bucket: int, i64: np.ndarray, seq_lens: np.ndarray) -> None:
    """ids, positions, slots into i64[0:3, :bucket], seq_lens[:bucket]; padding rows get token 0,
    position 0, slot -1 (write_kv skips it) and seq_len 0 (attention reads nothing)."""
    n = len(inp.input_ids)
    if n > bucket:
        raise ValueError(f"{n} sequences do not fit bucket {bucket}")
    i64[0, :n], i64[1, :n], i64[2, :n] = inp.input_ids, inp.positions, inp.slots
    i64[:2, n:bucket], i64[2, n:bucket] = 0, -1
    seq_lens[:n], seq_lens[n:bucket] = inp.seq_lens, 0


def pad_decode_inputs(inp: DecodeInputs, bucket: int, width: int) -> PaddedDecode:
    """Pad a step's inputs to `bucket` rows: padding rows get slot -1 and seq_len 0."""
    i64 = np.zeros((3, bucket), dtype=np.int64)
    seq_lens = np.zeros(bucket, dtype=np.int32)
    _fill_rows(inp, bucket, i64, seq_lens)
    tables = np.zeros((bucket, width), dtype=np.int32)
    BlockTableRows(tables).write(inp.block_tables)
    return PaddedDecode(i64, seq_lens, tables)


class DecodeGraphRunner:
    """Runs decode steps of `model` over `attn` from static buffers, replaying CUDA graphs on GPU.

    width: block-table entries per sequence (max_model_len / block_size, rounded up); fixed so
    that one graph serves every context length."""

    def __init__(self, model, attn, width: int, buckets: Sequence[int], use_graphs: bool):
        self.model, self.attn, self.width = model, attn, width
        self.buckets = tuple(sorted(buckets))
        self.use_graphs = use_graphs
        # greedy tokens by kernels/argmax.py on CUDA (torch's took 28.6 us at batch 1), read at capture
        self.split_argmax = model.device.type == "cuda"
        # the graphs leave the LM head's logits in its dtype, read at capture: the float32 cast
        # was a kernel of its own (B=256: 96 us, then 55 us of argmax over twice the bytes;
        # bench/pdl_ab.py --ab logits); the sampler casts the rows it samples with temperature
        self.float_logits = False
        dev, top = model.device, self.buckets[-1]
        pin = dev.type == "cuda"
        # One byte buffer per side holding, in order, int64 [5, top] (input ids, positions, slots,
        # then the TokenGather's dst and src), int32 seq_lens [top] and int32 tables [top, width]:
        # a step's inputs go over in one copy of its prefix (each copy-engine operation around
        # the graph was followed by 3-9 us of device idle at batch 1: bench/step_trace.py,
        # bench/results/engine-b1-2026-11-29-s10.md)
        self._nbytes = (5 * top * 8, top * 4, top * width * 4)
        self._dev_bytes = torch.zeros(sum(self._nbytes), dtype=torch.uint8, device=dev)
        self._host_bytes = torch.zeros(sum(self._nbytes), dtype=torch.uint8, pin_memory=pin)
        self._i64, self._seq_lens, self._tables = self._views(self._dev_bytes, top, width)
        self._h_i64, self._h_seq, self._h_tables = self._views(self._host_bytes, top, width)
        self._i64[2] = -1
        self._qsl = torch.arange(top + 1, dtype=torch.int32, device=dev)
        self._np_i64, self._np_seq = self._h_i64.numpy(), self._h_seq.numpy()   # views of the staging
        self._rows = BlockTableRows(self._h_tables.numpy())
        self._staged: torch.cuda.Event | None = None   # recorded behind the last copy out of the staging
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _views(self, buf: torch.Tensor, top: int, width: int):
        a, b, _ = self._nbytes
        return (buf[:a].view(torch.int64).view(5, top), buf[a:a + b].view(torch.int32),
                buf[a + b:].view(torch.int32).view(top, width))

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(self._qsl[:b + 1], self._seq_lens[:b], self._tables[:b],
                                 self._i64[2, :b], [1] * b, [self.width * self._block_size()] * b)

    def _block_size(self) -> int:
        return self.attn.cache.block_size

    def _forward(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model.forward(self._i64[0, :b], self._i64[1, :b], self.attn,
                                    float_logits=self.float_logits)   # [b, V]
        if self.split_argmax:
            from ..kernels.argmax import argmax_rows
            return logits, argmax_rows(logits)
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

    def stage(self, inp: DecodeInputs, b: int) -> int:
        """Write a step's inputs, padded to bucket b, into the host staging buffers (the host part
        of a step); returns the number of ids gathered from the previous step."""
        # the staging is rewritten only once the previous step's copies out of it are done; they
        # were enqueued behind the step before it, whose tokens the engine has read: a short wait
        if self._staged is not None:
            self._staged.synchronize()
        _fill_rows(inp, b, self._np_i64, self._np_seq)
        self._rows.write(inp.block_tables)
        m = len(inp.prev.dst) if inp.prev is not None else 0
        if m:
            self._np_i64[3, :m], self._np_i64[4, :m] = inp.prev.dst, inp.prev.src
        return m

    @torch.inference_mode()
    def run(self, inp: DecodeInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step -> (logits [n, V] (float32 if float_logits, else the model dtype),
        greedy tokens int64 [n]) on the device.
        The logits are a static output (overwritten by the next run); the tokens are a copy."""
        n = len(inp.input_ids)
        b = bucket_for(n, self.buckets)
        if b is None:
            raise ValueError(f"decode batch {n} exceeds the largest graph bucket {self.max_batch}")
        m = self.stage(inp, b)
        used = self._nbytes[0] + self._nbytes[1] + b * self.width * 4    # through tables[:b]
        self._dev_bytes[:used].copy_(self._host_bytes[:used], non_blocking=True)
        if self._i64.is_cuda:
            self._staged = torch.cuda.Event()
            self._staged.record()
        if m:   # ids the previous step sampled, straight from its output on the device
            self._i64[0].index_copy_(0, self._i64[3, :m], inp.prev.tokens.index_select(0, self._i64[4, :m]))
        if b in self._graphs:
            self._graphs[b].replay()
            logits, tokens = self._outputs[b]
        else:
            self.attn.prepare(self._meta(b))
            logits, tokens = self._forward(b)
        return logits[:n], tokens[:n].clone()
