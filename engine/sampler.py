"""Sampling: greedy, temperature, top-k, top-p, with a per-request generator.

A request with a seed owns a torch.Generator seeded once, so its tokens do not depend on which
other requests share the batch. Greedy rows are one batched argmax.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

from .request import SamplingParams


class HostCopy:
    """A device tensor's copy to the host, enqueued now and read later (overlapped decode reads a
    step's tokens after launching the next step). On CUDA the copy goes to pinned memory
    without blocking the host, and an event recorded behind it marks it (and everything enqueued
    before it on the stream) done."""

    def __init__(self, t: torch.Tensor):
        self._event = None
        if t.is_cuda:
            self._host = t.to("cpu", non_blocking=True)    # pinned destination: an asynchronous copy
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = t

    def wait(self) -> None:
        """Wait until the copy (and all work enqueued before it) is done, with the GIL released:
        a decode loop that blocked in a copy with the GIL held would starve the worker's other
        threads (the KV-transfer agent got the GIL about once per step: 0.4-1 s per transfer on
        an H200, measured)."""
        if self._event is not None:
            self._event.synchronize()

    def tolist(self) -> list:
        self.wait()
        return self._host.tolist()


def host_list(t: torch.Tensor) -> list:
    """t.tolist(), waiting for the GPU with the GIL released first (see HostCopy.wait)."""
    return HostCopy(t).tolist()



def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [V] (already temperature-scaled) -> logits with excluded tokens at -inf.

    top-k keeps the k largest; top-p keeps the smallest set of most likely tokens whose
    probability mass reaches top_p (the token that crosses the threshold is kept)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class Sampler:
    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._generators: dict[str, torch.Generator] = {}

    def _generator(self, request_id: str, seed: int | None) -> torch.Generator:
        g = self._generators.get(request_id)
        if g is None:
            g = torch.Generator(device=self.device)
            g.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
            self._generators[request_id] = g
        return g

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def sample(self, logits: torch.Tensor, request_ids: Sequence[str],
               params: Sequence[SamplingParams]) -> list[int]:
        """logits: [N, V] (float32, or the model dtype: a row sampled with temperature is cast
        to float32 first), one row per request -> N token ids."""
        greedy = logits.argmax(dim=-1)
        out = host_list(greedy)
        for row, (rid, p) in enumerate(zip(request_ids, params)):
            if p.greedy:
                continue
            scaled = filter_top_k_top_p(logits[row].float() / p.temperature, p.top_k, p.top_p)
            probs = torch.softmax(scaled, dim=-1)
            out[row] = int(torch.multinomial(probs, 1, generator=self._generator(rid, p.seed)).item())
        return out
