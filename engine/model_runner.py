"""The one bridge between the plain-Python control plane and torch.

Turns a SchedulerOutput into flat tensors (input ids, positions, attention metadata), runs the
model, and samples one token for every chunk that reaches the end of its request's tokens.

A step is launched (`launch`: inputs built, work enqueued on the device, the greedy tokens'
copy to the host started) and then read (`collect`: the one host sync); `execute` does both.
Overlapped decode (engine/overlap.py) launches step N+1 before collecting step N: the input id
of a request that step N sampled for is then taken from N's tokens on the device (`TokenGather`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import AttentionMetadata
from .cuda_graph import DecodeGraphRunner, DecodeInputs, TokenGather
from .request import Request
from .sampler import HostCopy
from .scheduler import SchedulerOutput


@dataclass
class StepInputs:
    input_ids: torch.Tensor        # int64 [T]
    positions: torch.Tensor        # int64 [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor   # int64 [num_sampling_chunks]
    sampling_rows: list[int]       # chunk index of each logits row


@dataclass
class LaunchedStep:
    """A step enqueued on the device whose sampled tokens the host has not read yet."""
    sched: SchedulerOutput
    reqs: list[Request]            # the requests that sample, in logits-row order
    logits: torch.Tensor           # [len(reqs), V], float32 (decode graphs: the model dtype); may be
                                   # a graph's static output: valid only until the next launch
                                   # (read at once unless all greedy)
    greedy: torch.Tensor           # int64 [len(reqs)] argmax of each row, on the device
    host: HostCopy | None          # greedy's copy to the host (all rows greedy), in flight

    def wait(self) -> None:
        """Block until the step's device work is done (steps left in flight are all greedy)."""
        if self.host is not None:
            self.host.wait()


def _token_ids(req: Request, s: int, n: int) -> list[int]:
    """Tokens at positions [s, s+n); 0 for a position whose token was sampled by a launched step
    the host has not read yet (a TokenGather fills it in on the device)."""
    p = req.num_prompt_tokens
    known = req.prompt_token_ids[s:s + n] + req.output_token_ids[max(s - p, 0):max(s + n - p, 0)]
    return known + [0] * (n - len(known))


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
        ids.extend(_token_ids(req, s, n))
        pos.extend(range(s, s + n))
        table = req.block_ids
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


def build_decode_inputs(out: SchedulerOutput, block_size: int, prev: TokenGather | None = None) -> DecodeInputs:
    """Host-side inputs of a step whose chunks are all one token (see `is_single_token_step`)."""
    ids, pos, slots, seq_lens, tables = [], [], [], [], []
    for chunk in out.chunks:
        req, s = chunk.request, chunk.start
        table = req.block_ids
        ids.append(req.token_id(s) if s < req.num_tokens else 0)     # else: from `prev`
        pos.append(s)
        slots.append(table[s // block_size] * block_size + s % block_size)
        seq_lens.append(s + 1)
        tables.append(table)
    return DecodeInputs(ids, pos, slots, seq_lens, tables, prev)


def is_single_token_step(out: SchedulerOutput) -> bool:
    return all(c.num_new_tokens == 1 for c in out.chunks)


def token_gather(out: SchedulerOutput, prev: LaunchedStep | None) -> TokenGather | None:
    """Which chunks take their input token from `prev`'s samples: those starting at a position
    the host has no token for yet. Only decode steps run behind another (engine/overlap.py), so
    chunk index = token index."""
    if prev is None:
        return None
    row = {r.request_id: i for i, r in enumerate(prev.reqs)}
    dst = [i for i, c in enumerate(out.chunks) if c.start >= c.request.num_tokens]
    return TokenGather(prev.greedy, dst, [row[out.chunks[i].request.request_id] for i in dst]) if dst else None


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
        return self.collect(self.launch(out, None, after_layer))

    def launch(self, out: SchedulerOutput, prev: LaunchedStep | None = None, after_layer=None) -> LaunchedStep:
        """Enqueue one step; input ids not yet on the host come from `prev`'s tokens on the device."""
        gather = token_gather(out, prev)
        g = self.decode_graphs
        if g is not None and after_layer is None and len(out.chunks) <= g.max_batch and is_single_token_step(out):
            logits, greedy = g.run(build_decode_inputs(out, self.block_size, gather))
            rows = [i for i, c in enumerate(out.chunks) if c.samples]
            if len(rows) < len(out.chunks):
                idx = torch.tensor(rows, device=logits.device)
                logits, greedy = logits[idx], greedy[idx]
        else:
            inp = build_inputs(out, self.block_size, self.device)
            if gather is not None:
                dst, src = (torch.tensor(x, device=self.device) for x in (gather.dst, gather.src))
                inp.input_ids.index_copy_(0, dst, gather.tokens.index_select(0, src))
            self.attn.prepare(inp.meta)
            logits = self.model.forward(inp.input_ids, inp.positions, self.attn, inp.logits_indices, after_layer)
            greedy, rows = logits.argmax(dim=-1), inp.sampling_rows
        reqs = [out.chunks[i].request for i in rows]
        host = HostCopy(greedy) if all(r.params.greedy for r in reqs) else None
        return LaunchedStep(out, reqs, logits, greedy, host)

    def collect(self, step: LaunchedStep) -> dict[str, int]:
        """Wait for the step and return request_id -> sampled token."""
        reqs = step.reqs
        if step.host is not None:
            tokens = step.host.tolist()       # the step's one host sync
        else:
            tokens = self.sampler.sample(step.logits, [r.request_id for r in reqs], [r.params for r in reqs])
        return {r.request_id: tok for r, tok in zip(reqs, tokens)}
