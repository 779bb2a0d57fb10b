"""Tenant model API: upload or point at a fine-tune, follow the job, list, inspect, delete; isolation; quotas.

The helpers at the top (`make_env`, `upload`, `finish`) are shared by the other router API tests.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from blockzoo.settings import Settings
from blockzoo.tiny_models import TinyModelCache
from router.auth import admin_key_digest
from router.errors import install_error_handlers
from router.jobs import JobOwner, JobRunner, build_jobs
from router.request_id import RequestIdMiddleware
from router.routes_admin import admin_router
from router.routes_models import models_router
from router.services import Services
from router.uploads import UploadLimits
from tests.zoo.test_lora_oracle import make_adapter
from tests.zoo.zoo_helpers import fine_tune_top_layers, open_zoo, store_files
from zoo.catalog.models import AuditLog, Model, Tenant
from zoo.errors import ShapeMismatchError
from zoo.registry import Progress, Zoo
from zoo.reports import RegistrationReport

ADMIN_KEY = "admin-secret-key"
BASE = "tiny-llama"
UPLOADABLE = (".json", ".safetensors", ".model", ".txt", ".jinja")


class Response(Protocol):
    """What the tests read of a response (TestClient's comes from httpx or httpx2, whichever is installed)."""

    @property
    def status_code(self) -> int: ...

    @property
    def text(self) -> str: ...

    def json(self) -> Any: ...


@dataclass
class Env:
    """An app on a real SQLite zoo with one base model registered."""

    client: TestClient
    zoo: Zoo
    jobs: JobRunner
    settings: Settings
    allowed: Path
    base_dir: Path

    @property
    def uploads(self) -> Path:
        return self.settings.data_dir / "uploads"

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_KEY}"}

    def tenant(self, name: str, **quotas: Any) -> dict[str, str]:
        """Create tenant `name` through the admin API; its auth header."""
        r = self.client.post("/admin/v1/tenants", json={"name": name, **quotas}, headers=self.admin())
        assert r.status_code == 201, r.text
        return {"Authorization": f"Bearer {r.json()['api_key']}"}

    def model_count(self) -> int:
        with self.zoo.sessions() as s:
            return int(s.scalar(select(func.count()).select_from(Model)) or 0)


def make_env(tmp_path: Path, base_dir: Path, limits: UploadLimits | None = None) -> Iterator[Env]:
    zoo = open_zoo(tmp_path / "zoo")
    zoo.add_base(BASE, base_dir)
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    settings = Settings(data_dir=tmp_path / "data")
    jobs = build_jobs(settings, zoo)
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)
    app.state.services = Services(settings, zoo, admin_key_digest(ADMIN_KEY))
    app.state.jobs = jobs
    app.include_router(admin_router([allowed]))
    app.include_router(models_router([allowed], limits or UploadLimits(8 << 20, 16 << 20)))
    try:
        with TestClient(app) as client:
            yield Env(client, zoo, jobs, settings, allowed, base_dir)
    finally:
        jobs.shutdown()


def upload(env: Env, headers: dict[str, str], name: str, folder: Path, **fields: str) -> Response:
    files = [
        ("files", (p.name, p.read_bytes(), "application/octet-stream"))
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name.endswith(UPLOADABLE)
    ]
    return env.client.post("/v1/fine-tunes", data={"name": name, **fields}, files=files, headers=headers)


def finish(env: Env, headers: dict[str, str], response: Response) -> dict[str, Any]:
    """Wait for the job `response` started and return it as the API shows it."""
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    env.jobs.wait(job_id, timeout=120)
    job = env.client.get(f"/v1/jobs/{job_id}", headers=headers)
    assert job.status_code == 200, job.text
    body: dict[str, Any] = job.json()
    return body


