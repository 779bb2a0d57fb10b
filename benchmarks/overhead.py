"""Where a steady decode step's time goes: model forward (torch ops) versus Python around it.

The engine's own objects are wrapped with timers (instance attributes shadow the methods), and the
real `LLMEngine.step` runs unchanged, so the profile follows whatever the engine does.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, ParamSpec, TypeVar

from tqdm import tqdm

from benchmarks.engine_runs import greedy_params
from benchmarks.workload import BenchRequest
from runtime.engine import LLMEngine

P = ParamSpec("P")
R = TypeVar("R")

# Phases that are the model forward's torch ops; everything else is overhead around them.
MODEL_PHASES = ("embed + rotary tables", "decoder layers", "final norm + LM head")
PHASES = (
    "scheduler.schedule",
    "executor.prepare (inputs, slots)",
    *MODEL_PHASES,
    "executor glue",
    "scheduler.update_after_step",
    "sampler (argmax)",
    "output processing (detok, stop)",
    "engine.step glue",
)


class PhaseTimer:
    """Accumulates wall time per phase name for the current step."""

    def __init__(self) -> None:
        self.current: dict[str, float] = {}

    def wrap(self, name: str, fn: Callable[P, R]) -> Callable[P, R]:
        def timed(*args: P.args, **kwargs: P.kwargs) -> R:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[name] = self.current.get(name, 0.0) + time.perf_counter() - start

        return timed


class _TimedCallable:
    """Stands in for a callable object (the sampler), since `__call__` cannot be shadowed per instance."""

    def __init__(self, inner: Callable[..., Any], timer: PhaseTimer, name: str) -> None:
        self._call = timer.wrap(name, inner)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)


def instrument(engine: LLMEngine, timer: PhaseTimer) -> None:
    """Shadow the engine's phase methods with timed versions (this engine is for profiling only)."""
    sched, ex, chain = engine.scheduler, engine.executor, engine.executor.chain
    setattr(sched, "schedule", timer.wrap("schedule", sched.schedule))  # noqa: B010
    setattr(sched, "update_after_step", timer.wrap("update", sched.update_after_step))  # noqa: B010
    setattr(ex, "prepare", timer.wrap("prepare", ex.prepare))  # noqa: B010
    setattr(ex, "execute", timer.wrap("execute", ex.execute))  # noqa: B010
    setattr(chain.embed, "forward", timer.wrap("embed", chain.embed.forward))  # noqa: B010
    setattr(chain.rotary, "lookup", timer.wrap("rotary", chain.rotary.lookup))  # noqa: B010
    setattr(chain.head, "forward", timer.wrap("head", chain.head.forward))  # noqa: B010
    for layer in chain.layers:
        setattr(layer, "forward", timer.wrap("layers", layer.forward))  # noqa: B010
    engine.sampler = _TimedCallable(engine.sampler, timer, "sampler")  # type: ignore[assignment]
    setattr(engine.outputs, "process", timer.wrap("outputs", engine.outputs.process))  # noqa: B010


def _phases(raw: dict[str, float]) -> dict[str, float]:
    g = raw.get
    model = g("embed", 0.0) + g("rotary", 0.0) + g("layers", 0.0) + g("head", 0.0)
    executor_glue = g("execute", 0.0) - g("prepare", 0.0) - model
    named = g("schedule", 0.0) + g("execute", 0.0) + g("update", 0.0) + g("sampler", 0.0) + g("outputs", 0.0)
    return {
        "scheduler.schedule": g("schedule", 0.0),
        "executor.prepare (inputs, slots)": g("prepare", 0.0),
        "embed + rotary tables": g("embed", 0.0) + g("rotary", 0.0),
        "decoder layers": g("layers", 0.0),
        "final norm + LM head": g("head", 0.0),
        "executor glue": executor_glue,
        "scheduler.update_after_step": g("update", 0.0),
        "sampler (argmax)": g("sampler", 0.0),
        "output processing (detok, stop)": g("outputs", 0.0),
        "engine.step glue": g("step", 0.0) - named,
    }


class OverheadProfile(NamedTuple):
    """Median milliseconds per phase over the measured steps, and the median step time."""

    batch: int
    steps: int
    phase_ms: dict[str, float]
    step_ms: float

    @property
    def model_ms(self) -> float:
        return sum(self.phase_ms[p] for p in MODEL_PHASES)

    @property
    def overhead_ms(self) -> float:
        return sum(ms for p, ms in self.phase_ms.items() if p not in MODEL_PHASES)

    @property
    def overhead_fraction(self) -> float:
        return self.overhead_ms / (self.overhead_ms + self.model_ms)


def profile_decode(
    engine: LLMEngine, prompts: Sequence[BenchRequest], batch: int, steps: int, warmup: int = 3
) -> OverheadProfile:
    """Time `steps` decode steps with exactly `batch` running requests (all prompts already done)."""
    if len(prompts) < batch:
        raise ValueError(f"need {batch} prompts for a batch of {batch}, got {len(prompts)}")
    if engine.settings.max_num_seqs < batch:
        raise ValueError(f"max_num_seqs {engine.settings.max_num_seqs} is below the batch {batch}")
    # Early admissions decode while later prompts prefill (at most one step per request), so the
    # output budget covers those steps too: nobody may finish inside the measured window.
    budget = batch + warmup + steps + 2
    for req in prompts[:batch]:
        engine.add_request(req.prompt, greedy_params(budget))
    # Prefill until every request has sampled its first token; later steps are pure decodes.
    while len(engine.step()) < batch:
        pass
    for _ in range(warmup):
        engine.step()
    timer = PhaseTimer()
    instrument(engine, timer)
    timed_step = timer.wrap("step", engine.step)
    per_step: list[dict[str, float]] = []
    for _ in tqdm(range(steps), desc=f"decode steps at batch {batch}", unit="step"):
        timer.current = {}
        outputs = timed_step()
        if len(outputs) != batch:
            raise RuntimeError(f"decode step produced {len(outputs)} tokens, expected {batch}")
        per_step.append(_phases(timer.current) | {"step": timer.current["step"]})
    phase_ms = {p: 1000 * statistics.median(s[p] for s in per_step) for p in PHASES}
    step_ms = 1000 * statistics.median(s["step"] for s in per_step)
    return OverheadProfile(batch, steps, phase_ms, step_ms)
