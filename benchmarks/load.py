"""Load and leaks: 200 concurrent streaming clients on the real server, a third of them hanging up.

`blockzoo serve` runs in a child process over the demo zoo (a tiny base, three LoRA adapters, a partial
fine-tune; three tenants, quotas far above the load). Every client streams /v1/completions to a random
model, one request after another, for the whole run; a third of the requests are cut by their client
at a random point mid-stream. The server's resident memory is sampled throughout. After the run the
benchmark waits for the engine to go idle and reads from /metrics what is still held, then sends
SIGTERM and checks that the server drains and exits 0.

    python -m benchmarks.load --quick     # 20 s
    python -m benchmarks.load             # 60 s
    python -m benchmarks.load --quick --redis-outage   # quotas in Redis, killed and restarted mid-load

It prints a table and, last, `headline: errors=… leaked_pages=… leaked_leases=… rss_growth=…`:
errors are 5xx answers and streams broken by the server (ended without [DONE], or reset);
leaked_pages are KV pages not free once idle (evictable prefix-cache pages count as free);
leaked_leases are quota leases still held once idle; rss_growth is the server's mean resident memory
over the second half of the run against the first half, as a fraction.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.load_server import RedisServer, ServerProcess, prepare, start
from benchmarks.loadgen import SSEEvents
from benchmarks.raw_http import HTTPStatusError, post_stream
from benchmarks.report import table
from benchmarks.serving_workload import Target

WORDS = [
    "the",
    "zoo",
    "keeps",
    "every",
    "block",
    "once",
    "and",
    "each",
    "tenant",
    "runs",
    "its",
    "own",
    "fine",
    "tune",
    "on",
    "a",
    "shared",
    "base",
]
SHARED_PREFIX = "You are a helpful assistant of the block zoo. Answer briefly. "
IDLE_TIMEOUT_S = 60.0
RSS_INTERVAL_S = 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _HangUp(Exception):
    """Raised from the data callback to drop the connection mid-stream, as a leaving client does."""


@dataclass
class Tally:
    """What the clients saw."""

    completed: int = 0
    hung_up: int = 0
    rejected_4xx: int = 0
    server_errors: int = 0
    broken_streams: int = 0
    chunks: int = 0
    samples: list[str] = field(default_factory=list)

    def error(self, kind: str, detail: str) -> None:
        if len(self.samples) < 5:
            self.samples.append(f"{kind}: {detail[:160]}")


def _body(target: Target, rng: random.Random) -> bytes:
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 40)))
    prompt = (SHARED_PREFIX if rng.random() < 0.5 else "") + words
    return json.dumps(
        {
            "model": target.model,
            "prompt": prompt,
            "max_tokens": rng.randint(16, 64),
            "temperature": rng.choice([0.0, 0.8]),
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()


async def _one(url: str, target: Target, rng: random.Random, tally: Tally) -> None:
    events = SSEEvents()
    hang_up_after = rng.randint(1, 12) if rng.random() < 1 / 3 else None

    def on_data(raw: bytes) -> None:
        events.feed(raw, 0.0)
        if hang_up_after is not None and len(events.token_times) >= hang_up_after and not events.done:
            raise _HangUp

    headers = {"Authorization": f"Bearer {target.api_key}"}
    try:
        await post_stream(url, headers, _body(target, rng), on_data)
    except _HangUp:
        tally.hung_up += 1
        return
    except HTTPStatusError as exc:
        if exc.status >= 500:
            tally.server_errors += 1
            tally.error("5xx", str(exc))
        else:
            tally.rejected_4xx += 1
            tally.error("4xx", str(exc))
        return
    except (OSError, EOFError, asyncio.IncompleteReadError, ValueError) as exc:
        tally.broken_streams += 1
        tally.error("broken", f"{type(exc).__name__}: {exc}")
        return
    tally.chunks += len(events.token_times)
    if events.done:
        tally.completed += 1
    else:
        tally.broken_streams += 1
        tally.error("broken", "stream ended without [DONE]")


async def _client(url: str, targets: list[Target], seed: int, stop_at: float, tally: Tally) -> None:
    rng = random.Random(seed)
    while time.monotonic() < stop_at:
        await _one(url, rng.choice(targets), rng, tally)


async def _sample_rss(server: ServerProcess, stop_at: float, into: list[tuple[float, int]]) -> None:
    start = time.monotonic()
    while (now := time.monotonic()) < stop_at:
        into.append((now - start, server.rss_bytes()))
        await asyncio.sleep(RSS_INTERVAL_S)


async def _redis_outage(store: RedisServer, duration_s: float) -> None:
    """Redis killed a third of the way into the load and started again (empty) at two thirds."""
    await asyncio.sleep(duration_s / 3)
    await asyncio.to_thread(store.stop)
    await asyncio.sleep(duration_s / 3)
    await asyncio.to_thread(store.start)


async def run_load(
    server: ServerProcess,
    targets: list[Target],
    clients: int,
    duration_s: float,
    seed: int,
    store: RedisServer | None = None,
) -> tuple[Tally, list[tuple[float, int]], float]:
    url = server.url + "/v1/completions"
    tally = Tally()
    rss: list[tuple[float, int]] = []
    stop_at = time.monotonic() + duration_s
    started = time.monotonic()
    background = [asyncio.create_task(_sample_rss(server, stop_at, rss))]
    if store is not None:
        background.append(asyncio.create_task(_redis_outage(store, duration_s)))
    await asyncio.gather(*(_client(url, targets, seed + i, stop_at, tally) for i in range(clients)))
    await asyncio.gather(*background)
    return tally, rss, time.monotonic() - started


def rss_growth(samples: list[tuple[float, int]]) -> float:
    """Mean RSS of the second half of the samples over the first half's, minus one."""
    values = [v for _, v in samples]
    half = len(values) // 2
    if half == 0:
        return 0.0
    first, second = values[:half], values[half:]
    return (sum(second) / len(second)) / (sum(first) / len(first)) - 1.0


