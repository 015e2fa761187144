"""Host wall-clock timer shared by the benchmarks (no imports with side effects)."""
from __future__ import annotations

import statistics
import time


def timed(fn, reps: int, warmup: int = 2) -> float:
    """Median wall seconds of fn() over `reps` calls after `warmup` (fn must end with a host sync)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)
