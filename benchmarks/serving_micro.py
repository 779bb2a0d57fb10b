"""Microbenchmarks of what the HTTP path does per request and per token, on the benchmark's server.

Per request, /v1/completions finds the key's tenant and the model's catalog entry in the catalog
cache and the chain in the loaded-model LRU, and at the end adds its usage to in-memory sums. On a
cache miss it authenticates the key and resolves the model in the catalog instead (a worker-thread hop
each). Once a second the usage sums are written. Per token it encodes one JSON chunk and writes it to
the socket. Each figure is the median over rounds of the mean time of
one call, so it is wall time on this (shared) machine, not CPU time.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

from fastapi.concurrency import run_in_threadpool

from benchmarks.report import table
from benchmarks.serving_server import DemoServer
from benchmarks.timing import time_call
from router.catalog_cache import CatalogCache
from router.sse_chunks import ChunkFramer
from router.usage import UsageRecorder
from router.usage_buffer import UsageBuffer
from zoo.catalog.tenants import authenticate, get_tenant
from zoo.registry import ModelRef


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
    recorder = UsageRecorder(zoo)
    buffer = UsageBuffer(recorder, interval_s=3600)
    cache: CatalogCache[str, ModelRef] = CatalogCache(60.0)
    cache.put_principal(target.api_key, target.tenant, cache.generation)
    cache.put_model(target.tenant, target.model, ref, cache.generation)

    def auth() -> None:
        with zoo.sessions() as session, session.begin():
            if authenticate(session, target.api_key) is None:
                raise RuntimeError("the demo key did not authenticate")

    def cached() -> None:
        found = cache.model(target.tenant, target.model)
        if cache.principal(target.api_key) is None or found is None or inference.loaded(found) is None:
            raise RuntimeError("the cached path missed")

    framer = ChunkFramer(
        "cmpl-0123456789abcdef01234567", int(time.time()), target.model, "text_completion", True
    )
    choice = {"index": 0, "text": " word", "logprobs": None, "finish_reason": None}
    miss = [
        ("authenticate the API key (catalog query)", time_call(auth, 200)),
        (
            f"resolve the model ({len(ref.entries)} chain entries)",
            time_call(lambda: zoo.resolve(target.tenant, target.model), 200),
        ),
        ("loaded-chain LRU lookup", time_call(lambda: inference.load(ref), 2000)),
        ("one hop to the threadpool and back (x2 on a miss)", asyncio.run(_hops(500))),
    ]
    hit = [
        ("key, model and chain from the caches", time_call(cached, 5000)),
        (
            "add usage to the in-memory sums",
            time_call(lambda: buffer.add(tenant_id, ref.id, 10, 10, datetime.now(UTC)), 5000),
        ),
    ]
    buffer.close()  # writes the sums the timing loop made: demo usage, not billed to anyone real
    rows: list[list[object]] = [
        ["per request, cache miss (first request of a key or model, or after a change)", ""]
    ]
    rows += [[f"  {name}", 1e6 * s] for name, s in miss]
    rows.append(["per request, cache hit (the steady state)", ""])
    rows += [[f"  {name}", 1e6 * s] for name, s in hit]
    per_hit = sum(s for _, s in hit)
    rows.append(
        [
            f"  = per output token, at {mean_output_tokens:.0f} tokens per request",
            1e6 * per_hit / mean_output_tokens,
        ]
    )
    rows.append(
        [
            "once a second: write the usage sums (upsert + commit)",
            1e6
            * time_call(lambda: recorder.record(tenant_id, ref.id, 0, 0, datetime.now(UTC), requests=0), 100),
        ]
    )
    rows.append(["per token: encode one SSE chunk", 1e6 * time_call(lambda: framer.chunk(choice), 5000)])
    print("\n## Microbenchmarks of the HTTP path (this server, this machine; wall time)")
    print(table(["operation", "µs per call"], rows))