def wait_idle(server: ServerProcess) -> dict[str, float]:
    """/metrics once no request runs or waits (or after IDLE_TIMEOUT_S)."""
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while True:
        found = server.metrics()
        idle = (
            found.get("blockzoo:num_requests_running", 0) == 0
            and found.get("blockzoo:num_requests_waiting", 0) == 0
        )
        if (idle and found.get("blockzoo:quota_leases_held", 0) == 0) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def warm_up(server: ServerProcess, targets: list[Target]) -> None:
    """One request per model, so that loading chains is not counted as growth."""

    async def each() -> None:
        tally = Tally()
        rng = random.Random(0)
        for target in targets:
            await _one(server.url + "/v1/completions", target, rng, tally)

    _runner()(each())


def _runner() -> Callable[[Coroutine[Any, Any, Any]], Any]:
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


def args_duration(args: argparse.Namespace) -> float:
    return float(args.duration) if args.duration is not None else (20.0 if args.quick else 60.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20 s instead of 60 s")
    ap.add_argument("--clients", type=int, default=200, help="concurrent streaming clients")
    ap.add_argument("--duration", type=float, default=None, help="seconds of load (overrides --quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--kv-cache-memory", default=str(256 << 20), help="BLOCKZOO_KV_CACHE_MEMORY for the server"
    )
    ap.add_argument(
        "--redis-outage",
        action="store_true",
        help="quotas in a redis-server that is killed a third of the way in and restarted at two thirds",
    )
    args = ap.parse_args()
    duration = args_duration(args)
    data_dir = Path(tempfile.mkdtemp(prefix="bz-load-"))
    store: RedisServer | None = None
    try:
        targets = prepare(data_dir)
        env = {"BLOCKZOO_KV_CACHE_MEMORY": args.kv_cache_memory}
        if args.redis_outage:
            store = RedisServer(data_dir, free_port())
            store.start()
            env |= {"BLOCKZOO_REDIS_URL": store.url, "BLOCKZOO_QUOTA_REDIS_RETRY_S": "0.5"}
        server = start(data_dir, free_port(), env)
        try:
            warm_up(server, targets)
            load = run_load(server, targets, args.clients, duration, args.seed, store)
            tally, rss, elapsed = _runner()(load)
            idle = wait_idle(server)
            redis_in_flight = store.in_flight() if store is not None else 0
        finally:
            code, stop_s = server.stop(timeout_s=60)
        report(args, targets, tally, rss, elapsed, idle, code, stop_s, server, redis_in_flight)
    finally:
        if store is not None:
            store.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def report(
    args: argparse.Namespace,
    targets: list[Target],
    tally: Tally,
    rss: list[tuple[float, int]],
    elapsed: float,
    idle: dict[str, float],
    exit_code: int,
    stop_s: float,
    server: ServerProcess,
    redis_in_flight: int,
) -> None:
    pages_total = int(idle.get("blockzoo:kv_pages_total", 0))
    leaked_pages = pages_total - int(idle.get("blockzoo:kv_pages_free", 0))
    # Leases this process still holds, and any concurrency still counted in Redis.
    leaked_leases = int(idle.get("blockzoo:quota_leases_held", 0)) + redis_in_flight
    errors = tally.server_errors + tally.broken_streams
    growth = rss_growth(rss)
    requests = tally.completed + tally.hung_up + tally.rejected_4xx + errors
    tenants = len({t.tenant for t in targets})
    models = len({t.model for t in targets})
    rows: list[list[object]] = [
        ["clients", args.clients],
        ["tenants / models", f"{tenants} / {models}"],
        ["seconds of new requests / until the last one ended", f"{args_duration(args):.0f} / {elapsed:.1f}"],
        ["requests", requests],
        ["completed with [DONE]", tally.completed],
        ["hung up by the client", tally.hung_up],
        ["4xx", tally.rejected_4xx],
        ["5xx", tally.server_errors],
        ["broken streams", tally.broken_streams],
        ["streamed chunks", tally.chunks],
        ["requests running / waiting once idle", f"{idle.get('blockzoo:num_requests_running', 0):.0f} / "
         f"{idle.get('blockzoo:num_requests_waiting', 0):.0f}"],
        ["KV pages held once idle / total", f"{leaked_pages} / {pages_total}"],
        ["quota leases held once idle", leaked_leases],
        ["server RSS first / last sample (MiB)",
         f"{rss[0][1] / 2**20:.0f} / {rss[-1][1] / 2**20:.0f}" if rss else "-"],
        ["tracebacks in the server log", server.log_lines("Traceback")],
        ["Redis killed at 1/3, restarted at 2/3 of the load", "yes" if args.redis_outage else "no"],
        ["requests decided without Redis (quota fallback)",
         f"{idle.get('blockzoo:quota_fallback_total', 0):.0f}"],
        ["in-flight counted in Redis once idle", redis_in_flight if args.redis_outage else "-"],
        ["SIGTERM: exit status, seconds", f"{exit_code}, {stop_s:.1f}"],
    ]  # fmt: skip
    print(table(["measure", "value"], rows))
    for sample in tally.samples:
        print("  e.g.", sample)
    print(
        f"headline: errors={errors} leaked_pages={leaked_pages} leaked_leases={leaked_leases}"
        f" rss_growth={growth:.3f}"
    )


if __name__ == "__main__":
    main()
