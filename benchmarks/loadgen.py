"""An open-loop load generator for any OpenAI-compatible server: streamed /v1/completions.

Requests are sent at their scheduled arrival times whether or not earlier ones have finished
(open loop, as real clients do); each is streamed (SSE) and the arrival time of every chunk that
carries output is recorded. `ignore_eos` goes in the body (a vLLM extension BlockZoo honours) so
every request generates exactly its sampled `max_tokens`.

Two clients: a minimal one on asyncio streams (plain http; the default, because on a small machine
every CPU cycle the client spends is one the server under test does not get) and httpx (https too).
serving.py runs this in a child process, so that the client does not compete with the server for
this process's GIL:

    python -m benchmarks.loadgen --base-url URL --schedule schedule.json --out records.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, Literal

import httpx

from benchmarks.raw_http import HTTPStatusError, post_stream
from benchmarks.serving_metrics import RequestRecord, RunResult
from benchmarks.serving_workload import Schedule, ServingRequest, Target

ClientKind = Literal["raw", "httpx"]


class SSEEvents:
    """A streamed completion's SSE events, taken apart cheaply: the client must not be what limits
    the measurement, so only the final usage chunk is parsed as JSON; every other `data:` event is
    one chunk of output, stamped with the time its bytes arrived."""

    def __init__(self) -> None:
        self.token_times: list[float] = []
        self.usage_tokens: int | None = None
        self.done = False
        self._buffer = b""

    def feed(self, raw: bytes, now: float) -> None:
        self._buffer += raw.replace(b"\r\n", b"\n")
        while (end := self._buffer.find(b"\n\n")) >= 0:
            event, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    self._data(line[5:].strip(), now)

    def _data(self, data: bytes, now: float) -> None:
        if data == b"[DONE]":
            self.done = True
        elif b'"usage":{' in data or b'"usage": {' in data:
            chunk = json.loads(data)
            self.usage_tokens = int(chunk["usage"]["completion_tokens"])
            if chunk.get("choices"):
                self.token_times.append(now)
        else:
            self.token_times.append(now)


def request_body(req: ServingRequest, model: str, temperature: float) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": req.prompt_ids or req.prompt_text,
        "max_tokens": req.output_len,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }


Stream = Callable[[str, dict[str, str], bytes, Callable[[bytes], None]], Awaitable[None]]


def httpx_stream(client: httpx.AsyncClient) -> Stream:
    """`raw_http.post_stream`'s contract on an httpx client (any URL scheme, pooled connections)."""

    async def post(url: str, headers: dict[str, str], body: bytes, on_data: Callable[[bytes], None]) -> None:
        headers = headers | {"Content-Type": "application/json"}
        async with client.stream("POST", url, content=body, headers=headers) as resp:
            if resp.status_code != 200:
                raise HTTPStatusError(resp.status_code, await resp.aread())
            async for raw in resp.aiter_raw():
                on_data(raw)

    return post


async def _stream_one(
    post: Stream, url: str, target: Target, req: ServingRequest, t0: float, temperature: float
) -> RequestRecord:
    rec = RequestRecord(req.index, req.target, req.prompt_len)
    headers = {"Authorization": f"Bearer {target.api_key}"}
    body = json.dumps(request_body(req, target.model, temperature)).encode()
    events = SSEEvents()

    def on_data(raw: bytes) -> None:
        events.feed(raw, time.perf_counter() - t0)

    rec.sent_s = time.perf_counter() - t0
    try:
        await post(url, headers, body, on_data)
        if not events.done:
            rec.error = "stream ended without [DONE]"
    except (
        OSError,
        EOFError,
        asyncio.LimitOverrunError,
        HTTPStatusError,
        httpx.HTTPError,
        ValueError,
        KeyError,
    ) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
    rec.end_s = time.perf_counter() - t0
    rec.token_times = events.token_times
    rec.output_tokens = events.usage_tokens or len(events.token_times)
    return rec


async def run_http(
    base_url: str,
    schedule: Schedule,
    temperature: float = 0.0,
    client: ClientKind = "raw",
    timeout_s: float = 600.0,
) -> RunResult:
    """Send every request of `schedule` at its arrival time and stream every response; `client`
    "raw" (plain http only, the lightest) or "httpx"."""
    url = base_url.rstrip("/") + "/completions"
    limits = httpx.Limits(max_connections=len(schedule.requests), max_keepalive_connections=64)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_s)) as pool:
        post = post_stream if client == "raw" else httpx_stream(pool)
        cpu0, t0 = time.process_time(), time.perf_counter()
        tasks = []
        for req in schedule.requests:
            delay = t0 + req.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            target = schedule.targets[req.target]
            tasks.append(asyncio.create_task(_stream_one(post, url, target, req, t0, temperature)))
        records = list(await asyncio.gather(*tasks))
        cpu = time.process_time() - cpu0
    return RunResult(records, max(r.end_s for r in records), cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--base-url", required=True, help="OpenAI base URL of the server, e.g. http://host:8000/v1"
    )
    ap.add_argument("--schedule", type=Path, required=True, help="schedule JSON (serving_workload.Schedule)")
    ap.add_argument("--out", type=Path, required=True, help="where to write the request records (JSON)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--client", choices=["raw", "httpx"], default="raw", help="HTTP client implementation")
    args = ap.parse_args()
    schedule = Schedule.load(args.schedule)
    records = _event_loop_runner()(run_http(args.base_url, schedule, args.temperature, args.client))
    records.save(args.out)


def _event_loop_runner() -> Callable[[Coroutine[Any, Any, RunResult]], RunResult]:
    # The client shares the machine's CPUs with the server under test: use uvloop's lighter event
    # loop where it is installed (it is a BlockZoo dependency on Linux).
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


if __name__ == "__main__":
    main()
