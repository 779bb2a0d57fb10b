"""GGUF fine-tunes through the tenant REST API: one .gguf file uploaded (or named by server path),
checked before a job starts, registered by the job, deduplicated against a GGUF base; hostile files
get a 400 that names the problem and leave nothing behind."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from blockzoo.tiny_models import TinyModelCache
from tests.router.test_tenant_models_api import BASE, Env, Response, assert_error, finish, make_env
from tests.zoo.gguf_files import CHAT_TEMPLATE, TinySpec, write_tiny_gguf
from tests.zoo.test_lora_oracle import make_adapter
from tests.zoo.zoo_helpers import store_files
from zoo.catalog.models import RegistrationJob

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("gguf")
    base = write_tiny_gguf(folder / "base.gguf", TinySpec("llama"), seed=5)
    other = write_tiny_gguf(folder / "tuned.gguf", TinySpec("llama"), seed=6)
    return {"base": base, "tuned": other}


@pytest.fixture
def env(tmp_path: Path, ggufs: dict[str, Path]) -> Iterator[Env]:
    # The base of this zoo is itself a GGUF file, imported with its 4-bit blocks.
    yield from make_env(tmp_path, ggufs["base"])


def send(env: Env, headers: dict[str, str], name: str, files: list[Path], **fields: str) -> Response:
    body = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in files]
    return env.client.post("/v1/fine-tunes", data={"name": name, **fields}, files=body, headers=headers)


def _nothing_left(env: Env, files_before: set[str]) -> None:
    assert list(env.uploads.iterdir()) == []
    assert store_files(env.zoo) == files_before
    assert env.model_count() == 1  # the base only
    with env.zoo.sessions() as s:
        assert s.scalar(select(func.count()).select_from(RegistrationJob)) == 0


def test_a_gguf_fine_tune_registers_and_the_base_file_again_stores_nothing(
    env: Env, ggufs: dict[str, Path], tmp_path: Path
) -> None:
    acme = env.tenant("acme")
    job = finish(env, acme, send(env, acme, "tuned", [ggufs["tuned"]]))
    assert job["status"] == "succeeded", job
    assert job["report"]["bytes_beyond_base"] > 0
    detail = env.client.get("/v1/fine-tunes/tuned", headers=acme)
    assert detail.status_code == 200 and detail.json()["base"] == BASE

    # The base's own file under another name: every block is already in the zoo.
    copy = shutil.copy(ggufs["base"], tmp_path / "same.gguf")
    files = store_files(env.zoo)
    job = finish(env, acme, send(env, acme, "same", [Path(copy)]))
    assert job["status"] == "succeeded", job
    assert job["report"]["bytes_beyond_base"] == 0
    assert job["report"]["blocks_shared_with_base"] == job["report"]["blocks_total"]
    assert store_files(env.zoo) == files


def test_dequantize_stores_dense_blocks_and_is_refused_for_folders(
    env: Env, ggufs: dict[str, Path], tmp_path: Path, tiny_model_factory: TinyModelCache
) -> None:
    acme = env.tenant("acme")
    four_bit = finish(env, acme, send(env, acme, "q4", [ggufs["tuned"]]))
    dense = finish(env, acme, send(env, acme, "fp32", [ggufs["tuned"]], dequantize="true"))
    assert four_bit["status"] == dense["status"] == "succeeded", (four_bit, dense)
    # The tiny file mixes F32/F16/Q8_0 with Q4 projections; dequantized, the Q4 ones grow eightfold.
    assert dense["report"]["bytes_beyond_base"] > 1.5 * four_bit["report"]["bytes_beyond_base"]

    adapter = make_adapter(
        tiny_model_factory("llama"), tmp_path / "ad", {"r": 2, "target_modules": ["q_proj"]}, seed=1
    )
    error = assert_error(
        send(env, acme, "x", sorted(adapter.glob("adapter_*")), dequantize="true"), 400, "invalid_upload"
    )
    assert error["param"] == "dequantize" and "GGUF" in error["message"], error


@pytest.mark.parametrize(
    "attack", ["truncated", "lying_header", "extra_file", "unknown_arch", "template_bomb"]
)
def test_hostile_gguf_uploads_are_400_and_leave_nothing(
    env: Env, ggufs: dict[str, Path], tmp_path: Path, attack: str
) -> None:
    acme = env.tenant("acme")
    files = store_files(env.zoo)
    data = ggufs["tuned"].read_bytes()
    bad = tmp_path / "bad.gguf"
    sent = [bad]
    expect = "invalid_upload"
    if attack == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif attack == "lying_header":
        # The tensor count claims far more tensors than the file could describe.
        bad.write_bytes(data[:8] + (1 << 40).to_bytes(8, "little") + data[16:])
    elif attack == "extra_file":
        bad.write_bytes(data)
        extra = tmp_path / "config.json"
        extra.write_text("{}")
        sent = [bad, extra]
    elif attack == "unknown_arch":
        write_tiny_gguf(bad, TinySpec("llama"), seed=7)
        raw = bad.read_bytes()
        needle = b"general.architecture"
        at = raw.index(needle) + len(needle) + 4 + 8  # key, value type, string length
        assert raw[at : at + 5] == b"llama"
        bad.write_bytes(raw[:at] + b"gemma" + raw[at + 5 :])
    elif attack == "template_bomb":
        bomb = "{% for i in range(10**9) %}{{ 'x' * 10**6 }}{% endfor %}" + CHAT_TEMPLATE
        write_tiny_gguf(bad, TinySpec("llama"), seed=7, chat_template=bomb)
        expect = "invalid_chat_template"
    error = assert_error(send(env, acme, "bad", sent), 400, expect)
    assert "bad.gguf" in error["message"] or attack == "extra_file", error
    _nothing_left(env, files)


def test_gguf_from_a_server_path(env: Env, ggufs: dict[str, Path]) -> None:
    acme = env.tenant("acme")
    folder = env.allowed / "tuned"
    folder.mkdir()
    shutil.copy(ggufs["tuned"], folder / "model.gguf")
    response = env.client.post(
        "/v1/fine-tunes/from-path", json={"name": "from-path", "path": str(folder)}, headers=acme
    )
    job = finish(env, acme, response)
    assert job["status"] == "succeeded", job
