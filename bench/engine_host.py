#!/usr/bin/env python3
"""Host work of one decode step's inputs: the previous implementation (copied here as the
baseline) vs the current one, side by side in one process, on the CPU.

    python bench/engine_host.py [--batch 256] [--blocks 64] [--widths tight,2052] [--steps 200]

Timed per step (median): turning the scheduler's output into the step's inputs and writing them,
padded to the bucket, into the host staging buffers that the graph runner's H2D copies read
(model_runner.build_decode_inputs + DecodeGraphRunner.stage; before: build_decode_inputs +
pad_decode_inputs + the copy into the staging tensors). Not timed: scheduling, the copies to the
device, the replay, reading tokens. The requests are real scheduler requests holding --blocks
blocks of 16 tokens (joined through reserve_remote/commit_remote, so no prefill), driven through
engine/overlap.StepPipeline with a stand-in runner:
  steady    the same requests every step; contexts are staggered, so one row in 16 gains a block
  turnover  each step the first request leaves (the rest move up a row) and a new one joins
and each both synchronous (old and new timed on the same step) and overlapped (new only, with
the TokenGather of the step in flight; the old code needs every input id on the host).
--threads 1 (default): the baseline's 2 MB staging copy is a torch CPU copy, which on a 2-core VM
took ~8 ms with torch's two intra-op threads and 0.2 ms with one (measured), an artifact that
would flatter the new code (it writes the staging in place).
--widths: block-table entries per row (max_model_len / 16): 'tight' just fits the contexts
(--blocks mid-run, up to --blocks + steps/32 at the end), 2052 is bench/engine.py's max_model_len.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from splitserve.config import SchedulerConfig  # noqa: E402
from splitserve.engine.block_pool import BlockPool  # noqa: E402
from splitserve.engine.cuda_graph import DecodeGraphRunner, DecodeInputs, bucket_for  # noqa: E402
from splitserve.engine.model_runner import LaunchedStep, build_decode_inputs, token_gather  # noqa: E402
from splitserve.engine.overlap import StepPipeline  # noqa: E402
from splitserve.engine.request import Request, SamplingParams  # noqa: E402
from splitserve.engine.sampler import HostCopy  # noqa: E402
from splitserve.engine.scheduler import Scheduler  # noqa: E402

BS = 16


# ------------------------------------------------------------------ the previous implementation
def old_build(out, block_size: int) -> DecodeInputs:
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


def old_pad_and_stage(inp: DecodeInputs, bucket: int, width: int, h_i64, h_seq, h_tables) -> np.ndarray:
    n = len(inp.input_ids)
    i64 = np.zeros((3, bucket), dtype=np.int64)
    i64[2] = -1
    i64[0, :n], i64[1, :n], i64[2, :n] = inp.input_ids, inp.positions, inp.slots
    seq_lens = np.zeros(bucket, dtype=np.int32)
    seq_lens[:n] = inp.seq_lens
    tables = np.zeros((bucket, width), dtype=np.int32)
    for i, t in enumerate(inp.block_tables):
        tables[i, :len(t)] = t
    h_i64[:, :bucket].copy_(torch.from_numpy(i64))
    h_seq[:bucket].copy_(torch.from_numpy(seq_lens))
    h_tables[:bucket].copy_(torch.from_numpy(tables))
    return tables


# ------------------------------------------------------------------ a runner that only does the host part
class HostOnlyRunner:
    def __init__(self, width: int, batch: int, baseline: bool):
        stub = SimpleNamespace(device=torch.device("cpu"))
        self.graphs = DecodeGraphRunner(stub, None, width, (batch,), use_graphs=False)
        self.width, self.baseline = width, baseline
        self.old_stage = (torch.zeros(3, batch, dtype=torch.int64), torch.zeros(batch, dtype=torch.int32),
                          torch.zeros(batch, width, dtype=torch.int32))
        self.times: dict[str, list[float]] = {"old": [], "new": []}
        self.rng = np.random.default_rng(0)

    def launch(self, out, prev=None, after_layer=None) -> LaunchedStep:
        b = bucket_for(len(out.chunks), self.graphs.buckets)
        first = self.baseline and len(self.times["new"]) % 2 == 0    # alternate the order
        for kind in (("old", "new") if first else ("new", "old")):
            if kind == "old" and not self.baseline:
                continue
            t = time.perf_counter()
            if kind == "new":
                self.graphs.stage(build_decode_inputs(out, BS, token_gather(out, prev)), b)
            else:
                old = old_pad_and_stage(old_build(out, BS), b, self.width, *self.old_stage)
            self.times[kind].append(time.perf_counter() - t)
        if self.baseline:   # the same table either way (entries past a row's length are never read)
            new = self.graphs._h_tables.numpy()
            assert all((new[i, :len(c.request.blocks)] == old[i, :len(c.request.blocks)]).all()
                       for i, c in enumerate(out.chunks))
        reqs = [c.request for c in out.chunks]
        greedy = torch.from_numpy(self.rng.integers(2, 30000, len(reqs)))
        return LaunchedStep(out, reqs, greedy, greedy, HostCopy(greedy))

    def collect(self, step: LaunchedStep) -> dict[str, int]:
        return {r.request_id: t for r, t in zip(step.reqs, step.host.tolist())}

    def execute(self, out, after_layer=None) -> dict[str, int]:
        return self.collect(self.launch(out))


def run(batch: int, blocks: int, width: int, steps: int, overlap: bool, turnover: bool) -> dict:
    pool = BlockPool(batch * (blocks + 2) + blocks + 8, BS, enable_prefix_caching=False)
    sched = Scheduler(SchedulerConfig(max_num_seqs=batch, max_num_batched_tokens=max(batch, 16)), pool, 1 << 20)
    runner = HostOnlyRunner(width, batch, baseline=not overlap)
    pipe = StepPipeline(sched, runner, overlap)
    ids = iter(range(1 << 30))
    rng = np.random.default_rng(1)

    def join():
        i = next(ids)
        ctx = blocks * BS - steps // 2 - BS + i % BS   # ~`blocks` blocks mid-run; one row in 16 gains one a step
        req = Request(f"r{i}", rng.integers(2, 30000, ctx).tolist(), SamplingParams(max_tokens=10 * steps))
        sched.reserve_remote(req)
        sched.commit_remote(req.request_id, 5)
    for _ in range(batch):
        join()
    for _ in range(steps):
        if turnover:
            sched.abort_request(sched.running[0].request_id)
            join()
        done = pipe.step()
        sched.update_from_output(*done)
    out = {k: statistics.median(v) * 1e3 for k, v in runner.times.items() if v}
    out["steps_run_behind"] = pipe.num_run_behind
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--widths", default="tight,2052", help="'tight': just enough for the contexts")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see the docstring)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    print(f"host work of a decode step's inputs, B={a.batch} x {a.blocks} blocks of {BS} tokens, "
          f"median of {a.steps} steps, ms")
    print("| width | batch | before (sync) | now (sync) | now (overlapped) |\n|---:|---|---:|---:|---:|")
    tight = a.blocks + -(-a.steps // (2 * BS)) + 1
    for width in (tight if w == "tight" else int(w) for w in a.widths.split(",")):
        for turnover in (False, True):
            sync = run(a.batch, a.blocks, width, a.steps, False, turnover)
            ov = run(a.batch, a.blocks, width, a.steps, True, turnover)
            assert ov["steps_run_behind"] > 0
            rows.append({"width": width, "turnover": turnover, "before_ms": sync["old"], "now_sync_ms": sync["new"],
                         "now_overlapped_ms": ov["new"]})
            print(f"| {width} | {'turnover' if turnover else 'steady'} | {sync['old']:.3f} | {sync['new']:.3f} | "
                  f"{ov['new']:.3f} |", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
