"""Uploads: streamed to disk intact, size limits (413), file-name and content checks (400), no leftovers."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from safetensors.torch import save_file
from sqlalchemy import func, select

from blockzoo.tiny_models import TinyModelCache
from router.errors import APIError, install_error_handlers
from router.uploads import UploadLimits, check_file_name, check_safetensors, receive_upload
from tests.router.test_tenant_models_api import Env, assert_error, make_env, upload
from tests.zoo.test_lora_oracle import make_adapter
from tests.zoo.zoo_helpers import store_files
from zoo.catalog.models import AuditLog, RegistrationJob

BOUNDARY = "bz-test-boundary"


def multipart(fields: dict[str, str], files: list[tuple[str, bytes]]) -> bytes:
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    ]
    for name, data in files:
        head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n\r\n'
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{BOUNDARY}--\r\n".encode())
    return b"".join(parts)


def chunks(body: bytes, size: int = 65536) -> Iterator[bytes]:
    """The body as a chunked stream: no Content-Length, so limits must hold while reading."""
    for i in range(0, len(body), size):
        yield body[i : i + size]


CONTENT_TYPE = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


@pytest.fixture(scope="module")
def base_dir(tiny_model_factory: TinyModelCache) -> Path:
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def adapter_dir(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    return make_adapter(base_dir, tmp_path_factory.mktemp("adapter") / "ad", cfg, seed=11)


@pytest.fixture
def env(tmp_path: Path, base_dir: Path) -> Iterator[Env]:
    # The tiny checkpoint's weights (~550 KB) fit the upload limit but not the per-file one.
    yield from make_env(tmp_path, base_dir, UploadLimits(max_file_bytes=200_000, max_upload_bytes=800_000))


def _nothing_left(env: Env, files_before: set[str]) -> None:
    assert list(env.uploads.iterdir()) == []
    assert store_files(env.zoo) == files_before
    assert env.model_count() == 1  # the base only
    with env.zoo.sessions() as s:
        assert s.scalar(select(func.count()).select_from(RegistrationJob)) == 0


def test_truncated_safetensors_is_refused_before_any_job(env: Env, adapter_dir: Path, tmp_path: Path) -> None:
    acme = env.tenant("acme")
    files = store_files(env.zoo)
    bad = shutil.copytree(adapter_dir, tmp_path / "bad")
    weights = bad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    error = assert_error(upload(env, acme, "bad", bad), 400, "invalid_upload")
    assert "adapter_model.safetensors" in error["message"] and "truncated" in error["message"]
    _nothing_left(env, files)


def test_config_that_is_not_json_is_refused(env: Env, adapter_dir: Path, tmp_path: Path) -> None:
    acme = env.tenant("acme")
    files = store_files(env.zoo)
    bad = shutil.copytree(adapter_dir, tmp_path / "bad")
    (bad / "adapter_config.json").write_text("{not json")
    assert "adapter_config.json" in assert_error(upload(env, acme, "bad", bad), 400)["message"]
    _nothing_left(env, files)


def test_file_over_the_per_file_limit_is_413(env: Env, base_dir: Path) -> None:
    acme = env.tenant("acme")
    files = store_files(env.zoo)
    error = assert_error(upload(env, acme, "big", base_dir), 413, "upload_too_large")
    assert "model.safetensors" in error["message"] and "200000" in error["message"]
    _nothing_left(env, files)


def test_body_over_the_upload_limit_is_413_with_or_without_content_length(env: Env) -> None:
    acme = env.tenant("acme")
    files = store_files(env.zoo)
    # Six files under the per-file limit, together over the upload limit.
    body = multipart({"name": "m"}, [(f"part-{i}.safetensors", os.urandom(150_000)) for i in range(6)])
    headers = {**acme, **CONTENT_TYPE}
    assert_error(env.client.post("/v1/fine-tunes", content=body, headers=headers), 413)
    assert_error(env.client.post("/v1/fine-tunes", content=chunks(body), headers=headers), 413)
    _nothing_left(env, files)


@pytest.mark.parametrize(
    "name",
    [
        "../adapter_config.json",
        "sub/adapter_config.json",
        "a\\b.json",
        ".hidden.json",
        "model.bin",
        "README.md",
        "",
    ],
)
def test_unsafe_or_unexpected_file_names_are_400(env: Env, name: str) -> None:
    acme = env.tenant("acme")
    files = store_files(env.zoo)
    body = multipart({"name": "m"}, [("adapter_config.json", b"{}"), (name, b"x" * 10)])
    r = env.client.post("/v1/fine-tunes", content=body, headers={**acme, **CONTENT_TYPE})
    error = assert_error(r, 400, "invalid_upload")
    assert error["param"] == "files" and repr(name) in error["message"]
    _nothing_left(env, files)


@pytest.mark.parametrize(
    ("fields", "files", "status"),
    [
        ({}, [("adapter_config.json", b"{}")], 400),  # no name
        ({"name": "m"}, [], 400),  # no files
        ({"name": "m", "colour": "red"}, [("adapter_config.json", b"{}")], 400),  # unknown field
        ({"name": "../m"}, [("adapter_config.json", b"{}")], 400),  # bad model name
        ({"name": "m"}, [("notes.txt", b"hello")], 400),  # not a model folder
        ({"name": "m"}, [("config.json", b"{}")], 400),  # checkpoint without weights
        ({"name": "m"}, [("a.json", b"{}"), ("a.json", b"{}")], 400),  # same file twice
    ],
)
def test_malformed_forms_are_400(
    env: Env, fields: dict[str, str], files: list[tuple[str, bytes]], status: int
) -> None:
    acme = env.tenant("acme")
    before = store_files(env.zoo)
    body = multipart(fields, files)
    assert_error(env.client.post("/v1/fine-tunes", content=body, headers={**acme, **CONTENT_TYPE}), status)
    _nothing_left(env, before)


def test_options_for_adapters_and_non_multipart_bodies_are_refused(env: Env, adapter_dir: Path) -> None:
    acme = env.tenant("acme")
    before = store_files(env.zoo)
    assert_error(upload(env, acme, "m", adapter_dir, compress_delta="true"), 400)
    assert_error(upload(env, acme, "m", adapter_dir, substitute_within="lots"), 400)
    assert_error(env.client.post("/v1/fine-tunes", json={"name": "m"}, headers=acme), 415)
    _nothing_left(env, before)
    with env.zoo.sessions() as s:  # refusals are audited
        assert s.scalar(select(func.count()).select_from(AuditLog).where(AuditLog.status == "rejected")) == 3


# -- the streaming receiver on its own -----------------------------------------------------------------


def _receiver_app(dest: Path, limits: UploadLimits) -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/up")
    async def up(request: Request) -> dict[str, object]:
        got = await receive_upload(request, dest, limits)
        digests = {n: hashlib.sha256((dest / n).read_bytes()).hexdigest() for n in got.files}
        return {"fields": got.fields, "digests": digests}

    return TestClient(app)


def test_streamed_files_arrive_intact(tmp_path: Path) -> None:
    big, small, empty = os.urandom(3 << 20), os.urandom(1000), b""
    body = multipart(
        {"name": "x", "base": "b"}, [("a.safetensors", big), ("b.json", small), ("c.txt", empty)]
    )
    client = _receiver_app(tmp_path / "up", UploadLimits(4 << 20, 8 << 20))
    r = client.post("/up", content=chunks(body, 50_000), headers=CONTENT_TYPE)
    assert r.status_code == 200, r.text
    assert r.json()["fields"] == {"name": "x", "base": "b"}
    assert r.json()["digests"] == {n: hashlib.sha256(d).hexdigest() for n, d in
                                   (("a.safetensors", big), ("b.json", small), ("c.txt", empty))}  # fmt: skip


def test_receiver_removes_partial_files_when_a_limit_is_hit(tmp_path: Path) -> None:
    dest = tmp_path / "up"
    body = multipart(
        {"name": "x"}, [("a.safetensors", os.urandom(2 << 20)), ("b.safetensors", os.urandom(5 << 20))]
    )
    r = _receiver_app(dest, UploadLimits(4 << 20, 64 << 20)).post(
        "/up", content=chunks(body), headers=CONTENT_TYPE
    )
    assert_error(r, 413)
    assert not dest.exists()


# -- cheap content checks --------------------------------------------------------------------------------


def test_check_safetensors_accepts_whole_files_and_refuses_damaged_ones(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(3, 4), "b": torch.zeros(5, dtype=torch.bfloat16)}, str(path))
    check_safetensors(path)
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    damaged = {
        "truncated": data[:-1],
        "extended": data + b"\0",
        "short": data[:5],
        "huge-header": (10**12).to_bytes(8, "little") + data[8:],
        "header-not-json": data[:8] + b"{" * header_len + data[8 + header_len :],
        "wrong-size": data[:8]
        + data[8 : 8 + header_len].replace(b"[3,4]", b"[3,5]")
        + data[8 + header_len :],
    }
    for case, content in damaged.items():
        path.write_bytes(content)
        with pytest.raises(APIError) as info:
            check_safetensors(path)
        assert info.value.status == 400, case


def test_check_file_name() -> None:
    for ok in ("config.json", "model-00001-of-00002.safetensors", "tokenizer.model", "chat_template.jinja"):
        assert check_file_name(ok) == ok
    for bad in (
        "x/../config.json",
        "..json",
        "/etc/passwd.json",
        ".env.json",
        "run.py",
        "x.json\n",
        "é.json",
    ):
        with pytest.raises(APIError):
            check_file_name(bad)
