"""GET /v1/usage on a live uvicorn server: a tenant reads its own usage by model and hour, never
another tenant's, with time and model filters; hostile parameters get a 4xx and no traceback."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from blockzoo.settings import Settings
from blockzoo.tiny_models import TinyModelCache
from router.auth import admin_key_digest
from router.errors import install_error_handlers
from router.jobs import build_jobs
from router.request_id import RequestIdMiddleware
from router.routes_admin import admin_router
from router.routes_usage import usage_router
from router.services import Services
from router.usage import UsageRecorder
from router.usage_buffer import UsageBuffer
from tests.router.live_server import serve
from tests.zoo.test_lora_oracle import make_adapter
from tests.zoo.zoo_helpers import add_tenant, open_zoo
from zoo.catalog.models import Model, Tenant
from zoo.registry import Zoo

ADMIN = {"Authorization": "Bearer usage-admin"}
BASE = "tiny-llama"
H1 = datetime(2026, 3, 1, 10, tzinfo=UTC)
H2 = H1 + timedelta(hours=1)


@pytest.fixture(scope="module")
def base_dir(tiny_model_factory: TinyModelCache) -> Path:
    return tiny_model_factory("llama")


def _ids(zoo: Zoo, tenant: str, model: str) -> tuple[int, int]:
    with zoo.sessions() as s:
        tenant_id = s.scalar(select(Tenant.id).where(Tenant.name == tenant))
        model_id = s.scalar(select(Model.id).where(Model.name == model))
    assert tenant_id is not None and model_id is not None
    return tenant_id, model_id


class Live:
    """A live server over a zoo with two tenants that both used the shared base."""

    def __init__(self, client: httpx.Client, keys: dict[str, str]) -> None:
        self.client = client
        self.keys = keys

    def usage(self, who: str, **params: Any) -> httpx.Response:
        return self.client.get(
            "/v1/usage", params=params, headers={"Authorization": f"Bearer {self.keys[who]}"}
        )


@pytest.fixture(scope="module")
def live(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("usage")
    zoo = open_zoo(root / "zoo")
    zoo.add_base(BASE, base_dir)
    keys = {name: add_tenant(zoo, name) for name in ("alice", "bob")}
    adapter = make_adapter(
        base_dir, root / "ad", {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}, seed=1
    )
    zoo.register("alice", "alice-lora", adapter)
    recorder = UsageRecorder(zoo)
    buffer = UsageBuffer(recorder, interval_s=3600)  # never flushes by itself: the route must flush
    alice, base_id = _ids(zoo, "alice", BASE)
    bob, _ = _ids(zoo, "bob", BASE)
    _, lora_id = _ids(zoo, "alice", "alice-lora")
    recorder.record(alice, lora_id, 4, 2, H1)
    recorder.record(alice, base_id, 10, 5, H1)
    recorder.record(alice, base_id, 7, 3, H2, requests=2)
    recorder.record(bob, base_id, 1000, 500, H1)
    buffer.add(alice, base_id, 1, 1, H2)  # pending: only a flush makes it visible
    settings = Settings(data_dir=root / "data")
    jobs = build_jobs(settings, zoo)
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)
    app.state.services = Services(settings, zoo, admin_key_digest("usage-admin"))
    app.state.jobs = jobs
    app.state.usage = buffer
    app.include_router(admin_router([]))
    app.include_router(usage_router())
    try:
        with serve(app) as url, httpx.Client(base_url=url, timeout=30) as client:
            yield Live(client, keys)
    finally:
        jobs.shutdown()


def _rows(response: httpx.Response) -> list[tuple[str, str, str, int, int, int]]:
    assert response.status_code == 200, response.text
    return [
        (r["tenant"], r["model"], r["hour"], r["prompt_tokens"], r["completion_tokens"], r["requests"])
        for r in response.json()["data"]
    ]


def test_a_tenant_reads_only_its_own_usage_by_model_and_hour(live: Live) -> None:
    h1, h2 = H1.isoformat().replace("+00:00", "Z"), H2.isoformat().replace("+00:00", "Z")
    assert _rows(live.usage("alice")) == [
        ("alice", BASE, h2, 8, 4, 3),
        ("alice", "alice-lora", h1, 4, 2, 1),
        ("alice", BASE, h1, 10, 5, 1),
    ]
    assert _rows(live.usage("bob")) == [("bob", BASE, h1, 1000, 500, 1)]
    # Filters narrow the tenant's own rows; none can widen them.
    assert _rows(live.usage("alice", start=h2)) == [("alice", BASE, h2, 8, 4, 3)]
    assert _rows(live.usage("alice", end=h2, model=BASE)) == [("alice", BASE, h1, 10, 5, 1)]
    assert _rows(live.usage("alice", start=int(H1.timestamp()), end=int(H2.timestamp()))) == [
        ("alice", "alice-lora", h1, 4, 2, 1),
        ("alice", BASE, h1, 10, 5, 1),
    ]
    assert _rows(live.usage("alice", model="nope")) == []
    assert len(_rows(live.usage("alice", model=BASE, limit=1))) == 1
    assert _rows(live.usage("alice", tenant="bob")) == _rows(live.usage("alice"))
    # The admin still sees everyone.
    everyone = _rows(live.client.get("/admin/v1/usage", headers=ADMIN))
    assert {r[0] for r in everyone} == {"alice", "bob"}
    assert live.client.get("/v1/usage").status_code == 401


@pytest.mark.parametrize(
    "params",
    [
        {"start": str(2**70)},
        {"start": "0001-01-01T00:00:00+01:00"},
        {"end": "9999-12-31T23:59:59-14:00"},
        {"start": "1e400"},
        {"limit": 0},
        {"limit": 2**63},
        {"model": "x" * 300},
    ],
)
def test_hostile_usage_parameters_are_4xx(
    live: Live, params: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    r = live.usage("alice", **params)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["param"] in params
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    admin = {("since" if k == "start" else "until" if k == "end" else k): v for k, v in params.items()}
    r = live.client.get("/admin/v1/usage", params=admin, headers=ADMIN)
    assert 400 <= r.status_code < 500, r.text
