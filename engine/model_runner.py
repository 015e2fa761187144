"""The one bridge between the plain-Python control plane and torch.

Turns a SchedulerOutput into flat tensors (input ids, positions, attention metadata), runs the
model, and samples one token for every chunk that reaches the end of its request's tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import AttentionMetadata
from .cuda_graph import DecodeGraphRunner, DecodeInputs
from .sampler import host_list
from .scheduler import SchedulerOutput


@dataclass
class StepInputs:
    input_ids: torch.Tensor        # int64 [T]
    positions: torch.Tensor        # int64 [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor   # int64 [num_sampling_chunks]
    sampling_rows: list[int]       # chunk index of each logits row


def build_inputs(out: SchedulerOutput, block_size: int, device: torch.device) -> StepInputs:
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    qsl = [0]
    seq_lens: list[int] = []
    tables: list[list[int]] = []
    logits_idx: list[int] = []
    rows: list[int] = []
    for ci, chunk in enumerate(out.chunks):
        req, s, n = chunk.request, chunk.start, chunk.num_new_tokens
        ids.extend(req.all_token_ids[s:s + n])
        pos.extend(range(s, s + n))
        table = [b.block_id for b in req.blocks]
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(s, s + n))
        qsl.append(qsl[-1] + n)
        seq_lens.append(s + n)
        tables.append(table)
        if chunk.samples:
            logits_idx.append(qsl[-1] - 1)
            rows.append(ci)
    width = max(len(t) for t in tables)
    padded = [t + [0] * (width - len(t)) for t in tables]

    def t(x, dt):
        return torch.tensor(x, dtype=dt, device=device)

    meta = AttentionMetadata(query_start_loc=t(qsl, torch.int32), seq_lens=t(seq_lens, torch.int32),
                             block_tables=t(padded, torch.int32), slot_mapping=t(slots, torch.int64),
                             query_lens_host=[c.num_new_tokens for c in out.chunks], seq_lens_host=seq_lens)
    return StepInputs(t(ids, torch.int64), t(pos, torch.int64), meta, t(logits_idx, torch.int64), rows)


def build_decode_inputs(out: SchedulerOutput, block_size: int) -> DecodeInputs:
    """Host-side inputs of a step whose chunks are all one token (see `is_single_token_step`)."""
    ids, pos, slots, seq_lens, tables = [], [], [], [], []
    for chunk in out.chunks:
        req, s = chunk.request, chunk.start
        table = [b.block_id for b in req.blocks]
        ids.append(req.all_token_ids[s])
        pos.append(s)
        slots.append(table[s // block_size] * block_size + s % block_size)
        seq_lens.append(s + 1)
        tables.append(table)
    return DecodeInputs(ids, pos, slots, seq_lens, tables)


def is_single_token_step(out: SchedulerOutput) -> bool:
    return all(c.num_new_tokens == 1 for c in out.chunks)


class ModelRunner:
    def __init__(self, model, attn_backend, sampler, block_size: int,
                 decode_graphs: DecodeGraphRunner | None = None):
        self.model = model
        self.attn = attn_backend
        self.sampler = sampler
        self.block_size = block_size
        self.device = model.device
        self.decode_graphs = decode_graphs   # GPU path: decode steps from static buffers / graphs

    def execute(self, out: SchedulerOutput, after_layer=None) -> dict[str, int]:
        """Run one step; returns request_id -> sampled token for the chunks that sample.
        after_layer(i) (see LlamaModel.forward) forces the eager path: graphs have no hooks."""
        g = self.decode_graphs
        if g is not None and after_layer is None and len(out.chunks) <= g.max_batch and is_single_token_step(out):
            return self._execute_decode(out)
        inp = build_inputs(out, self.block_size, self.device)
        self.attn.prepare(inp.meta)
        logits = self.model.forward(inp.input_ids, inp.positions, self.attn, inp.logits_indices, after_layer)
        reqs = [out.chunks[i].request for i in inp.sampling_rows]
        tokens = self.sampler.sample(logits, [r.request_id for r in reqs], [r.params for r in reqs])
        return {r.request_id: tok for r, tok in zip(reqs, tokens)}

    def _execute_decode(self, out: SchedulerOutput) -> dict[str, int]:
        logits, greedy = self.decode_graphs.run(build_decode_inputs(out, self.block_size))
        rows = [i for i, c in enumerate(out.chunks) if c.samples]
        reqs = [out.chunks[i].request for i in rows]
        if all(r.params.greedy for r in reqs):
            tokens = host_list(greedy)        # the step's one host sync
            return {r.request_id: tokens[i] for r, i in zip(reqs, rows)}
        idx = torch.tensor(rows, device=logits.device)
        sampled = self.sampler.sample(logits[idx], [r.request_id for r in reqs], [r.params for r in reqs])
        return {r.request_id: tok for r, tok in zip(reqs, sampled)}
