"""Where a serving run's time goes: CPU and run-queue time per thread, and the engine's steps.

Per-thread figures come from /proc/self/task/<tid>/schedstat (Linux): nanoseconds on a CPU, and
nanoseconds runnable but waiting for one (CPU contention). Threads are named through Python's
`threading` registry; threads Python does not know (torch's intra-op pool) are grouped together.
A thread's wall time that is in neither is time blocked: sleeping, waiting on a lock such as the
GIL, or waiting for torch's pool to finish its share of an operation.

Step times come from a timing wrapper put on the engine instance (nothing in runtime/ is changed):
the time inside `LLMEngine.step`, and the gap between two steps, where the engine thread hands each
output to the event loop and takes new commands.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from runtime.async_engine import AsyncLLMEngine
from runtime.outputs import RequestOutput

ENGINE, LOOP = "engine thread", "server event loop"
GROUPS = {"blockzoo-engine": ENGINE, "bench-uvicorn": LOOP, "MainThread": "benchmark main thread"}
ANYIO_PREFIX = "AnyIO worker"
POOL = "threadpool (auth, DB)"
OTHER = "non-Python threads (torch pool)"
EXITED = "threads that exited (retired threadpool workers)"


class Times(NamedTuple):
    """Seconds on a CPU, and seconds runnable but waiting for one."""

    cpu: float
    wait: float


def _task_times(tid: int) -> Times:
    try:
        fields = Path(f"/proc/self/task/{tid}/schedstat").read_text().split()
    except OSError:  # the thread ended
        return Times(0.0, 0.0)
    return Times(int(fields[0]) / 1e9, int(fields[1]) / 1e9)


def _group(name: str | None) -> str:
    if name is None:
        return OTHER
    if name.startswith(ANYIO_PREFIX):
        return POOL
    return GROUPS.get(name, f"thread {name}")


@dataclass(frozen=True)
class Snapshot:
    """Each live thread's group and times, and the whole process's CPU seconds (which, unlike a
    thread's own figures, keep the CPU of threads that have exited)."""

    threads: dict[int, tuple[str, Times]]
    process_cpu: float


def snapshot() -> Snapshot:
    names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    threads = {}
    for entry in os.listdir("/proc/self/task"):
        tid = int(entry)
        threads[tid] = (_group(names.get(tid)), _task_times(tid))
    t = os.times()
    return Snapshot(threads, t.user + t.system)


def times_by_group(before: Snapshot, after: Snapshot) -> dict[str, Times]:
    """What each group of threads used between the two snapshots. Threads that exited meanwhile
    (idle threadpool workers are retired after a few seconds) are the process's CPU not accounted
    for by a live thread."""
    zero = Times(0.0, 0.0)
    out: dict[str, Times] = {}
    for tid, (group, now) in after.threads.items():
        then = before.threads.get(tid, (group, zero))[1]
        cpu, wait = out.get(group, zero)
        out[group] = Times(cpu + max(0.0, now.cpu - then.cpu), wait + max(0.0, now.wait - then.wait))
    live = sum(t.cpu for t in out.values())
    out[EXITED] = Times(max(0.0, after.process_cpu - before.process_cpu - live), 0.0)
    return out


@dataclass
class StepTimer:
    """Start and end times of every engine step since it was installed."""

    starts: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)

    def install(self, engine: AsyncLLMEngine) -> None:
        inner: Callable[[], list[RequestOutput]] = engine.engine.step

        def timed_step() -> list[RequestOutput]:
            start = time.perf_counter()
            try:
                return inner()
            finally:
                self.starts.append(start)
                self.ends.append(time.perf_counter())

        # An instance attribute shadows the method for the engine thread's next call.
        setattr(engine.engine, "step", timed_step)  # noqa: B010

    def mark(self) -> int:
        return len(self.ends)


@dataclass(frozen=True)
class StepStats:
    """Engine steps of one run: how many, their mean duration, the median gap between two steps,
    and the fraction of the run's wall time spent inside steps."""

    steps: int
    step_ms_mean: float
    gap_ms_p50: float
    busy_fraction: float


def step_stats(timer: StepTimer, first: int, duration_s: float) -> StepStats:
    # Both lists are appended by the engine thread, end last; read up to the shorter one.
    n = min(len(timer.starts), len(timer.ends))
    starts, ends = timer.starts[first:n], timer.ends[first:n]
    if not starts:
        return StepStats(0, 0.0, 0.0, 0.0)
    durations = [e - s for s, e in zip(starts, ends, strict=True)]
    gaps = [s - e for e, s in zip(ends, starts[1:], strict=False)] or [0.0]
    return StepStats(
        steps=len(starts),
        step_ms_mean=1000 * statistics.fmean(durations),
        gap_ms_p50=1000 * statistics.median(gaps),
        busy_fraction=sum(durations) / duration_s,
    )
