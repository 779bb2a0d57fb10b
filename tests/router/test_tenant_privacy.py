"""Tenancy: no tenant model takes a shared base's name, and nothing a tenant is shown or charged depends on
what other tenants stored (the zoo stores each block once, so "bytes new: 0" would say someone else
already holds the same weights). Admins still see the zoo-wide dedup figures.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from blockzoo.tiny_models import TinyModelCache
from tests.router.test_tenant_models_api import BASE, Env, assert_error, finish, make_env, upload
from tests.zoo.test_lora_oracle import make_adapter
from tests.zoo.zoo_helpers import fine_tune_top_layers
from zoo.catalog import migrate
from zoo.catalog.database import factory_engine
from zoo.catalog.models import Model
from zoo.errors import DuplicateNameError

# Figures that may differ between two registrations of the same weights for reasons of their own.
OWN = ("model", "seconds")


@pytest.fixture(scope="module")
def base_dir(tiny_model_factory: TinyModelCache) -> Path:
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def adapter_dir(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}
    return make_adapter(base_dir, tmp_path_factory.mktemp("adapter") / "ad", cfg, seed=3)


@pytest.fixture
def env(tmp_path: Path, base_dir: Path) -> Iterator[Env]:
    yield from make_env(tmp_path, base_dir)


def _mine(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k not in OWN}


def test_a_tenant_model_cannot_take_a_shared_base_name(env: Env, adapter_dir: Path, base_dir: Path) -> None:
    acme = env.tenant("acme")
    error = assert_error(upload(env, acme, BASE, adapter_dir), 409, "conflict")
    assert error["param"] == "name"
    inside = fine_tune_top_layers(base_dir, env.allowed / "ft", layers=[0], seed=6)
    r = env.client.post("/v1/fine-tunes/from-path", json={"name": BASE, "path": str(inside)}, headers=acme)
    assert_error(r, 409, "conflict")
    with pytest.raises(DuplicateNameError):  # the CLI's way in
        env.zoo.register("acme", BASE, adapter_dir)
    assert env.model_count() == 1 and list(env.uploads.iterdir()) == []
    # Nor may an admin add a base under a name a tenant's model already has.
    assert finish(env, acme, upload(env, acme, "mine", adapter_dir))["status"] == "succeeded"
    r = env.client.post(
        "/admin/v1/base-models", json={"name": "mine", "path": str(inside)}, headers=env.admin()
    )
    assert_error(r, 409, "conflict")


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_what_a_tenant_sees_does_not_depend_on_other_tenants(
    env: Env, adapter_dir: Path, base_dir: Path, tmp_path: Path, kind: str
) -> None:
    folder = adapter_dir if kind == "lora" else fine_tune_top_layers(base_dir, tmp_path / "ft", [1], seed=5)
    first, second = env.tenant("first"), env.tenant("second")
    job_a = finish(env, first, upload(env, first, "a", folder))
    job_b = finish(env, second, upload(env, second, "b", folder))  # the very same weights
    assert job_a["status"] == job_b["status"] == "succeeded", (job_a, job_b)
    assert _mine(job_a["report"]) == _mine(job_b["report"])
    assert job_b["report"]["bytes_beyond_base"] > 0
    detail_a = env.client.get("/v1/fine-tunes/a", headers=first).json()
    detail_b = env.client.get("/v1/fine-tunes/b", headers=second).json()
    assert detail_a["dedup"] == detail_b["dedup"] and detail_a["chain"] == detail_b["chain"]
    listed = [env.client.get("/v1/fine-tunes", headers=h).json()["data"][0] for h in (first, second)]
    assert listed[0]["bytes_beyond_base"] == listed[1]["bytes_beyond_base"] > 0
    # The admin sees what each registration really added to the store: nothing, the second time.
    admin_a = env.client.get(f"/admin/v1/jobs/{job_a['id']}", headers=env.admin()).json()["report"]
    admin_b = env.client.get(f"/admin/v1/jobs/{job_b['id']}", headers=env.admin()).json()["report"]
    assert admin_a["bytes_new"] > 0 and admin_b["bytes_new"] == 0


def test_storage_quota_charges_what_the_model_references_beyond_the_base(env: Env, adapter_dir: Path) -> None:
    first = env.tenant("first")
    assert finish(env, first, upload(env, first, "a", adapter_dir))["status"] == "succeeded"
    # The second tenant stores nothing new, yet is charged as if it were the first.
    second = env.tenant("second", max_storage_bytes=1)
    assert finish(env, second, upload(env, second, "b", adapter_dir))["status"] == "succeeded"
    error = assert_error(upload(env, second, "c", adapter_dir), 429, "quota_exceeded")
    assert "max_storage_bytes" in error["message"]
    tenants = env.client.get("/admin/v1/tenants", headers=env.admin()).json()["data"]
    storage = {t["name"]: t["storage_bytes"] for t in tenants}
    assert storage["first"] == storage["second"] > 0


def test_the_migration_recharges_models_registered_before(env: Env, adapter_dir: Path) -> None:
    """Catalogs from before 0002 hold what each registration wrote (0 for the second tenant)."""
    first, second = env.tenant("first"), env.tenant("second")
    assert finish(env, first, upload(env, first, "a", adapter_dir))["status"] == "succeeded"
    assert finish(env, second, upload(env, second, "b", adapter_dir))["status"] == "succeeded"
    with env.zoo.sessions() as s, s.begin():
        charged = dict(
            s.execute(select(Model.name, Model.stored_bytes_new).where(Model.tenant_id.is_not(None))).all()
        )
        s.execute(update(Model).where(Model.name == "b").values(stored_bytes_new=0))
    url = str(factory_engine(env.zoo.sessions).url)
    migrate.downgrade(url, "0001")
    migrate.upgrade(url)
    with env.zoo.sessions() as s:
        after = dict(
            s.execute(select(Model.name, Model.stored_bytes_new).where(Model.tenant_id.is_not(None))).all()
        )
    assert after == charged and charged["a"] == charged["b"] > 0
