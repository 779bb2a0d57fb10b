"""Timing a call the same way in every micro-benchmark: the median over rounds of the mean per call."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def time_call(fn: Callable[[], object], calls: int, rounds: int = 5) -> float:
    """Median over `rounds` of the mean seconds per call of `fn` (`calls` calls per round)."""
    fn()
    per_call = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - start) / calls)
    return statistics.median(per_call)


def calls_for(fn: Callable[[], object], seconds: float) -> int:
    """How many calls of `fn` take about `seconds` (at least 2), from one timed call."""
    start = time.perf_counter()
    fn()
    return max(2, int(seconds / max(time.perf_counter() - start, 1e-9)))
