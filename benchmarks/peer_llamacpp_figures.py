"""The llama.cpp side-by-side benchmark's workload and figures, kept apart from the servers so they can be tested.

Every scenario sends N streams at once (closed: all at t=0), each with its own window of real text as
token ids, asking for exactly `max_tokens` greedy tokens (`ignore_eos`, which both servers honour).
Single stream: decode tok/s is 1 / TPOT (the time per token after the first, without the prompt).
N streams: aggregate output tok/s from the first send to the last token. TTFT p50/p99 per run. Each
figure is a median over the repeats.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.serving_metrics import SLO, RequestRecord, RunResult, summarize
from benchmarks.serving_workload import Schedule, ServingRequest, Target

SCENARIOS = (1, 16, 64)
# Goodput is not reported here; summarize() wants objectives.
_NO_SLO = SLO(ttft_s=float("inf"), tpot_s=float("inf"))


@dataclass(frozen=True)
class Plan:
    """Prompt and output lengths (tokens) and repeats of one mode."""

    prompt_len: int
    max_tokens: int
    repeats: int


FULL = Plan(prompt_len=128, max_tokens=128, repeats=3)
QUICK = Plan(prompt_len=64, max_tokens=32, repeats=3)


def prompt_windows(ids: Sequence[int], prompt_len: int, count: int, start: int) -> list[list[int]]:
    """`count` prompts of `prompt_len` consecutive ids, the k-th from window `start + k` of `ids`.

    Windows do not overlap until the text runs out; after a wrap each later pass is shifted by one
    token more, so a prompt repeats only after len(ids) passes (no prefix-cache hit across runs).
    """
    if prompt_len < 1 or len(ids) < 2 * prompt_len:
        raise ValueError(f"need at least {2 * prompt_len} ids of text for prompts of {prompt_len}")
    per_pass = len(ids) // prompt_len
    prompts = []
    for k in range(start, start + count):
        passes, window = divmod(k, per_pass)
        offset = (window * prompt_len + passes) % (len(ids) - prompt_len)
        prompts.append(list(ids[offset : offset + prompt_len]))
    return prompts


def burst(target: Target, prompts: list[list[int]], max_tokens: int) -> Schedule:
    """All prompts sent at once to one target."""
    requests = [ServingRequest(i, 0.0, 0, p, "", max_tokens) for i, p in enumerate(prompts)]
    return Schedule([target], requests)


@dataclass(frozen=True)
class RunFigures:
    """One run of one scenario on one system."""

    decode_tok_s: float  # single stream: 1 / TPOT
    aggregate_tok_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    failed: int


def wrong_length(records: list[RequestRecord], max_tokens: int) -> list[RequestRecord]:
    """Requests that ended with an error or with a length other than the one asked for (every stream
    must decode exactly max_tokens for the systems to do the same work)."""
    return [r for r in records if not r.ok or r.output_tokens != max_tokens]


def run_figures(run: RunResult, max_tokens: int) -> RunFigures:
    bad = {id(r) for r in wrong_length(run.records, max_tokens)}
    good = [r for r in run.records if id(r) not in bad]
    if not good:
        seen = sorted({r.error or f"{r.output_tokens} tokens" for r in run.records})[:3]
        raise RuntimeError(f"no request returned {max_tokens} tokens (got: {seen})")
    summary = summarize("run", good, run.duration_s, _NO_SLO)
    tpot = summary.tpot_p50
    return RunFigures(
        decode_tok_s=1.0 / tpot if tpot > 0 else 0.0,
        aggregate_tok_s=summary.tokens_per_s,
        ttft_p50_s=summary.ttft_p50,
        ttft_p99_s=summary.ttft_p99,
        failed=len(bad),
    )


def median_figures(runs: list[RunFigures]) -> RunFigures:
    """Each figure's median over the repeats; failures are summed."""
    if not runs:
        raise ValueError("no runs to take the median of")

    def med(attr: str) -> float:
        return statistics.median(float(getattr(r, attr)) for r in runs)

    return RunFigures(
        decode_tok_s=med("decode_tok_s"),
        aggregate_tok_s=med("aggregate_tok_s"),
        ttft_p50_s=med("ttft_p50_s"),
        ttft_p99_s=med("ttft_p99_s"),
        failed=sum(r.failed for r in runs),
    )


def throughput(fig: RunFigures, streams: int) -> float:
    """The figure a scenario is judged on: decode tok/s for one stream, aggregate tok/s for more."""
    return fig.decode_tok_s if streams == 1 else fig.aggregate_tok_s


TABLE_HEADERS = [
    "system",
    "1 stream decode tok/s",
    "1 stream TTFT ms",
    "16 streams tok/s",
    "16: TTFT p50 ms",
    "16: TTFT p99 ms",
    "64 streams tok/s",
    "64: TTFT p50 ms",
    "64: TTFT p99 ms",
    "failed",
]


def table_row(system: str, figs: dict[int, RunFigures]) -> list[object]:
    one, c16, c64 = figs[1], figs[16], figs[64]
    return [
        system,
        one.decode_tok_s,
        1000 * one.ttft_p50_s,
        c16.aggregate_tok_s,
        1000 * c16.ttft_p50_s,
        1000 * c16.ttft_p99_s,
        c64.aggregate_tok_s,
        1000 * c64.ttft_p50_s,
        1000 * c64.ttft_p99_s,
        sum(f.failed for f in figs.values()),
    ]


def ratios(ours: dict[int, RunFigures], peer: dict[int, RunFigures]) -> dict[int, float]:
    """Ours over the peer, per scenario (above 1: ours is faster)."""
    out = {}
    for streams in SCENARIOS:
        theirs = throughput(peer[streams], streams)
        out[streams] = throughput(ours[streams], streams) / theirs if theirs > 0 else float("nan")
    return out


def headline(r: dict[int, float]) -> str:
    return f"headline: single_vs_llamacpp={r[1]:.2f} c16_vs_llamacpp={r[16]:.2f} c64_vs_llamacpp={r[64]:.2f}"
