"""Overlapped decode: launch step N+1 before reading step N's tokens, so the device does not idle
while the host reads tokens, updates requests, detokenizes and schedules.

Order of one `StepPipeline.step()` (one `LLMEngine.step()`), with step N in flight:
    1. schedule N+1 and launch it (its input ids that N sampled are gathered on the device from
       N's token output; the host never sees them first)            -- only if `_may_run_behind`
    2. read N's tokens (waits for N only: N+1 keeps the device busy)
    3. the engine appends them, finishes what stopped, detokenizes     -- while N+1 runs
With nothing in flight the step is scheduled as usual; a decode step that qualifies is launched
and, when the next one qualifies too, the next one is launched behind it before reading it.

What runs behind an unread step (else the step is synchronous, exactly as before):
  * step N+1 is one token for every running request (bar those N finishes by count, below)
    and nothing else (no prefill chunk, admission or preemption: Scheduler.next_step_is_decode),
    so each of its requests is one of N's (input id from the device) or has its token on the
    host (e.g. it joined by commit_remote);
  * every row is greedy (sampling with temperature reads logits on the host, a sync anyway);
  * no step_hook (a prefill worker pushes KV layer by layer from its steps);
  * scheduler.overlap_decode is on.
A waiting request that could be admitted, a prefill chunk, a blocked allocation or a sampled
row stops the run-ahead: N is read without launching anything, and the next call schedules
with every token known. The device then idles for that one gap, as every step did before.

Exactness: N+1 is scheduled as if N's requests all continue, except those whose token in N is
their last by count (max_tokens, model length: `Request.finishes_in_flight`), which get no row.
One that N finishes otherwise (eos, stop token or string) or that is aborted between steps
still has a row in N+1: update_from_output drops that row's token, so it is never emitted.
That row is wasted work, and the blocks its request freed are reused only after N+1 is done:
by the engine's own later steps in stream order (one CUDA stream: a step that writes a reused
block is enqueued after N+1), by anything outside that stream (the transfer agent, via
reserve_remote) only after `wait_device()`. Counters make the early schedule exact:
Scheduler.mark_in_flight counts N's tokens as computed (+ one to come) until
update_from_output; blocks are cached only up to num_computed_tokens, i.e. from tokens known on
the host. What differs from the synchronous engine is scheduling only: the seat and blocks of a
request that N finishes by eos/stop return one step later, so an admission (and with a full
pool, which block the prefix cache evicts) can come one step later, and its wasted row can put
N+1 in the next graph bucket. Tokens are then equal as far as a row's result does not depend on
its batch neighbours -- the property any change of batch composition already relies on.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from .scheduler import Scheduler, SchedulerOutput

if TYPE_CHECKING:   # plain Python like the scheduler: the runner is the only torch here
    from .model_runner import LaunchedStep, ModelRunner


class ReadStep(NamedTuple):
    """A step whose tokens were read: what Scheduler.update_from_output takes."""
    sched: SchedulerOutput
    sampled: dict[str, int]       # request id -> token


class StepPipeline:
    """Keeps at most one launched, unread decode step (`in_flight`) between engine steps."""

    def __init__(self, scheduler: Scheduler, runner: ModelRunner, enabled: bool):
        self.scheduler = scheduler
        self.runner = runner
        self.enabled = enabled
        self.in_flight: LaunchedStep | None = None
        self.num_run_behind = 0      # steps launched before the previous step's tokens were read

    def step(self, step_hook=None) -> ReadStep | None:
        """Launch the next step (behind the one in flight when allowed) and read one step; None
        when nothing was scheduled."""
        prev = self.in_flight
        if prev is None:
            sched = self.scheduler.schedule()
            if sched.is_empty:
                return None
            if not self._may_run_behind(sched, step_hook):
                after_layer = step_hook(sched) if step_hook is not None else None
                return ReadStep(sched, self.runner.execute(sched, after_layer))
            prev = self._launch(sched, None)
        self.in_flight = None
        if self._may_run_behind(None, step_hook):
            self.in_flight = self._launch(self.scheduler.schedule(), prev)
            self.num_run_behind += 1
        return ReadStep(prev.sched, self.runner.collect(prev))

    def _may_run_behind(self, sched: SchedulerOutput | None, step_hook) -> bool:
        """May `sched` (None: the step the scheduler would make now) be launched with its tokens
        read later? Asked before scheduling when a step is in flight (see the module docstring)."""
        if not self.enabled or step_hook is not None:
            return False
        if sched is None:
            s = self.scheduler
            return s.next_step_is_decode() and all(r.params.greedy for r in s.running)
        return sched.is_decode and all(c.request.params.greedy for c in sched.chunks)

    def _launch(self, sched: SchedulerOutput, prev: LaunchedStep | None) -> LaunchedStep:
        self.scheduler.mark_in_flight(sched)      # raises unless sched is a decode step
        return self.runner.launch(sched, prev)

    def wait_device(self) -> None:
        """Block until the step in flight is done on the device (its tokens stay unread)."""
        if self.in_flight is not None:
            self.in_flight.wait()
