"""Hostile registrations: a symlink swapped in after a from-path request, hostile values in paths, ids,
quotas and uploaded JSON, hostile LoRA numbers. Each gets a clean 4xx (never a 500, never a traceback
in the log), and failed jobs tell the tenant nothing about server paths.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import select

from blockzoo.tiny_models import TinyModelCache
from router.errors import APIError
from router.jobs import JobOwner
from router.path_import import copy_into_staging
from router.uploads import UploadLimits
from runtime.errors import BlockZooError
from tests.router.live_server import serve
from tests.router.test_tenant_models_api import BASE as BASE_NAME
from tests.router.test_tenant_models_api import Env, assert_error, finish, make_env, upload
from tests.zoo.test_lora_oracle import make_adapter
from tests.zoo.zoo_helpers import fine_tune_top_layers
from zoo.catalog.models import Tenant
from zoo.catalog.tenants import InvalidQuota, TenantQuotas
from zoo.errors import ShapeMismatchError
from zoo.registry import Progress
from zoo.reports import RegistrationReport
from zoo.splitter import split_checkpoint

DEEP = 100_000
HUGE_INT = "9" * 5000


@pytest.fixture(scope="module")
def base_dir(tiny_model_factory: TinyModelCache) -> Path:
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def adapter_dir(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    return make_adapter(base_dir, tmp_path_factory.mktemp("adapter") / "ad", cfg, seed=3)


@pytest.fixture
def env(tmp_path: Path, base_dir: Path) -> Iterator[Env]:
    yield from make_env(tmp_path, base_dir, UploadLimits(8 << 20, 16 << 20))


@pytest.fixture
def no_tracebacks(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fails the test if anything logged at ERROR (a 500's traceback) while it ran."""
    caplog.set_level(logging.ERROR)
    yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [f"{r.name}: {r.getMessage()}" for r in errors]


def _block_worker(env: Env) -> threading.Event:
    """Occupy the job runner's only worker until the returned event is set, so the next job waits."""
    with env.zoo.sessions() as s:
        tenant_id = s.scalar(select(Tenant.id).where(Tenant.name == "acme"))
    owner = JobOwner(tenant_id, "tenant:acme")
    gate, reached = threading.Event(), threading.Event()

    def hold(_: Progress) -> RegistrationReport:
        reached.set()
        gate.wait(60)
        raise ShapeMismatchError("placeholder job")

    job_id = env.jobs.create(owner, "placeholder")
    env.jobs.start(job_id, hold, None, owner, "model.register")
    assert reached.wait(30)
    return gate


