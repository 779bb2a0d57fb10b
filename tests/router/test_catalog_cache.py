"""Keys and model lookups are reused on the request path, and forgotten as soon as the catalog changes."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from blockzoo.settings import Settings
from blockzoo.tiny_models import TinyModelCache
from router.app import create_app
from router.auth import admin_key_digest
from router.catalog_cache import CatalogCache
from router.inference import InferenceService
from router.services import Services
from router.usage import UsageRecorder
from tests.zoo.test_lora_oracle import make_adapter
from tests.zoo.zoo_helpers import add_tenant, open_zoo
from zoo.catalog.change_events import on_catalog_change
from zoo.catalog.database import factory_engine, open_catalog
from zoo.catalog.keys import key_prefix
from zoo.catalog.models import ApiKey, Model, Tenant
from zoo.catalog.tenants import revoke_key, set_disabled
from zoo.catalog.types import ModelKind, ModelStatus
from zoo.registry import Zoo


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_entries_expire_after_the_ttl() -> None:
    clock = FakeClock()
    cache: CatalogCache[str, str] = CatalogCache(2.0, clock=clock)
    cache.put_principal("bz-key", "acme", cache.generation)
    cache.put_model("acme", "m", "ref", cache.generation)
    clock.now += 1.9
    assert cache.principal("bz-key") == "acme" and cache.model("acme", "m") == "ref"
    assert cache.principal("bz-other") is None and cache.model("globex", "m") is None
    clock.now += 0.2
    assert cache.principal("bz-key") is None and cache.model("acme", "m") is None


def test_a_lookup_that_raced_with_a_change_is_not_kept() -> None:
    cache: CatalogCache[str, str] = CatalogCache(60.0)
    generation = cache.generation
    cache.invalidate()  # the catalog changed while the lookup ran
    cache.put_principal("bz-key", "stale", generation)
    assert cache.principal("bz-key") is None
    cache.put_principal("bz-key", "fresh", cache.generation)
    assert cache.principal("bz-key") == "fresh"


def test_zero_ttl_keeps_nothing_and_size_is_bounded() -> None:
    off: CatalogCache[str, str] = CatalogCache(0.0)
    off.put_principal("bz-key", "acme", off.generation)
    assert off.principal("bz-key") is None
    small: CatalogCache[str, str] = CatalogCache(60.0, max_entries=3)
    for i in range(5):
        small.put_model("t", f"m{i}", f"r{i}", small.generation)
    assert [small.model("t", f"m{i}") for i in range(5)] == [None, None, "r2", "r3", "r4"]


def test_commits_that_change_rows_notify_and_usage_inserts_do_not(tmp_path: Path) -> None:
    zoo = open_zoo(tmp_path)
    calls: list[int] = []
    on_catalog_change(zoo.sessions, lambda: calls.append(1))
    key = add_tenant(zoo, "acme")
    assert len(calls) == 1  # creating the tenant
    with zoo.sessions() as session, session.begin():
        tenant_id = session.scalars(select(Tenant.id)).one()
        session.add(Tenant(name="rolled-back"))
        session.flush()
        session.rollback()
    assert len(calls) == 1
    with zoo.sessions() as session:
        session.scalars(select(ApiKey)).all()  # reads commit nothing
    with zoo.sessions() as session, session.begin():
        session.add(Model(tenant_id=tenant_id, name="m", kind=ModelKind.LORA, status=ModelStatus.READY))
    assert len(calls) == 2
    with zoo.sessions() as session:
        model_id = session.scalars(select(Model.id)).one()
    assert UsageRecorder(zoo).record(tenant_id, model_id, 3, 4, datetime.now(UTC))
    assert len(calls) == 2
    with zoo.sessions() as session, session.begin():
        revoke_key(session, "acme", key_prefix(key))
    assert len(calls) == 3
    factory_engine(zoo.sessions).dispose()


class Served:
    """An app on a tiny base with one LoRA model of tenant acme, and a cache on a fake clock."""

    def __init__(self, zoo: Zoo, client: TestClient, key: str, clock: FakeClock) -> None:
        self.zoo, self.client, self.key, self.clock = zoo, client, key, clock

    def complete(self, model: str = "acme-lora") -> int:
        body = {"model": model, "prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0}
        headers = {"Authorization": f"Bearer {self.key}"}
        return self.client.post("/v1/completions", json=body, headers=headers).status_code


@pytest.fixture
def served(tmp_path: Path, tiny_model_factory: TinyModelCache) -> Iterator[Served]:
    base = tiny_model_factory("llama", num_layers=2)
    zoo = open_zoo(tmp_path / "zoo")
    zoo.add_base("tiny-base", base)
    key = add_tenant(zoo, "acme")
    zoo.register(
        "acme", "acme-lora", make_adapter(base, tmp_path / "ad", {"r": 4, "target_modules": ["q_proj"]}, 3)
    )
    settings = Settings(data_dir=tmp_path / "data", kv_cache_memory=8 << 20, max_model_len=64, page_size=8)
    services = Services(settings, zoo, admin_key_digest("admin"))
    clock = FakeClock()
    # The same wiring as Services builds, on a clock the test moves.
    services.catalog_cache = CatalogCache(60.0, clock=clock)
    on_catalog_change(zoo.sessions, services.catalog_cache.invalidate)
    app = create_app(services, InferenceService(settings, zoo))
    with TestClient(app) as client:
        yield Served(zoo, client, key, clock)
    factory_engine(zoo.sessions).dispose()


def test_a_key_revoked_in_this_process_stops_working_at_once(served: Served) -> None:
    assert served.complete() == 200  # the key and the model are now cached
    with served.zoo.sessions() as session, session.begin():
        revoke_key(session, "acme", key_prefix(served.key))
    assert served.complete() == 401


def test_a_tenant_disabled_in_this_process_is_refused_at_once(served: Served) -> None:
    assert served.complete() == 200
    with served.zoo.sessions() as session, session.begin():
        set_disabled(session, "acme", True)
    assert served.complete() == 401


def test_a_model_deleted_in_this_process_is_gone_at_once(served: Served) -> None:
    assert served.complete() == 200
    served.zoo.delete_model("acme", "acme-lora")
    assert served.complete() == 404
    assert served.complete("tiny-base") == 200


def test_changes_from_another_process_apply_within_the_ttl(served: Served, tmp_path: Path) -> None:
    assert served.complete() == 200
    # A second catalog connection stands for the CLI or another server: this process is not told.
    url = factory_engine(served.zoo.sessions).url
    other = open_catalog(url, auto_migrate=False)
    try:
        with other() as session, session.begin():
            revoke_key(session, "acme", key_prefix(served.key))
    finally:
        factory_engine(other).dispose()
    served.clock.now += 59.0
    assert served.complete() == 200  # still cached: the documented staleness bound
    served.clock.now += 2.0
    assert served.complete() == 401
