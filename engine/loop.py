"""EngineLoop: runs an LLMEngine's step loop on a background thread for a worker.

Workers (and the Ray actors wrapping them) call into the engine from several threads. Every
engine call goes through `run(fn)`: the call joins the loop's call queue (`_calls`) and the loop
thread runs it at the next step boundary, so a caller waits at most the step in progress. (An
earlier version let callers race the stepping thread for one lock; on a busy decode worker a
handoff's start and commit could lose that race for several steps, adding 20-80 ms to TTFT.)
Calls made from the loop thread itself (step hooks) run at once. With overlapped decode
(engine/overlap.py) a step() returns while the next decode step still runs on the device, so
the queued calls run while the device works; has_unfinished() stays true until that step is
read, so the loop keeps stepping until it is.
"""
from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable

from .engine import LLMEngine, RequestOutput


class EngineLoop:
    def __init__(self, engine: LLMEngine, on_step: Callable[[list[RequestOutput]], None] | None = None):
        self.engine = engine
        self._engine_lock = threading.RLock()   # held by whoever touches the engine
        self._work = threading.Condition(threading.Lock())   # guards the call queue and the flags
        self._outputs: list[RequestOutput] = []
        self._out_ready = threading.Condition(threading.Lock())
        self._on_step = on_step
        self._stop = False
        self._closed = False          # the loop thread has ended: run() calls fn on the caller's thread
        self._calls: deque[tuple[Callable[[LLMEngine], Any], Future]] = deque()
        self.steps = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def run(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """fn(engine) on the loop thread at the next step boundary; its result (or exception)."""
        if threading.current_thread() is self._thread:
            return fn(self.engine)             # a step hook
        fut: Future | None = None
        with self._work:
            if not self._closed:
                fut = Future()
                self._calls.append((fn, fut))
                self._work.notify()
        if fut is None:
            with self._engine_lock:            # stopped or dead loop (an abort after a crash)
                return fn(self.engine)
        return fut.result()

    def _take_calls(self) -> list[tuple[Callable[[LLMEngine], Any], Future]]:
        with self._work:
            calls, self._calls = list(self._calls), deque()
            return calls

    def _drain(self, calls: list[tuple[Callable[[LLMEngine], Any], Future]]) -> None:
        """Run the queued calls, each result or exception to its caller (under the engine lock)."""
        for fn, fut in calls:
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(self.engine))
            except BaseException as exc:
                fut.set_exception(exc)

    def _run(self) -> None:
        try:
            while True:
                with self._work:   # has_unfinished changes only on this thread (calls run here)
                    while not self._stop and not self._calls and not self.engine.has_unfinished():
                        self._work.wait(0.5)
                    if self._stop:
                        return
                with self._engine_lock:
                    self._drain(self._take_calls())
                    outs = []
                    if self.engine.has_unfinished():
                        outs = self.engine.step()
                        self.steps += 1
                if outs:
                    if self._on_step:
                        self._on_step(outs)
                    self.push_outputs(outs)
        except BaseException as exc:   # surfaced by take_outputs and health checks
            self.error = exc
            with self._out_ready:
                self._out_ready.notify_all()
            raise
        finally:
            self._close()

    def _close(self) -> None:
        """From now on calls run on the caller's thread, and the queued ones run now, so no
        caller waits forever."""
        with self._work:
            self._closed = True
        with self._engine_lock:
            self._drain(self._take_calls())

    def push_outputs(self, outs: list[RequestOutput]) -> None:
        """Outputs produced outside a step (e.g. a request finished on commit)."""
        with self._out_ready:
            self._outputs.extend(outs)
            self._out_ready.notify_all()

    def take_outputs(self, timeout: float) -> list[RequestOutput]:
        """All outputs produced since the last call, waiting up to `timeout` for at least one."""
        with self._out_ready:
            if not self._outputs and self.error is None:
                self._out_ready.wait(timeout)
            if self.error is not None:
                raise RuntimeError(f"engine loop died: {self.error!r}")
            outs, self._outputs = self._outputs, []
            return outs

    def stop(self) -> None:
        with self._work:
            self._stop = True
            self._work.notify()
        self._thread.join(timeout=10)