def _copy_of(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


# -- from-path: what was checked is what is registered --------------------------------------------


def test_symlink_swapped_in_after_a_from_path_request_is_never_read(
    env: Env, base_dir: Path, tmp_path: Path
) -> None:
    acme = env.tenant("acme")
    inside = fine_tune_top_layers(base_dir, env.allowed / "ft", layers=[0], seed=6)
    checked = _copy_of(inside, tmp_path / "checked")
    outside = fine_tune_top_layers(base_dir, tmp_path / "outside", layers=[0, 1], seed=99)
    gate = _block_worker(env)
    try:
        r = env.client.post("/v1/fine-tunes/from-path", json={"name": "p", "path": str(inside)}, headers=acme)
        assert r.status_code == 202, r.text
        # The job has not run yet: swap every weight file for a symlink to weights outside the roots.
        for weights in inside.glob("*.safetensors"):
            weights.unlink()
            weights.symlink_to(outside / weights.name)
    finally:
        gate.set()
    job = finish(env, acme, r)
    assert job["status"] == "succeeded", job
    registered = [e.block_id for e in env.zoo.resolve("acme", "p").entries]
    assert registered == split_checkpoint(checked).block_ids
    assert registered != split_checkpoint(outside).block_ids


def test_from_path_refuses_symlinked_files_and_other_non_regular_entries(
    env: Env, base_dir: Path, tmp_path: Path, no_tracebacks: None
) -> None:
    acme = env.tenant("acme")
    inside = fine_tune_top_layers(base_dir, env.allowed / "ft", layers=[0], seed=6)
    target = _copy_of(inside, env.allowed / "target")
    config = inside / "config.json"
    config.unlink()
    config.symlink_to(target / "config.json")  # inside the roots, but a link all the same
    r = env.client.post("/v1/fine-tunes/from-path", json={"name": "p", "path": str(inside)}, headers=acme)
    error = assert_error(r, 400)
    assert "config.json" in error["message"] and str(env.allowed) not in error["message"]
    config.unlink()
    os.mkfifo(config)  # a reader would block forever on a FIFO
    r = env.client.post("/v1/fine-tunes/from-path", json={"name": "p", "path": str(inside)}, headers=acme)
    assert_error(r, 400)
    assert list(env.uploads.iterdir()) == []


def test_from_path_over_the_size_limits_is_413(base_dir: Path, tmp_path: Path, no_tracebacks: None) -> None:
    for env in make_env(tmp_path, base_dir, UploadLimits(max_file_bytes=200_000, max_upload_bytes=800_000)):
        acme = env.tenant("acme")
        inside = fine_tune_top_layers(base_dir, env.allowed / "ft", layers=[0], seed=6)
        r = env.client.post("/v1/fine-tunes/from-path", json={"name": "p", "path": str(inside)}, headers=acme)
        assert_error(r, 413)
        assert list(env.uploads.iterdir()) == []


@pytest.mark.parametrize("suffix", ["/a\x00b", "/" + "x" * 300, "/" + "y" * 300 + "/z"])
def test_from_path_nul_bytes_and_overlong_names_are_400(env: Env, suffix: str, no_tracebacks: None) -> None:
    acme = env.tenant("acme")
    r = env.client.post(
        "/v1/fine-tunes/from-path", json={"name": "p", "path": f"{env.allowed}{suffix}"}, headers=acme
    )
    error = assert_error(r, 400)
    assert str(env.allowed) not in error["message"]
    r = env.client.post(
        "/admin/v1/base-models", json={"name": "b", "path": f"{env.allowed}{suffix}"}, headers=env.admin()
    )
    assert_error(r, 400)


# -- integers out of any range -------------------------------------------------------------------


@pytest.mark.parametrize("job_id", [2**63, 2**31, -(2**63) - 1, 0])
def test_hostile_job_ids_are_4xx(env: Env, job_id: int, no_tracebacks: None) -> None:
    acme = env.tenant("acme")
    r = env.client.get(f"/v1/jobs/{job_id}", headers=acme)
    assert 400 <= r.status_code < 500, r.text
    r = env.client.get(f"/admin/v1/jobs/{job_id}", headers=env.admin())
    assert 400 <= r.status_code < 500, r.text


@pytest.mark.parametrize(
    "field", ["requests_per_minute", "tokens_per_minute", "max_concurrent", "max_models", "max_storage_bytes"]
)
def test_quota_of_2_to_the_70_is_4xx(env: Env, field: str, no_tracebacks: None) -> None:
    r = env.client.post("/admin/v1/tenants", json={"name": "big", field: 2**70}, headers=env.admin())
    error = assert_error(r, 422)
    assert error["param"] == field
    env.tenant("small")
    r = env.client.patch("/admin/v1/tenants/small", json={field: 2**70}, headers=env.admin())
    assert_error(r, 422)
    r = env.client.patch("/admin/v1/tenants/small", json={field: 2**31 - 1}, headers=env.admin())
    assert r.status_code == 200, r.text


# -- hostile JSON in uploaded files ----------------------------------------------------------------


def _safetensors_with_header(header: str) -> bytes:
    raw = header.encode()
    return struct.pack("<Q", len(raw)) + raw


HOSTILE_JSON = {"deep": "[" * DEEP + "]" * DEEP, "huge int": '{"x": ' + HUGE_INT + "}"}


@pytest.mark.parametrize("what", sorted(HOSTILE_JSON))
@pytest.mark.parametrize("file", ["config.json", "adapter_config.json", "model.safetensors"])
def test_hostile_json_in_uploaded_files_is_400(
    env: Env, base_dir: Path, adapter_dir: Path, tmp_path: Path, what: str, file: str, no_tracebacks: None
) -> None:
    acme = env.tenant("acme")
    source = adapter_dir if file == "adapter_config.json" else base_dir
    folder = _copy_of(source, tmp_path / "hostile")
    text = HOSTILE_JSON[what]
    if file == "model.safetensors":
        (folder / file).write_bytes(_safetensors_with_header(text))
    else:
        (folder / file).write_text(text)
    error = assert_error(upload(env, acme, "hostile", folder), 400)
    assert file in error["message"]
    assert list(env.uploads.iterdir()) == []


# -- hostile LoRA numbers --------------------------------------------------------------------------


def _adapter_with(adapter_dir: Path, dest: Path, **changes: Any) -> Path:
    folder = _copy_of(adapter_dir, dest)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"lora_alpha": 1e308}, "lora_alpha"),
        ({"lora_alpha": 1e308, "use_rslora": True}, "lora_alpha"),
        ({"r": "four"}, "r"),
        ({"r": 0}, "r"),
        ({"r": True}, "r"),
        ({"lora_alpha": "eight"}, "lora_alpha"),
        ({"alpha_pattern": {"q_proj": 1e308}}, "alpha_pattern"),
        ({"rank_pattern": {"q_proj": "x"}}, "rank_pattern"),
    ],
)
def test_hostile_lora_numbers_are_refused_at_registration_naming_the_field(
    env: Env, adapter_dir: Path, tmp_path: Path, changes: dict[str, Any], field: str, no_tracebacks: None
) -> None:
    acme = env.tenant("acme")
    folder = _adapter_with(adapter_dir, tmp_path / "ad", **changes)
    error = assert_error(upload(env, acme, "lora", folder), 400)
    assert field in error["message"] and error["param"] == field
    assert env.model_count() == 1


