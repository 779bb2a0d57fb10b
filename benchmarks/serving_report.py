"""The serving benchmark's printed tables: the workload, and where each system's CPU time went."""

from __future__ import annotations

import argparse
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from benchmarks.report import table
from benchmarks.serving_metrics import Summary
from benchmarks.serving_profile import ENGINE, StepStats, Times
from benchmarks.serving_workload import Schedule, Target
from benchmarks.workload import percentile


@dataclass(frozen=True)
class Measured:
    """One run of one system: its figures, CPU and run-queue seconds by thread group (the client
    process included), and its engine steps."""

    summary: Summary
    threads: dict[str, Times]
    steps: StepStats


def print_workload(schedule: Schedule, args: argparse.Namespace, targets: list[Target]) -> None:
    reqs = schedule.requests
    span = reqs[-1].arrival_s
    rate = f"{len(reqs) / span:.1f} req/s realised" if span > 0 else "all at t=0"
    print(
        f"\n## Workload: {len(reqs)} requests, Poisson arrivals over {span:.1f}s ({rate}), seed {args.seed},"
        f" {'text' if args.text_prompts else 'token-id'} prompts, temperature {args.temperature:g},"
        " ignore_eos, streamed"
    )
    rows: list[list[object]] = []
    for name, values in (
        ("prompt tokens", [r.prompt_len for r in reqs]),
        ("output tokens", [r.output_len for r in reqs]),
    ):
        v = [float(x) for x in values]
        rows.append([name, statistics.mean(v), percentile(v, 50), percentile(v, 99), max(values)])
    print(table(["lengths (lognormal)", "mean", "p50", "p99", "max"], rows))
    counts = Counter(r.target for r in reqs)
    print(
        table(
            ["model", "tenant", "requests"],
            [[t.model, t.tenant or "-", counts[i]] for i, t in enumerate(targets)],
        )
    )


def _per_kilotoken(runs: list[Measured], value: Callable[[Measured], float]) -> float:
    return statistics.median(1000 * value(m) / m.summary.output_tokens for m in runs)


def print_profile(direct: list[Measured], http: list[Measured]) -> None:
    """CPU by thread, the engine thread's wall time split, and engine steps; medians over repeats."""
    zero = Times(0.0, 0.0)

    def cpu(group: str) -> Callable[[Measured], float]:
        return lambda m: m.threads.get(group, zero).cpu

    groups = sorted(
        {g for m in direct + http for g in m.threads}, key=lambda g: -_per_kilotoken(http, cpu(g))
    )
    rows: list[list[object]] = []
    for group in groups:
        d, h = _per_kilotoken(direct, cpu(group)), _per_kilotoken(http, cpu(group))
        if max(d, h) >= 1e-3:  # idle helper threads (tqdm, prefetch) only clutter the table
            rows.append([group, d, h, h - d])
    total_d = _per_kilotoken(direct, lambda m: sum(t.cpu for t in m.threads.values()))
    total_h = _per_kilotoken(http, lambda m: sum(t.cpu for t in m.threads.values()))
    rows.append(["total", total_d, total_h, total_h - total_d])
    print("\n## Where the time goes (median over repeats)")
    print(table(["CPU seconds per 1000 output tokens", "engine directly", "HTTP API", "HTTP - direct"], rows))

    def engine(m: Measured) -> Times:
        return m.threads.get(ENGINE, zero)

    split: list[tuple[str, Callable[[Measured], float]]] = [
        ("on a CPU", lambda m: engine(m).cpu),
        ("runnable, waiting for a CPU", lambda m: engine(m).wait),
        (
            "blocked: GIL, torch pool, idle",
            lambda m: m.summary.duration_s - engine(m).cpu - engine(m).wait,
        ),
        ("wall time inside engine steps", lambda m: m.steps.busy_fraction * m.summary.duration_s),
    ]
    print(
        table(
            ["engine thread, seconds per 1000 output tokens", "engine directly", "HTTP API", "HTTP - direct"],
            [
                [name, d := _per_kilotoken(direct, f), h := _per_kilotoken(http, f), h - d]
                for name, f in split
            ],
        )
    )

    def med(runs: list[Measured], attr: str) -> float:
        return statistics.median(float(getattr(m.steps, attr)) for m in runs)

    def util(runs: list[Measured]) -> float:
        return statistics.median(sum(t.cpu for t in m.threads.values()) / m.summary.duration_s for m in runs)

    step_rows: list[list[object]] = [
        [
            name,
            med(runs, "steps"),
            statistics.median(m.summary.output_tokens / max(1, m.steps.steps) for m in runs),
            med(runs, "step_ms_mean"),
            med(runs, "gap_ms_p50"),
            util(runs),
        ]
        for name, runs in (("engine directly", direct), ("HTTP API", http))
    ]
    print(
        table(
            [
                "system",
                "engine steps",
                "output tokens per step",
                "step ms mean",
                "gap between steps ms p50",
                "CPUs used (all threads + client)",
            ],
            step_rows,
        )
    )
