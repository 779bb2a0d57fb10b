"""Metrics: names and values in the Prometheus text output, separate registries, and the probe routes."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine

from blockzoo.settings import Settings
from router.auth import admin_key_digest
from router.errors import install_error_handlers
from router.metrics import Metrics
from router.request_id import RequestIdMiddleware
from router.routes_health import router as health_router
from router.services import Services
from tests.zoo.zoo_helpers import open_zoo
from zoo.block_store import BlockStore
from zoo.catalog.database import factory_engine, session_factory
from zoo.registry import Zoo

Labels = frozenset[tuple[str, str]]


def samples(metrics: Metrics) -> dict[tuple[str, Labels], float]:
    """Every sample of the rendered text, keyed by name and label set."""
    found: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            found[(s.name, frozenset(s.labels.items()))] = s.value
    return found


def labels(**kv: str) -> Labels:
    return frozenset(kv.items())


def test_observed_requests_appear_with_their_values() -> None:
    m = Metrics()
    m.observe_request("acme", "llama-a", 12, 5, 0.03, [0.02, 0.04, 0.06, 0.5], 0.7, "stop")
    m.observe_request("acme", "llama-a", 8, 3, 0.05, [0.01, 0.01], 0.2, "length")
    m.observe_request("beta", "llama-b", 4, 0, None, [], 0.01, "abort")
    got = samples(m)
    a, b = labels(model_name="llama-a", tenant="acme"), labels(model_name="llama-b", tenant="beta")
    assert got[("blockzoo:prompt_tokens_total", a)] == 20
    assert got[("blockzoo:generation_tokens_total", a)] == 8
    assert got[("blockzoo:prompt_tokens_total", b)] == 4
    for reason in ("stop", "length"):
        key = ("blockzoo:request_success_total", a | {("finished_reason", reason)})
        assert got[key] == 1
    assert got[("blockzoo:request_success_total", b | {("finished_reason", "abort")})] == 1

    assert got[("blockzoo:time_to_first_token_seconds_count", a)] == 2
    assert math.isclose(got[("blockzoo:time_to_first_token_seconds_sum", a)], 0.08)
    assert ("blockzoo:time_to_first_token_seconds_count", b) not in got  # it had no first token
    assert got[("blockzoo:inter_token_latency_seconds_count", a)] == 6
    assert math.isclose(got[("blockzoo:inter_token_latency_seconds_sum", a)], 0.64)
    # Buckets are cumulative: gaps at most 0.05 s are 0.02, 0.04, 0.01 and 0.01.
    assert got[("blockzoo:inter_token_latency_seconds_bucket", a | {("le", "0.05")})] == 4
    assert got[("blockzoo:e2e_request_latency_seconds_count", a)] == 2
    assert math.isclose(got[("blockzoo:e2e_request_latency_seconds_sum", a)], 0.9)
    assert got[("blockzoo:request_prompt_tokens_sum", a)] == 20
    assert got[("blockzoo:request_prompt_tokens_bucket", a | {("le", "10.0")})] == 1
    assert got[("blockzoo:request_generation_tokens_count", a)] == 2
    assert got[("blockzoo:request_generation_tokens_sum", a)] == 8


def test_engine_stats_set_gauges_and_advance_counters_by_difference() -> None:
    m = Metrics()
    m.set_engine_stats(3, 2, 0.25, 4096, 5, 100, 40)
    m.set_engine_stats(4, 0, 0.5, 8192, 8, 150, 90, cross_model_kv_hits_total=32)
    e0 = labels(engine="0")
    got = samples(m)
    assert got[("blockzoo:num_requests_running", e0)] == 4
    assert got[("blockzoo:num_requests_waiting", e0)] == 0
    assert got[("blockzoo:kv_cache_usage_perc", e0)] == 0.5
    assert got[("blockzoo:resident_block_bytes", e0)] == 8192
    assert got[("blockzoo:num_preemptions_total", e0)] == 8
    assert got[("blockzoo:prefix_cache_queries_total", e0)] == 150
    assert got[("blockzoo:prefix_cache_hits_total", e0)] == 90
    assert got[("blockzoo:kv_cross_model_hits_total", e0)] == 32
    # The engine restarted: its totals count from zero again and the counter keeps growing.
    m.set_engine_stats(0, 0, 0.0, 0, 2, 10, 1)
    got = samples(m)
    assert got[("blockzoo:num_preemptions_total", e0)] == 10
    assert got[("blockzoo:prefix_cache_queries_total", e0)] == 160
    assert got[("blockzoo:prefix_cache_hits_total", e0)] == 91


def test_two_instances_do_not_share_state() -> None:
    first, second = Metrics(), Metrics()
    first.observe_request("acme", "m", 5, 5, 0.1, [0.1], 0.2, "stop")
    first.set_engine_stats(1, 1, 0.1, 10, 1, 1, 1)
    assert ("blockzoo:prompt_tokens_total", labels(model_name="m", tenant="acme")) in samples(first)
    # The quota metrics have no labels, so they always have a sample: a zero one here.
    assert [name for name, _ in samples(second) if not name.startswith("blockzoo:quota_")] == []
    first.set_quota_stats(leases_held=3, fallbacks_total=2)
    assert b"blockzoo:quota_leases_held 0.0" in second.render()
    assert b"blockzoo:quota_fallback_total 0.0" in second.render()
    assert b"blockzoo:num_requests_running" in second.render()  # described, with no samples


@pytest.fixture
def zoo(tmp_path: Path) -> Iterator[Zoo]:
    zoo = open_zoo(tmp_path)
    try:
        yield zoo
    finally:
        factory_engine(zoo.sessions).dispose()


def make_app(zoo: Zoo, tmp_path: Path) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)
    app.state.services = Services(Settings(data_dir=tmp_path), zoo, admin_key_digest("admin-key"))
    app.state.metrics = Metrics()
    app.include_router(health_router)
    return app


@pytest.fixture
async def app_client(zoo: Zoo, tmp_path: Path) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = make_app(zoo, tmp_path)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        yield app, client


async def test_health_and_ready(app_client: tuple[FastAPI, httpx.AsyncClient]) -> None:
    app, client = app_client
    health = await client.get("/health")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert health.headers["x-request-id"]
    ready = await client.get("/ready")
    assert ready.status_code == 200

    engine_up = False
    app.state.ready_check = lambda: engine_up
    not_ready = await client.get("/ready")
    assert not_ready.status_code == 503
    error = not_ready.json()["error"]
    assert error["code"] == "not_ready"
    assert set(error) == {"message", "type", "param", "code"}
    engine_up = True
    assert (await client.get("/ready")).status_code == 200
    assert (await client.get("/health")).status_code == 200


async def test_ready_is_503_when_the_catalog_is_unreachable(tmp_path: Path) -> None:
    # A SQLite file in a folder that does not exist cannot be opened.
    engine = create_engine(f"sqlite:///{tmp_path / 'missing' / 'catalog.db'}")
    broken = Zoo(session_factory(engine), BlockStore(tmp_path / "store"))
    app = make_app(broken, tmp_path)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        response = await client.get("/ready")
        assert response.status_code == 503
        assert "catalog" in response.json()["error"]["message"]
        assert (await client.get("/health")).status_code == 200
    engine.dispose()


async def test_metrics_route_refreshes_engine_stats_first(
    app_client: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, client = app_client
    metrics: Metrics = app.state.metrics
    metrics.observe_request("acme", "m", 7, 3, 0.1, [0.05], 0.3, "stop")
    running = [0]

    def refresh() -> None:
        running[0] += 1
        metrics.set_engine_stats(running[0], 0, 0.0, 0, 0, 0, 0)

    app.state.refresh_metrics = refresh
    for expected in (1, 2):
        response = await client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"] == Metrics.content_type
        got = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text)
            for s in family.samples
        }
        assert got[("blockzoo:num_requests_running", labels(engine="0"))] == expected
        assert got[("blockzoo:prompt_tokens_total", labels(model_name="m", tenant="acme"))] == 7