def test_hostile_lora_is_refused_by_the_zoo_itself(env: Env, adapter_dir: Path, tmp_path: Path) -> None:
    """The CLI registers through the zoo without the API's checks: the zoo refuses it too."""
    env.tenant("acme")
    folder = _adapter_with(adapter_dir, tmp_path / "ad", lora_alpha=1e308)
    with pytest.raises(BlockZooError) as caught:
        env.zoo.register("acme", "lora", folder)
    assert "lora_alpha" in str(caught.value)
    (folder / "adapter_config.json").write_text(HOSTILE_JSON["deep"])
    with pytest.raises(BlockZooError, match=r"adapter_config\.json"):
        env.zoo.register("acme", "lora", folder)


# -- failed jobs do not show server paths ----------------------------------------------------------


def test_a_failed_job_error_shows_no_server_path(
    env: Env, adapter_dir: Path, tmp_path: Path, no_tracebacks: None
) -> None:
    acme = env.tenant("acme")
    folder = _copy_of(adapter_dir, tmp_path / "empty-adapter")
    (folder / "adapter_model.safetensors").write_bytes(_safetensors_with_header("{}"))
    job = finish(env, acme, upload(env, acme, "empty", folder))
    assert job["status"] == "failed", job
    assert "adapter_model.safetensors" in job["error"]
    assert "/" not in job["error"], job["error"]
    assert str(env.settings.data_dir) not in json.dumps(job)


def test_a_registration_after_the_job_runner_stopped_is_503_and_leaves_nothing(
    env: Env, base_dir: Path, no_tracebacks: None
) -> None:
    acme = env.tenant("acme")
    inside = fine_tune_top_layers(base_dir, env.allowed / "ft", layers=[0], seed=6)
    env.jobs.shutdown()  # what a stopping server has done before its last requests are answered
    r = env.client.post("/v1/fine-tunes/from-path", json={"name": "late", "path": str(inside)}, headers=acme)
    assert_error(r, 503, "shutting_down")
    assert list(env.uploads.iterdir()) == []
    jobs = env.jobs.list(None)
    assert [(j.model, j.status) for j in jobs] == [("late", "failed")]


@pytest.mark.parametrize("value", ["inf", "nan", "1e400", "-1", "11"])
def test_non_finite_or_out_of_range_substitute_within_is_4xx(
    env: Env, base_dir: Path, value: str, no_tracebacks: None
) -> None:
    acme = env.tenant("acme")
    error = assert_error(upload(env, acme, "ft", base_dir, substitute_within=value), 400)
    assert error["param"] == "substitute_within"
    inside = fine_tune_top_layers(base_dir, env.allowed / "ft", layers=[0], seed=6)
    number = {"inf": "Infinity", "nan": "NaN"}.get(value, value)
    body = f'{{"name": "ft", "path": "{inside}", "substitute_within": {number}}}'
    r = env.client.post(
        "/v1/fine-tunes/from-path", content=body, headers={**acme, "Content-Type": "application/json"}
    )
    assert 400 <= r.status_code < 500, r.text
    assert list(env.uploads.iterdir()) == []


