"""The serving benchmark's own server: the real BlockZoo app over a demo zoo, on uvicorn in a thread.

Everything is the production path (`router.server.build_server`, the demo zoo of `blockzoo serve
--demo`); only the data folder is temporary. The demo tenants get quotas far above the load, so the
quota buckets are exercised on every request without ever refusing one.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from transformers.utils import logging as transformers_logging

from benchmarks.serving_workload import Target
from blockzoo.settings import Settings
from blockzoo.tiny_demo_zoo import ADAPTERS, BASE, ensure_demo_zoo
from router.inference import InferenceService
from router.server import build_server
from zoo.catalog.tenants import TenantQuotas, set_quotas

# Far above anything the benchmark sends, so that no request is refused but every limit is checked.
# Far above any load, so that no request is refused but every one takes and releases a lease; within the
# catalog's bounds on quotas (int32 for rates).
GENEROUS = TenantQuotas(requests_per_minute=10**7, tokens_per_minute=2 * 10**9, max_concurrent=10**5)
SERVER_THREAD = "bench-uvicorn"


@dataclass(frozen=True)
class DemoServer:
    """A running server: its OpenAI base URL, its app and inference service, and the demo targets."""

    base_url: str
    app: FastAPI
    inference: InferenceService
    targets: list[Target]
    thread: threading.Thread


def demo_targets(keys: dict[str, str]) -> list[Target]:
    """Every demo model, plus the shared base as seen by each tenant: two tenants, five models."""
    targets = [Target(model, keys[tenant], tenant) for tenant, model, _, _ in ADAPTERS]
    targets.append(Target("bob-partial", keys["demo-bob"], "demo-bob"))
    targets.extend(Target(BASE, keys[tenant], tenant) for tenant in sorted(keys))
    return targets


def uvicorn_impl() -> str:
    """Which event loop and HTTP parser uvicorn's "auto" picks here (they change the API's cost)."""
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"uvicorn {uvicorn.__version__} ({loop} loop, {http} parser)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def demo_server(engine_settings: dict[str, object]) -> Iterator[DemoServer]:
    """Build the demo zoo in a temporary folder and serve it until the block exits."""
    data_dir = Path(tempfile.mkdtemp(prefix="bz-serving-bench-"))
    # The demo zoo's checkpoint writes would otherwise draw progress bars into the benchmark output.
    transformers_logging.disable_progress_bar()
    try:
        settings = Settings(data_dir=data_dir, log_level="WARNING", **engine_settings)  # type: ignore[arg-type]
        built = build_server(settings)
        zoo = built.inference.zoo
        keys = ensure_demo_zoo(settings, zoo)
        with zoo.sessions() as session, session.begin():
            for tenant in keys:
                set_quotas(session, tenant, GENEROUS)
        port = _free_port()
        server = uvicorn.Server(
            uvicorn.Config(built.app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        )
        thread = threading.Thread(target=server.run, name=SERVER_THREAD, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        try:
            url = f"http://127.0.0.1:{port}/v1"
            yield DemoServer(url, built.app, built.inference, demo_targets(keys), thread)
        finally:
            server.should_exit = True
            thread.join(timeout=60)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
