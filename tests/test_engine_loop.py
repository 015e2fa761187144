"""EngineLoop (engine/loop.py): calls from other threads run at the next step boundary.

A busy decode worker steps back to back; the router's start_remote/commit_remote and the
snapshot polls must not wait behind more than the step in progress. The real SmolLM2 engine on
CPU decodes while three threads keep calling in.
"""
from __future__ import annotations

import threading
import time

import pytest

from splitserve.engine.request import SamplingParams

from .conftest import make_engine


@pytest.fixture(scope="module")
def engine():
    return make_engine(scheduler={"overlap_decode": True})


def test_calls_wait_at_most_the_step_in_progress(engine):
    from splitserve.engine.loop import EngineLoop
    loop = EngineLoop(engine)
    waited: list[int] = []            # steps completed while a call waited for the loop
    errors: list[BaseException] = []
    stop = threading.Event()

    def caller() -> None:
        try:
            while not stop.is_set():
                before = loop.steps
                waited.append(loop.run(lambda e: loop.steps) - before)
                time.sleep(0.001)
        except BaseException as exc:
            errors.append(exc)
    try:
        for i in range(4):
            loop.run(lambda e, i=i: e.add_request([1, 2, 3, 4 + i] * 8, SamplingParams(max_tokens=60, ignore_eos=True),
                                                  request_id=f"busy{i}"))
        threads = [threading.Thread(target=caller) for _ in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while loop.run(lambda e: e.has_unfinished()) and time.monotonic() < deadline:
            time.sleep(0.005)
        stop.set()
        for t in threads:
            t.join(10)
    finally:
        stop.set()
        loop.stop()
    assert not errors, errors
    assert loop.steps >= 60 and len(waited) >= 30, (loop.steps, len(waited))
    # a call queued during a step runs when that step ends: no call sees two steps go by
    assert max(waited) <= 1, sorted(waited)[-10:]


def test_errors_reach_the_caller_and_calls_after_stop_run_inline(engine):
    from splitserve.engine.loop import EngineLoop
    loop = EngineLoop(engine)
    try:
        with pytest.raises(KeyError, match="nope"):
            loop.run(lambda e: {}["nope"])
        assert loop.run(lambda e: threading.current_thread().name) == "engine-loop"
    finally:
        loop.stop()
    assert loop.run(lambda e: threading.current_thread().name) == threading.current_thread().name
    assert loop.run(lambda e: e.has_unfinished()) is False
