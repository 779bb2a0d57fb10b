"""Per-request timings of a serving run, and the figures computed from them.

TTFT is from sending the request to its first token; TPOT is the mean time per output token after
the first, (end - first token) / (tokens - 1); inter-token latency (ITL) is every gap between two
consecutive token arrivals, pooled over all requests. Goodput follows DistServe (Zhong et al., 2024):
the requests that meet both the TTFT and the TPOT objective, as a fraction and per second.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.workload import percentile


@dataclass
class RequestRecord:
    """What one request did, in seconds since the run started; `token_times` holds one entry per
    streamed chunk that carried output."""

    index: int
    target: int
    prompt_len: int
    sent_s: float = 0.0
    token_times: list[float] = field(default_factory=list)
    end_s: float = 0.0
    output_tokens: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.output_tokens > 0 and bool(self.token_times)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.sent_s

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.end_s - self.token_times[0]) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.token_times)]


@dataclass(frozen=True)
class RunResult:
    """One run: every request's record, the wall time from the first send to the last completion,
    and the CPU seconds the client itself used meanwhile (when it measured them)."""

    records: list[RequestRecord]
    duration_s: float
    client_cpu_s: float = 0.0

    def save(self, path: Path) -> None:
        path.write_text(
            json.dumps(
                {
                    "duration_s": self.duration_s,
                    "client_cpu_s": self.client_cpu_s,
                    "records": [asdict(r) for r in self.records],
                }
            )
        )

    @classmethod
    def load(cls, path: Path) -> RunResult:
        raw = json.loads(path.read_text())
        records = [RequestRecord(**r) for r in raw["records"]]
        return cls(records, float(raw["duration_s"]), float(raw["client_cpu_s"]))


@dataclass(frozen=True)
class SLO:
    """Latency objectives a request must meet, in seconds, to count towards goodput."""

    ttft_s: float
    tpot_s: float

    def met(self, record: RequestRecord) -> bool:
        tpot = record.tpot
        return record.ok and record.ttft <= self.ttft_s and (tpot is None or tpot <= self.tpot_s)


@dataclass(frozen=True)
class Summary:
    """A run's figures; latencies in seconds."""

    system: str
    completed: int
    failed: int
    duration_s: float
    output_tokens: int
    ttft_p50: float
    ttft_p99: float
    tpot_p50: float
    tpot_p99: float
    itl_p50: float
    itl_p99: float
    goodput_fraction: float
    goodput_rps: float

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.duration_s

    @property
    def requests_per_s(self) -> float:
        return self.completed / self.duration_s


def summarize(system: str, records: list[RequestRecord], duration_s: float, slo: SLO) -> Summary:
    """The figures of one run; raises if no request completed."""
    done = [r for r in records if r.ok]
    if not done:
        errors = sorted({r.error for r in records if r.error})[:3]
        raise RuntimeError(f"{system}: no request completed (errors: {errors})")
    ttfts = [r.ttft for r in done]
    tpots = [t for r in done if (t := r.tpot) is not None] or [0.0]
    itls = [gap for r in done for gap in r.itls] or [0.0]
    good = sum(slo.met(r) for r in done)
    return Summary(
        system=system,
        completed=len(done),
        failed=len(records) - len(done),
        duration_s=duration_s,
        output_tokens=sum(r.output_tokens for r in done),
        ttft_p50=percentile(ttfts, 50),
        ttft_p99=percentile(ttfts, 99),
        tpot_p50=percentile(tpots, 50),
        tpot_p99=percentile(tpots, 99),
        itl_p50=percentile(itls, 50),
        itl_p99=percentile(itls, 99),
        goodput_fraction=good / len(records),
        goodput_rps=good / duration_s,
    )


SUMMARY_HEADERS = [
    "system",
    "ok/failed",
    "TTFT p50 ms",
    "TTFT p99 ms",
    "TPOT p50 ms",
    "TPOT p99 ms",
    "ITL p50 ms",
    "ITL p99 ms",
    "out tok/s",
    "req/s",
    "goodput",
    "goodput req/s",
]


def summary_row(s: Summary) -> list[object]:
    return [
        s.system,
        f"{s.completed}/{s.failed}",
        1000 * s.ttft_p50,
        1000 * s.ttft_p99,
        1000 * s.tpot_p50,
        1000 * s.tpot_p99,
        1000 * s.itl_p50,
        1000 * s.itl_p99,
        s.tokens_per_s,
        s.requests_per_s,
        f"{100 * s.goodput_fraction:.0f}%",
        s.goodput_rps,
    ]
