"""A request's state and its sampling parameters. Plain Python, no torch.

A request is accounted with counters, not phases: `num_computed_tokens` (tokens whose KV is in
the cache) catches up with `num_tokens` (prompt + generated). When they meet after a step, the
step's logits for the last token are sampled and one token is appended. With overlapped decode
(engine/overlap.py) a step can be launched before the previous one's token is read:
`num_inflight_tokens` counts such launched, unread decode steps; each will compute one token
and sample one more, which the host learns only when the step is read.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Sequence

from .block_pool import Block


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 1 = off
    seed: int | None = None           # per-request seed: same seed, same output
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()        # stop strings (not included in the output text)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError("stop strings must be non-empty strings")
        object.__setattr__(self, "stop", stops)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    TRANSFERRING = "transferring"    # decode side: blocks reserved, prompt KV arriving over the wire
    PREEMPTED = "preempted"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"          # eos, stop token or stop string
    LENGTH = "length"      # max_tokens or the model's length limit
    ABORT = "abort"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    arrival_time: float = 0.0
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0           # prompt tokens served by the prefix cache (last admission)
    blocks: list[Block] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    block_hashes: list[bytes] = field(default_factory=list)   # hashes of full blocks, computed lazily
    hold_blocks: bool = False        # prefill side: keep the KV blocks after finishing, for a push
    num_inflight_tokens: int = 0     # launched decode steps whose sampled token is not read yet
    # `blocks` only grows in place (extend) or is replaced by a new list; block_ids mirrors it
    _block_ids: list[int] = field(default_factory=list, init=False, repr=False)
    _block_ids_of: list[Block] | None = field(default=None, init=False, repr=False)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def token_id(self, pos: int) -> int:
        """The token at position `pos` (without building all_token_ids)."""
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[pos] if pos < n else self.output_token_ids[pos - n]

    @property
    def block_ids(self) -> list[int]:
        """Ids of `blocks`. The same list object for as long as `blocks` is, extended as it grows,
        so the decode graph runner rewrites a block-table row only where it changed."""
        if self._block_ids_of is not self.blocks or len(self._block_ids) > len(self.blocks):
            self._block_ids, self._block_ids_of = [], self.blocks
        ids = self._block_ids
        if len(ids) < len(self.blocks):
            ids.extend(b.block_id for b in self.blocks[len(ids):])
        return ids

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)

    def finishes_in_flight(self, max_model_len: int) -> bool:
        """Its in-flight tokens bring it to max_tokens or the model length: it finishes when they
        are read, so no step after them computes anything for it."""
        k = self.num_inflight_tokens
        return k > 0 and (len(self.output_token_ids) + k >= self.params.max_tokens
                          or self.num_tokens + k >= max_model_len)

    def check_stop(self, max_model_len: int) -> FinishReason | None:
        """Stop conditions that need no text: eos / stop tokens, max_tokens, model length."""
        if not self.output_token_ids:
            return None
        last = self.output_token_ids[-1]
        if last in self.params.stop_token_ids or (not self.params.ignore_eos and last in self.eos_token_ids):
            return FinishReason.STOP
        if len(self.output_token_ids) >= self.params.max_tokens or self.num_tokens >= max_model_len:
            return FinishReason.LENGTH
        return None


def validate_prompt(token_ids: Sequence[int], vocab_size: int, max_model_len: int) -> None:
    if not token_ids:
        raise ValueError("the prompt is empty")
    bad = [t for t in token_ids if not (0 <= int(t) < vocab_size)]
    if bad:
        raise ValueError(f"prompt token ids out of range [0, {vocab_size}): {bad[:5]}")
    if len(token_ids) >= max_model_len:
        raise ValueError(f"prompt has {len(token_ids)} tokens; the limit is {max_model_len - 1} "
                         f"(max_model_len {max_model_len} leaves room for one generated token)")


def find_stop(text: str, stops: tuple[str, ...], searched: int) -> int | None:
    """Index where the earliest stop string starts, looking only at text not yet sent."""
    best = None
    for s in stops:
        i = text.find(s, max(0, searched - len(s) + 1))
        if i != -1 and (best is None or i < best):
            best = i
    return best