def test_hostile_values_keep_the_keep_alive_connection_on_a_live_server(
    env: Env, base_dir: Path, tmp_path: Path, no_tracebacks: None
) -> None:
    """A 500 made uvicorn drop the connection; every hostile value now answers 4xx on the same socket."""
    acme = env.tenant("acme")
    deep = _copy_of(base_dir, env.allowed / "deep")
    (deep / "config.json").write_text(HOSTILE_JSON["deep"])
    requests: list[tuple[str, str, dict[str, Any] | None, dict[str, str]]] = [
        ("GET", f"/v1/jobs/{2**63}", None, acme),
        ("GET", f"/admin/v1/jobs/{2**63}", None, env.admin()),
        ("POST", "/admin/v1/tenants", {"name": "big", "max_storage_bytes": 2**70}, env.admin()),
        ("PATCH", "/admin/v1/tenants/acme", {"tokens_per_minute": 2**70}, env.admin()),
        ("POST", "/v1/fine-tunes/from-path", {"name": "p", "path": f"{env.allowed}/a\x00b"}, acme),
        ("POST", "/v1/fine-tunes/from-path", {"name": "p", "path": f"{env.allowed}/{'x' * 300}"}, acme),
        ("POST", "/v1/fine-tunes/from-path", {"name": "p", "path": f"{env.allowed}/deep"}, acme),
        ("POST", "/v1/fine-tunes/from-path", {"name": BASE_NAME, "path": str(base_dir)}, acme),
    ]
    app = env.client.app
    assert isinstance(app, FastAPI)
    with serve(app) as url:
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.connect()
            sock = conn.sock
            for method, path, body, headers in requests:
                payload = json.dumps(body) if body is not None else None
                conn.request(
                    method, path, body=payload, headers={**headers, "Content-Type": "application/json"}
                )
                response = conn.getresponse()
                text = response.read().decode()
                assert 400 <= response.status < 500, (path, response.status, text)
                assert str(env.allowed) not in text and str(tmp_path) not in text, text
                assert conn.sock is sock, f"{method} {path} dropped the connection"
        finally:
            conn.close()


def test_staging_copy_checks_where_the_opened_folder_really_is(base_dir: Path, tmp_path: Path) -> None:
    """The folder is resolved, then opened: a parent swapped for a link in between must not lead outside."""
    roots = [tmp_path / "roots"]
    roots[0].mkdir()
    outside = fine_tune_top_layers(base_dir, tmp_path / "outside" / "ft", layers=[0], seed=6)
    (roots[0] / "swapped").symlink_to(outside.parent, target_is_directory=True)
    limits = UploadLimits(8 << 20, 16 << 20)
    with pytest.raises(APIError) as caught:
        copy_into_staging(roots[0] / "swapped" / "ft", roots, tmp_path / "staging", limits)
    assert caught.value.status == 400 and "outside" in caught.value.message
    assert not (tmp_path / "staging").exists()
    inside = fine_tune_top_layers(base_dir, roots[0] / "ft", layers=[0], seed=6)
    model_files = sorted(p.name for p in inside.iterdir())
    (inside / "additional_chat_templates").mkdir()
    (inside / "additional_chat_templates" / "tools.jinja").write_text("{{ messages }}")
    (inside / "other").mkdir()
    (inside / "other" / "config.json").write_text("{}")
    (inside / "README.md").write_text("not a model file")
    copied = copy_into_staging(inside, roots, tmp_path / "staging", limits)
    assert sorted(copied) == sorted([*model_files, "additional_chat_templates/tools.jinja"])
    assert (
        tmp_path / "staging" / "additional_chat_templates" / "tools.jinja"
    ).read_text() == "{{ messages }}"
    assert not (tmp_path / "staging" / "other").exists()
    # A link among the extra templates is refused like any other.
    (inside / "additional_chat_templates" / "evil.jinja").symlink_to(outside / "config.json")
    with pytest.raises(APIError) as caught:
        copy_into_staging(inside, roots, tmp_path / "staging2", limits)
    assert caught.value.status == 400 and "evil.jinja" in caught.value.message
    assert not (tmp_path / "staging2").exists()


@pytest.mark.parametrize(
    ("field", "value"), [("max_models", 2**31), ("max_storage_bytes", 2**70), ("max_concurrent", -1)]
)
def test_the_catalog_refuses_quotas_it_cannot_store(field: str, value: int) -> None:
    """The CLI sets quotas through the catalog without the API's schema: the catalog bounds them too."""
    with pytest.raises(InvalidQuota, match=field):
        TenantQuotas(**{field: value})
