"""Admin API: auth, tenants, keys, base models from server paths, every model, usage, stats, gc, audit."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from blockzoo.tiny_models import TinyModelCache
from tests.router.test_tenant_models_api import BASE, Env, assert_error, finish, make_env, upload
from tests.zoo.test_lora_oracle import make_adapter
from tests.zoo.zoo_helpers import store_files
from zoo.catalog.models import Block, Model, Usage


@pytest.fixture(scope="module")
def base_dir(tiny_model_factory: TinyModelCache) -> Path:
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def adapter_dir(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = {"r": 2, "lora_alpha": 4, "target_modules": ["o_proj"]}
    return make_adapter(base_dir, tmp_path_factory.mktemp("adapter") / "ad", cfg, seed=7)


@pytest.fixture
def env(tmp_path: Path, base_dir: Path) -> Iterator[Env]:
    yield from make_env(tmp_path, base_dir)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/admin/v1/tenants"),
        ("POST", "/admin/v1/gc"),
        ("GET", "/admin/v1/models"),
        ("GET", "/admin/v1/audit"),
    ],
)
def test_admin_routes_need_the_admin_key(env: Env, method: str, path: str) -> None:
    tenant_key = env.tenant("acme")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic xyz"}, tenant_key):
        error = assert_error(env.client.request(method, path, headers=headers), 401)
        assert error["type"] == "authentication_error"
    assert env.client.request(method, path, headers=env.admin()).status_code == 200


def test_tenant_lifecycle(env: Env, adapter_dir: Path) -> None:
    admin = env.admin()
    created = env.client.post(
        "/admin/v1/tenants", json={"name": "acme", "tokens_per_minute": 500}, headers=admin
    )
    assert created.status_code == 201
    body = created.json()
    assert body["api_key"].startswith("bz-") and body["tenant"]["name"] == "acme"
    assert body["quotas"]["tokens_per_minute"] == 500 and body["quotas"]["max_models"] is None
    key = {"Authorization": f"Bearer {body['api_key']}"}
    assert_error(env.client.post("/admin/v1/tenants", json={"name": "acme"}, headers=admin), 409)
    assert_error(env.client.post("/admin/v1/tenants", json={"name": "Bad Name!"}, headers=admin), 400)
    assert_error(
        env.client.post("/admin/v1/tenants", json={"name": "x", "max_models": -1}, headers=admin), 422
    )
    assert [t["name"] for t in env.client.get("/admin/v1/tenants", headers=admin).json()["data"]] == ["acme"]

    # PATCH changes only the fields sent.
    patched = env.client.patch("/admin/v1/tenants/acme", json={"max_models": 3}, headers=admin).json()
    assert patched["quotas"]["max_models"] == 3 and patched["quotas"]["tokens_per_minute"] == 500
    assert env.client.patch("/admin/v1/tenants/acme", json={"disabled": True}, headers=admin).json()[
        "disabled"
    ]
    assert_error(env.client.get("/v1/fine-tunes", headers=key), 401)
    env.client.patch("/admin/v1/tenants/acme", json={"disabled": False}, headers=admin)
    assert env.client.get("/v1/fine-tunes", headers=key).status_code == 200

    # A tenant that owns models cannot be deleted.
    assert finish(env, key, upload(env, key, "m", adapter_dir))["status"] == "succeeded"
    one = env.client.get("/admin/v1/tenants/acme", headers=admin).json()
    assert one["models"] == 1 and one["storage_bytes"] > 0 and one["active_keys"] == 1
    assert_error(env.client.delete("/admin/v1/tenants/acme", headers=admin), 409)
    env.client.delete("/v1/fine-tunes/m", headers=key)
    assert env.client.delete("/admin/v1/tenants/acme", headers=admin).json()["deleted"] is True
    assert_error(env.client.get("/admin/v1/tenants/acme", headers=admin), 404)
    assert_error(env.client.get("/v1/fine-tunes", headers=key), 401)


def test_keys_create_list_and_revoke(env: Env) -> None:
    admin = env.admin()
    first = env.tenant("acme")
    made = env.client.post("/admin/v1/tenants/acme/keys", json={"name": "ci"}, headers=admin)
    assert made.status_code == 201
    second_key, prefix = made.json()["api_key"], made.json()["prefix"]
    assert second_key.startswith(prefix)
    second = {"Authorization": f"Bearer {second_key}"}
    assert env.client.get("/v1/fine-tunes", headers=second).status_code == 200

    listed = env.client.get("/admin/v1/tenants/acme/keys", headers=admin).json()["data"]
    assert sorted(k["name"] for k in listed) == ["ci", "default"]
    assert all(set(k) == {"prefix", "name", "created_at", "last_used_at"} for k in listed)
    assert second_key not in str(listed)

    assert env.client.delete(f"/admin/v1/tenants/acme/keys/{prefix}", headers=admin).status_code == 200
    assert_error(env.client.get("/v1/fine-tunes", headers=second), 401, "invalid_api_key")
    assert env.client.get("/v1/fine-tunes", headers=first).status_code == 200
    assert_error(env.client.delete(f"/admin/v1/tenants/acme/keys/{prefix}", headers=admin), 404)
    assert_error(env.client.post("/admin/v1/tenants/nobody/keys", json={}, headers=admin), 404)


def test_base_models_register_from_allowed_paths_only(env: Env, tmp_path: Path, adapter_dir: Path) -> None:
    admin = env.admin()
    other = shutil.copytree(env.base_dir, tmp_path / "outside-base")
    for path in (str(other), f"{env.allowed}/../outside-base", "/etc", "not/absolute"):
        r = env.client.post("/admin/v1/base-models", json={"name": "b2", "path": path}, headers=admin)
        assert_error(r, 400)

    # A base named like an existing one is a conflict; a new name registers as a job.
    source = env.allowed / "base2"
    shutil.copytree(env.base_dir, source)
    r = env.client.post("/admin/v1/base-models", json={"name": BASE, "path": str(source)}, headers=admin)
    assert_error(r, 409)
    r = env.client.post(
        "/admin/v1/base-models", json={"name": "base-two", "path": str(source)}, headers=admin
    )
    assert r.status_code == 202
    env.jobs.wait(r.json()["id"], timeout=60)
    job = env.client.get(f"/admin/v1/jobs/{r.json()['id']}", headers=admin).json()
    assert job["status"] == "succeeded" and job["report"]["kind"] == "base"
    bases = {b["name"]: b for b in env.client.get("/admin/v1/base-models", headers=admin).json()["data"]}
    assert set(bases) == {BASE, "base-two"} and bases[BASE]["fine_tunes"] == 0

    # A base with fine-tunes on it cannot be deleted; an unused one can.
    acme = env.tenant("acme")
    finish(env, acme, upload(env, acme, "ad", adapter_dir, base=BASE))
    assert env.client.get("/admin/v1/base-models", headers=admin).json()["data"][1]["fine_tunes"] == 1
    assert_error(env.client.delete(f"/admin/v1/base-models/{BASE}", headers=admin), 409)
    assert env.client.delete("/admin/v1/base-models/base-two", headers=admin).status_code == 200
    assert_error(env.client.delete("/admin/v1/base-models/base-two", headers=admin), 404)


def test_models_usage_stats_gc_and_audit(env: Env, adapter_dir: Path) -> None:
    admin = env.admin()
    acme = env.tenant("acme")
    finish(env, acme, upload(env, acme, "ad", adapter_dir))
    models = env.client.get("/admin/v1/models", headers=admin).json()["data"]
    by_name = {(m["tenant"], m["name"]): m for m in models}
    assert set(by_name) == {(None, BASE), ("acme", "ad")}
    assert by_name[("acme", "ad")]["kind"] == "lora" and by_name[(None, BASE)]["kind"] == "base"
    assert by_name[(None, BASE)]["naive_bytes"] > 0

    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    with env.zoo.sessions() as s, s.begin():
        model = s.scalar(select(Model).where(Model.name == "ad"))
        assert model is not None and model.tenant_id is not None
        for hours_ago, tokens in ((0, 10), (5, 7)):
            s.add(Usage(tenant_id=model.tenant_id, model_id=model.id, hour=now - timedelta(hours=hours_ago),
                        prompt_tokens=tokens, completion_tokens=1, requests=1))  # fmt: skip
    usage = env.client.get("/admin/v1/usage", params={"tenant": "acme"}, headers=admin).json()["data"]
    assert [(u["model"], u["prompt_tokens"]) for u in usage] == [("ad", 10), ("ad", 7)]
    since = (now - timedelta(hours=1)).isoformat()
    recent = env.client.get("/admin/v1/usage", params={"since": since}, headers=admin).json()["data"]
    assert [u["prompt_tokens"] for u in recent] == [10]
    assert env.client.get("/admin/v1/usage", params={"tenant": "nobody"}, headers=admin).json()["data"] == []

    stats = env.client.get("/admin/v1/stats", headers=admin).json()
    with env.zoo.sessions() as s:
        assert stats["models"] == s.scalar(select(func.count()).select_from(Model)) == 2
        assert stats["blocks"] == s.scalar(select(func.count()).select_from(Block))

    # Deleting leaves the adapter's delta files until gc removes them.
    before = store_files(env.zoo)
    env.client.delete("/v1/fine-tunes/ad", headers=acme)
    gc = env.client.post("/admin/v1/gc", headers=admin).json()
    assert gc["removed_deltas"] == 2 and gc["freed_bytes"] > 0
    assert len(store_files(env.zoo)) == len(before) - 2

    audit = env.client.get("/admin/v1/audit", headers=admin).json()["data"]
    actions = [a["action"] for a in audit]
    assert actions[0] == "zoo.gc"  # newest first
    assert {"tenant.create", "fine_tune.create", "model.register", "model.delete"} <= set(actions)
    only = env.client.get("/admin/v1/audit", params={"action": "model.delete"}, headers=admin).json()["data"]
    assert [(a["action"], a["tenant"], a["model"]) for a in only] == [("model.delete", "acme", "ad")]