def assert_error(response: Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    return error


@pytest.fixture(scope="module")
def base_dir(tiny_model_factory: TinyModelCache) -> Path:
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def adapter_dir(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    return make_adapter(base_dir, tmp_path_factory.mktemp("adapter") / "ad", cfg, seed=3)


@pytest.fixture
def env(tmp_path: Path, base_dir: Path) -> Iterator[Env]:
    yield from make_env(tmp_path, base_dir)


def test_adapter_upload_registers_and_shows_its_chain(env: Env, adapter_dir: Path) -> None:
    acme = env.tenant("acme")
    accepted = upload(env, acme, "my-lora", adapter_dir)
    assert accepted.json()["status"] in ("queued", "running", "succeeded")
    job = finish(env, acme, accepted)
    assert job["status"] == "succeeded" and job["progress"] == 1.0 and job["error"] is None
    assert job["model"] == "my-lora" and job["report"]["kind"] == "lora"
    # One LoRA delta per adapted layer (q_proj and v_proj together), no new block.
    report = job["report"]
    assert report["deltas_total"] == 2 and report["blocks_shared_with_base"] == report["blocks_total"] == 4
    assert list(env.uploads.iterdir()) == []  # staging removed

    listed = env.client.get("/v1/fine-tunes", headers=acme).json()["data"]
    assert [(m["name"], m["kind"], m["status"]) for m in listed] == [("my-lora", "lora", "ready")]
    detail = env.client.get("/v1/fine-tunes/my-lora", headers=acme).json()
    assert detail["base"] == BASE and detail["tenant"] == "acme"
    chain = detail["chain"]
    assert [e["position"] for e in chain] == [0, 1, 2, 3]  # embed, 2 layers, head
    assert all(e["shared_with_base"] for e in chain)
    assert [len(e["deltas"]) for e in chain] == [0, 1, 1, 0]
    assert all(d["kind"] == "lora" and d["rank"] == 4 for e in chain for d in e["deltas"])
    assert detail["dedup"]["blocks_new"] == 0 and detail["dedup"]["deltas"] == 2
    assert detail["dedup"]["bytes_beyond_base"] == job["report"]["bytes_beyond_base"] > 0
    assert "bytes_new" not in job["report"]  # a zoo-wide figure: admins only

    with env.zoo.sessions() as s:
        actions = [(a.action, a.status) for a in s.scalars(select(AuditLog).order_by(AuditLog.id))]
    assert ("fine_tune.create", "accepted") in actions and ("model.register", "ok") in actions


def test_full_checkpoint_upload_stores_only_the_changed_layer(
    env: Env, base_dir: Path, tmp_path: Path
) -> None:
    acme = env.tenant("acme")
    folder = fine_tune_top_layers(base_dir, tmp_path / "ft", layers=[1], seed=5)
    job = finish(env, acme, upload(env, acme, "ft-1", folder))
    assert job["status"] == "succeeded", job
    detail = env.client.get("/v1/fine-tunes/ft-1", headers=acme).json()
    assert detail["kind"] == "full"
    # Layer 1 sits at chain position 2 and is the only block that differs from the base.
    assert [e["shared_with_base"] for e in detail["chain"]] == [True, True, False, True]
    assert detail["dedup"]["blocks_shared"] == 3 and detail["dedup"]["blocks_new"] == 1
    assert 0 < detail["dedup"]["bytes_beyond_base"] < detail["dedup"]["naive_bytes"]


def test_register_from_path_under_allowed_roots_only(env: Env, base_dir: Path, tmp_path: Path) -> None:
    acme = env.tenant("acme")
    inside = fine_tune_top_layers(base_dir, env.allowed / "ft", layers=[0], seed=6)
    outside = fine_tune_top_layers(base_dir, tmp_path / "outside", layers=[0], seed=6)
    (env.allowed / "escape").symlink_to(outside, target_is_directory=True)
    for path in (str(outside), str(env.allowed / "escape"), f"{env.allowed}/../outside", "relative/ft"):
        r = env.client.post("/v1/fine-tunes/from-path", json={"name": "p", "path": path}, headers=acme)
        assert_error(r, 400)
    r = env.client.post("/v1/fine-tunes/from-path", json={"name": "p", "path": str(inside)}, headers=acme)
    assert finish(env, acme, r)["status"] == "succeeded"
    assert inside.is_dir()  # a server folder is read, never removed


def test_failed_registration_is_a_failed_job_that_stores_nothing(
    env: Env, tiny_model_factory: TinyModelCache
) -> None:
    acme = env.tenant("acme")
    files, models = store_files(env.zoo), env.model_count()
    other_shape = tiny_model_factory("llama", intermediate_size=96)  # fits no registered base
    job = finish(env, acme, upload(env, acme, "orphan", other_shape))
    assert job["status"] == "failed" and job["report"] is None
    assert "base" in job["error"].lower()
    assert store_files(env.zoo) == files and env.model_count() == models
    assert list(env.uploads.iterdir()) == []
    assert env.client.get("/v1/fine-tunes", headers=acme).json()["data"] == []


def test_duplicate_name_is_a_conflict(env: Env, adapter_dir: Path) -> None:
    acme = env.tenant("acme")
    assert finish(env, acme, upload(env, acme, "dup", adapter_dir))["status"] == "succeeded"
    assert_error(upload(env, acme, "dup", adapter_dir), 409)
    assert list(env.uploads.iterdir()) == []


def test_tenants_cannot_see_or_touch_each_others_models(env: Env, adapter_dir: Path) -> None:
    a, b = env.tenant("tenant-a"), env.tenant("tenant-b")
    assert_error(upload(env, {}, "anon", adapter_dir), 401)
    assert list(env.uploads.iterdir()) == []
    accepted = upload(env, a, "secret", adapter_dir)
    job_id = finish(env, a, accepted)["id"]
    assert_error(env.client.get("/v1/fine-tunes/secret", headers=b), 404)
    assert_error(env.client.delete("/v1/fine-tunes/secret", headers=b), 404)
    assert_error(env.client.get(f"/v1/jobs/{job_id}", headers=b), 404)
    assert env.client.get("/v1/fine-tunes", headers=b).json()["data"] == []
    assert env.client.get("/v1/jobs", headers=b).json()["data"] == []
    # B may use the same name: names are per tenant.
    assert finish(env, b, upload(env, b, "secret", adapter_dir))["status"] == "succeeded"
    assert env.client.delete("/v1/fine-tunes/secret", headers=a).status_code == 200
    assert_error(env.client.get("/v1/fine-tunes/secret", headers=a), 404)
    assert env.client.get("/v1/fine-tunes/secret", headers=b).status_code == 200


def test_model_quota_refuses_further_uploads(env: Env, adapter_dir: Path) -> None:
    acme = env.tenant("acme", max_models=1)
    assert finish(env, acme, upload(env, acme, "one", adapter_dir))["status"] == "succeeded"
    error = assert_error(upload(env, acme, "two", adapter_dir), 429, "quota_exceeded")
    assert "max_models" in error["message"]
    r = env.client.post(
        "/v1/fine-tunes/from-path", json={"name": "x", "path": str(env.allowed)}, headers=acme
    )
    assert_error(r, 429, "quota_exceeded")
    assert list(env.uploads.iterdir()) == []
    # Deleting frees the slot.
    assert env.client.delete("/v1/fine-tunes/one", headers=acme).status_code == 200
    assert finish(env, acme, upload(env, acme, "two", adapter_dir))["status"] == "succeeded"


def test_storage_quota_refuses_uploads_once_used_up(env: Env, adapter_dir: Path) -> None:
    acme = env.tenant("acme", max_storage_bytes=1)
    assert finish(env, acme, upload(env, acme, "one", adapter_dir))["status"] == "succeeded"
    error = assert_error(upload(env, acme, "two", adapter_dir), 429, "quota_exceeded")
    assert "max_storage_bytes" in error["message"]


def test_job_reports_progress_while_running_and_the_error_when_it_fails(env: Env) -> None:
    acme = env.tenant("acme")
    with env.zoo.sessions() as s:
        tenant_id = s.scalar(select(Tenant.id).where(Tenant.name == "acme"))
    assert tenant_id is not None
    owner = JobOwner(tenant_id, "tenant:acme")
    reached, gate = threading.Event(), threading.Event()

    def task(progress: Progress) -> RegistrationReport:
        progress("hashing blocks", 0.5)
        progress("hashing blocks", 1.0)
        progress("writing blocks", 0.0)
        reached.set()
        gate.wait(30)
        raise ShapeMismatchError("layer 3 has the wrong shape")

    staging = env.uploads / "staged"
    staging.mkdir()
    job_id = env.jobs.create(owner, "slow")
    env.jobs.start(job_id, task, staging, owner, "model.register")
    assert reached.wait(30)
    running = env.client.get(f"/v1/jobs/{job_id}", headers=acme).json()
    assert running["status"] == "running" and running["stage"] == "writing blocks"
    assert 0 < running["progress"] < 1
    gate.set()
    env.jobs.wait(job_id, timeout=30)
    failed = env.client.get(f"/v1/jobs/{job_id}", headers=acme).json()
    assert failed["status"] == "failed" and failed["error"] == "layer 3 has the wrong shape"
    assert failed["stage"] is None and not staging.exists()


def test_restart_fails_interrupted_jobs_and_removes_their_staging(env: Env) -> None:
    acme = env.tenant("acme")
    with env.zoo.sessions() as s:
        tenant_id = s.scalar(select(Tenant.id).where(Tenant.name == "acme"))
    job_id = env.jobs.create(JobOwner(tenant_id, "tenant:acme"), "lost")
    (env.jobs.staging_dir(job_id) / "sub").mkdir(parents=True)
    (env.uploads / "incoming-abc").mkdir()
    restarted = build_jobs(env.settings, env.zoo)
    try:
        assert list(env.uploads.iterdir()) == []
        job = env.client.get(f"/v1/jobs/{job_id}", headers=acme).json()
        assert job["status"] == "failed" and "interrupted" in job["error"]
    finally:
        restarted.shutdown()
