"""EngineLoop: runs an LLMEngine's step loop on a background thread for a worker.

Workers (and the Ray actors wrapping them) call into the engine from several threads; every
engine call goes through `run(fn)` under one lock, and the loop thread steps whenever there is
work. Outputs are kept per request until a reader collects them (`take_outputs`).
With overlapped decode (engine/overlap.py) a step() returns while the next decode step still
runs on the device, so the RPCs served between steps overlap device work; has_unfinished()
stays true until that step is read, so the loop keeps stepping until it is.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

from .engine import LLMEngine, RequestOutput


class EngineLoop:
    def __init__(self, engine: LLMEngine, on_step: Callable[[list[RequestOutput]], None] | None = None):
        self.engine = engine
        self._lock = threading.RLock()
        self._work = threading.Condition(self._lock)
        self._outputs: list[RequestOutput] = []
        self._out_ready = threading.Condition(threading.Lock())
        self._on_step = on_step
        self._stop = False
        self.steps = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def run(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Call fn(engine) under the engine lock and wake the loop."""
        with self._work:
            result = fn(self.engine)
            self._work.notify()
            return result

    def _run(self) -> None:
        try:
            while not self._stop:
                with self._work:
                    while not self._stop and not self.engine.has_unfinished():
                        self._work.wait(0.5)
                    if self._stop:
                        return
                    outs = self.engine.step()
                    self.steps += 1
                if outs:
                    if self._on_step:
                        self._on_step(outs)
                    self.push_outputs(outs)
                time.sleep(0)      # let RPC threads take the lock between steps
        except BaseException as exc:   # surfaced by take_outputs and health checks
            self.error = exc
            with self._out_ready:
                self._out_ready.notify_all()
            raise

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
