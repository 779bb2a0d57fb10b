"""The model cache is keyed by tenant: one tenant's cached lookup is never another tenant's answer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from fastapi.testclient import TestClient

from blockzoo.settings import Settings
from blockzoo.tiny_models import TinyModelCache
from router.app import create_app
from router.auth import admin_key_digest
from router.catalog_cache import CatalogCache
from router.inference import InferenceService
from router.services import Services
from tests.zoo.test_lora_oracle import make_adapter
from tests.zoo.zoo_helpers import add_tenant, open_zoo
from zoo.catalog.database import factory_engine


def test_a_cached_name_is_kept_per_tenant() -> None:
    cache: CatalogCache[str, str] = CatalogCache(60.0)
    cache.put_model("acme", "twin", "acme's twin", cache.generation)
    assert cache.model("globex", "twin") is None
    cache.put_model("globex", "twin", "globex's twin", cache.generation)
    assert cache.model("acme", "twin") == "acme's twin"
    assert cache.model("globex", "twin") == "globex's twin"


class TwoTenants(NamedTuple):
    client: TestClient
    keys: dict[str, str]
    services: Services


@pytest.fixture
def two_tenants(tmp_path: Path, tiny_model_factory: TinyModelCache) -> Iterator[TwoTenants]:
    """acme owns `acme-private` and `twin`; globex owns a different `twin`. The cache lives a minute."""
    base = tiny_model_factory("llama", num_layers=2)
    zoo = open_zoo(tmp_path / "zoo")
    zoo.add_base("tiny-base", base)
    keys = {"acme": add_tenant(zoo, "acme"), "globex": add_tenant(zoo, "globex")}
    lora = {"r": 4, "target_modules": ["q_proj", "v_proj", "o_proj"]}
    zoo.register("acme", "acme-private", make_adapter(base, tmp_path / "a1", lora, 1))
    zoo.register("acme", "twin", make_adapter(base, tmp_path / "a2", lora, 2))
    zoo.register("globex", "twin", make_adapter(base, tmp_path / "g2", lora, 3))
    settings = Settings(
        data_dir=tmp_path / "data",
        kv_cache_memory=8 << 20,
        max_model_len=64,
        page_size=8,
        catalog_cache_ttl_s=60,
    )
    services = Services(settings, zoo, admin_key_digest("admin"))
    app = create_app(services, InferenceService(settings, zoo))
    with TestClient(app) as client:
        yield TwoTenants(client, keys, services)
    factory_engine(zoo.sessions).dispose()


def complete(t: TwoTenants, tenant: str, model: str) -> tuple[int, str]:
    body = {"model": model, "prompt": [1, 12, 40, 77], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    resp = t.client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {t.keys[tenant]}"})
    return resp.status_code, resp.json()["choices"][0]["text"] if resp.status_code == 200 else ""


def test_another_tenants_cached_private_model_is_a_miss(two_tenants: TwoTenants) -> None:
    assert complete(two_tenants, "acme", "acme-private")[0] == 200  # now cached under acme
    assert complete(two_tenants, "globex", "acme-private") == (404, "")
    assert complete(two_tenants, "acme", "acme-private")[0] == 200


def test_a_same_named_model_resolves_to_each_tenants_own(two_tenants: TwoTenants) -> None:
    # globex's answer from the catalog itself, with nothing cached.
    status, globex_uncached = complete(two_tenants, "globex", "twin")
    assert status == 200
    two_tenants.services.catalog_cache.invalidate()
    _, acme_text = complete(two_tenants, "acme", "twin")  # acme's `twin` is now the cached one
    assert acme_text != globex_uncached  # the two adapters answer differently
    _, globex_text = complete(two_tenants, "globex", "twin")
    assert globex_text == globex_uncached
    ref = two_tenants.services.catalog_cache.model("globex", "twin")
    assert ref is not None and ref.tenant == "globex"
