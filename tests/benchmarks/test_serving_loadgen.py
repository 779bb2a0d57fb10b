"""The serving benchmark's pieces: schedules, SSE parsing, the raw HTTP client, and the figures."""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import math
import statistics
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from benchmarks.loadgen import SSEEvents, httpx_stream, request_body
from benchmarks.raw_http import HTTPStatusError, post_stream
from benchmarks.serving_metrics import SLO, RequestRecord, summarize
from benchmarks.serving_workload import Target, WorkloadSpec, build_schedule, lognormal

TARGETS = [Target("m1", "k1", "t1"), Target("m2", "k2", "t2"), Target("m3", "k3", "t1")]


def spec(**overrides: object) -> WorkloadSpec:
    base: dict[str, object] = {
        "num_requests": 400,
        "rate": 20.0,
        "prompt": lognormal(32, 1.0, 6.0),
        "output": lognormal(64, 0.8, 4.0),
        "seed": 3,
    }
    return WorkloadSpec(**(base | overrides))  # type: ignore[arg-type]


def test_schedule_is_reproducible_and_poisson() -> None:
    a, b = build_schedule(spec(), TARGETS), build_schedule(spec(), TARGETS)
    assert a == b
    assert build_schedule(spec(seed=4), TARGETS) != a
    arrivals = [r.arrival_s for r in a.requests]
    assert arrivals == sorted(arrivals) and arrivals[0] == 0.0
    gaps = [y - x for x, y in itertools.pairwise(arrivals)]
    # Exponential gaps: mean 1/rate and standard deviation equal to the mean (within sampling noise).
    assert statistics.mean(gaps) == pytest.approx(1 / 20, rel=0.15)
    assert statistics.stdev(gaps) == pytest.approx(statistics.mean(gaps), rel=0.2)
    assert {r.target for r in a.requests} == {0, 1, 2}
    assert all(8 <= t < 512 for r in a.requests for t in r.prompt_ids)
    assert all(4 <= r.output_len <= 256 and r.prompt_len == len(r.prompt_ids) for r in a.requests)


def test_infinite_rate_sends_everything_at_once_and_text_prompts() -> None:
    sched = build_schedule(spec(rate=math.inf, text_prompts=True, num_requests=10), TARGETS)
    assert all(r.arrival_s == 0.0 for r in sched.requests)
    assert all(not r.prompt_ids and len(r.prompt_text.split()) == r.prompt_len for r in sched.requests)


def test_schedule_round_trips_through_json(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    sched = build_schedule(spec(num_requests=5), TARGETS)
    sched.save(path)
    assert type(sched).load(path) == sched


def test_sse_events_split_anywhere() -> None:
    stream = (
        b'data: {"choices":[{"text":"a"}],"usage":null}\n\n'
        b'data: {"choices":[{"text":"b"}],"usage":null}\r\n\r\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":7}}\n\n'
        b"data: [DONE]\n\n"
    )
    for cut in range(1, len(stream)):
        events = SSEEvents()
        events.feed(stream[:cut], 1.0)
        events.feed(stream[cut:], 2.0)
        assert len(events.token_times) == 2
        assert events.usage_tokens == 7 and events.done


def test_request_body_asks_for_exact_lengths() -> None:
    req = build_schedule(spec(num_requests=1), TARGETS).requests[0]
    body = request_body(req, "m1", 0.0)
    assert body["max_tokens"] == req.output_len and body["ignore_eos"] is True
    assert body["stream"] is True and body["prompt"] == req.prompt_ids


def test_figures_from_records() -> None:
    # Request 0: sent at 0, tokens at 0.5, 0.6, 0.8 -> TTFT 0.5, TPOT (0.8-0.5)/2, ITLs 0.1 and 0.2.
    fast = RequestRecord(0, 0, 10, sent_s=0.0, token_times=[0.5, 0.6, 0.8], end_s=0.8, output_tokens=3)
    # Request 1: TTFT 2.0: misses a 1 s TTFT objective.
    slow = RequestRecord(1, 1, 10, sent_s=1.0, token_times=[3.0, 3.1], end_s=3.1, output_tokens=2)
    failed = RequestRecord(2, 0, 10, sent_s=1.0, end_s=1.1, error="HTTP 500: boom")
    s = summarize("x", [fast, slow, failed], duration_s=4.0, slo=SLO(ttft_s=1.0, tpot_s=0.2))
    assert (s.completed, s.failed, s.output_tokens) == (2, 1, 5)
    assert fast.tpot == pytest.approx(0.15) and slow.tpot == pytest.approx(0.1)
    assert s.ttft_p50 == pytest.approx(1.25)
    assert s.tokens_per_s == pytest.approx(5 / 4) and s.requests_per_s == pytest.approx(2 / 4)
    assert s.goodput_fraction == pytest.approx(1 / 3) and s.goodput_rps == pytest.approx(1 / 4)
    assert sorted(fast.itls + slow.itls) == pytest.approx([0.1, 0.1, 0.2])


@asynccontextmanager
async def sse_server(status: int = 200) -> AsyncIterator[str]:
    """A real HTTP/1.1 server on a free port that streams three chunked SSE events."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(
            next(ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")).split(b":")[1]
        )
        body = json.loads(await reader.readexactly(length))
        if status != 200:
            msg = b'{"error":"nope"}'
            writer.write(b"HTTP/1.1 %d Bad\r\nContent-Length: %d\r\n\r\n%s" % (status, len(msg), msg))
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for i in range(body["max_tokens"]):
                event = b'data: {"choices":[{"text":"%d"}]}\n\n' % i
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await writer.drain()
            done = b"data: [DONE]\n\n"
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1/completions"
    finally:
        server.close()
        await server.wait_closed()


async def test_raw_and_httpx_clients_read_the_same_stream() -> None:
    body = json.dumps({"max_tokens": 5}).encode()
    async with sse_server() as url, httpx.AsyncClient() as client:
        for post in (post_stream, httpx_stream(client)):
            events = SSEEvents()
            await post(url, {"Authorization": "Bearer k"}, body, functools.partial(events.feed, now=0.0))
            assert len(events.token_times) == 5 and events.done


async def test_raw_client_reports_http_errors() -> None:
    async with sse_server(status=429) as url:
        with pytest.raises(HTTPStatusError, match="429"):
            await post_stream(url, {}, b"{}", lambda raw: None)
