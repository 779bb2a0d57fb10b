"""Our engine under the two workloads: offline throughput, and a server-like stream for ITL."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from typing import NamedTuple

from tqdm import tqdm

from benchmarks.workload import BenchRequest, percentile
from runtime.engine import LLMEngine
from runtime.llm import LLM
from runtime.sampling_params import SamplingParams

WARMUP_PROMPT = list(range(10, 26))
# Progress bars redraw at most this often, so logs of non-interactive runs stay short.
PROGRESS_INTERVAL_S = 10.0


def greedy_params(output_len: int) -> SamplingParams:
    """Exactly `output_len` greedy tokens, whatever the model emits."""
    return SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)


class ThroughputResult(NamedTuple):
    """Wall time, tokens generated and each request's tokens, in request order."""

    seconds: float
    tokens: int
    token_ids: list[list[int]]


def run_offline_llm(llm: LLM, requests: Sequence[BenchRequest]) -> ThroughputResult:
    """All requests through `LLM.generate` at once (continuous batching does the rest).

    A two-request warm-up runs first, untimed, as for the transformers baseline.
    """
    llm.generate([WARMUP_PROMPT, WARMUP_PROMPT], greedy_params(4))
    prompts: list[str | list[int]] = [r.prompt for r in requests]
    params = [greedy_params(r.output_len) for r in requests]
    start = time.perf_counter()
    results = llm.generate(prompts, params, progress=True)
    seconds = time.perf_counter() - start
    token_ids = [r.token_ids for r in results]
    return ThroughputResult(seconds, sum(len(t) for t in token_ids), token_ids)


class StreamResult(NamedTuple):
    """Latency of one policy on the arrival stream; every time is in seconds."""

    policy: str
    itls: list[float]
    long_ttfts: list[float]
    seconds: float
    tokens: int
    steps: int

    @property
    def itl_p50(self) -> float:
        return percentile(self.itls, 50)

    @property
    def itl_p99(self) -> float:
        return percentile(self.itls, 99)


def run_stream(
    engine: LLMEngine, requests: Sequence[BenchRequest], policy: str, long_prompt_len: int
) -> StreamResult:
    """Serve `requests` as a server would: add each at the first step boundary after it arrives.

    Inter-token latency is the time between consecutive tokens of one request, each stamped with
    `time.perf_counter()` when the step that produced it returns. Requests with a prompt of at
    least `long_prompt_len` tokens also report their time to first token.
    """
    pending = deque(sorted(requests, key=lambda r: r.arrival_s))
    arrival: dict[str, float] = {}
    long_ids: set[str] = set()
    last_token: dict[str, float] = {}
    itls: list[float] = []
    long_ttfts: list[float] = []
    tokens = steps = 0
    total = sum(r.output_len for r in requests)
    start = time.perf_counter()
    with tqdm(total=total, desc=f"stream {policy}", unit="tok", mininterval=PROGRESS_INTERVAL_S) as bar:
        while pending or engine.has_unfinished_requests():
            now = time.perf_counter() - start
            while pending and pending[0].arrival_s <= now:
                req = pending.popleft()
                rid = f"stream-{len(arrival)}"
                engine.add_request(req.prompt, greedy_params(req.output_len), request_id=rid)
                # Latency counts from the scheduled arrival, not from when the loop noticed it.
                arrival[rid] = start + req.arrival_s
                if len(req.prompt) >= long_prompt_len:
                    long_ids.add(rid)
            if not engine.has_unfinished_requests():
                time.sleep(max(0.0, pending[0].arrival_s - now))
                continue
            outputs = engine.step()
            stamp = time.perf_counter()
            steps += 1
            for out in outputs:
                rid = out.request_id
                if rid in last_token:
                    itls.append(stamp - last_token[rid])
                elif rid in long_ids:
                    long_ttfts.append(stamp - arrival[rid])
                last_token[rid] = stamp
                tokens += len(out.new_token_ids)
            bar.update(len(outputs))
    return StreamResult(policy, itls, long_ttfts, time.perf_counter() - start, tokens, steps)
