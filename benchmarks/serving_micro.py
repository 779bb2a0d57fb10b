"""Microbenchmarks of what the HTTP path does per request and per token, on the benchmark's server.

Per request, /v1/completions authenticates the key (a catalog query), resolves the model (catalog
queries, including the model's whole chain), fetches the loaded chain from the LRU, and at the end
adds a row to the usage table; each of these is a hop to a worker thread. Per token it encodes one
JSON chunk and writes it to the socket. Each figure is the median over rounds of the mean time of
one call, so it is wall time on this (shared) machine, not CPU time.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime

from fastapi.concurrency import run_in_threadpool

from benchmarks.report import table
from benchmarks.serving_server import DemoServer
from router.sse_chunks import ChunkFramer
from router.usage import UsageRecorder
from zoo.catalog.tenants import authenticate, get_tenant


def time_call(fn: Callable[[], object], calls: int, rounds: int = 5) -> float:
    """Median over `rounds` of the mean seconds per call of `fn`."""
    fn()
    per_call = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - start) / calls)
    return statistics.median(per_call)


async def _hops(calls: int) -> float:
    def noop() -> None:
        return None

    start = time.perf_counter()
    for _ in range(calls):
        await run_in_threadpool(noop)
    return (time.perf_counter() - start) / calls


def print_micro(server: DemoServer, mean_output_tokens: float) -> None:
    zoo, inference = server.inference.zoo, server.inference
    target = next(t for t in server.targets if t.tenant)
    ref = zoo.resolve(target.tenant, target.model)
    with zoo.sessions() as session:
        tenant_id = get_tenant(session, target.tenant).id
    usage = UsageRecorder(zoo)

    def auth() -> None:
        with zoo.sessions() as session, session.begin():
            if authenticate(session, target.api_key) is None:
                raise RuntimeError("the demo key did not authenticate")

    framer = ChunkFramer(
        "cmpl-0123456789abcdef01234567", int(time.time()), target.model, "text_completion", True
    )
    choice = {"index": 0, "text": " word", "logprobs": None, "finish_reason": None}
    per_request = [
        ("authenticate the API key (catalog query)", time_call(auth, 200)),
        (
            f"resolve the model ({len(ref.entries)} chain entries)",
            time_call(lambda: zoo.resolve(target.tenant, target.model), 200),
        ),
        ("loaded-chain LRU lookup", time_call(lambda: inference.load(ref), 2000)),
        (
            "record usage (catalog upsert + commit)",
            time_call(lambda: usage.record(tenant_id, ref.id, 10, 10, datetime.now(UTC)), 100),
        ),
        ("one hop to the threadpool and back (x4 per request)", asyncio.run(_hops(500))),
    ]
    total = sum(s for _, s in per_request[:-1]) + 4 * per_request[-1][1]
    rows: list[list[object]] = [[name, 1e6 * s] for name, s in per_request]
    rows.append(["total per request", 1e6 * total])
    rows.append(
        [
            f"  = per output token, at {mean_output_tokens:.0f} tokens per request",
            1e6 * total / mean_output_tokens,
        ]
    )
    rows.append(["per token: encode one SSE chunk", 1e6 * time_call(lambda: framer.chunk(choice), 5000)])
    print("\n## Microbenchmarks of the HTTP path (this server, this machine; wall time)")
    print(table(["operation", "µs per call"], rows))
