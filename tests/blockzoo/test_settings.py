from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from blockzoo.settings import Settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("BLOCKZOO_")]:
        monkeypatch.delenv(name)


def test_defaults() -> None:
    settings = Settings()
    assert settings.data_dir == Path(".blockzoo")
    assert settings.port == 8000
    assert settings.dtype == "float32"
    assert settings.scheduler_policy == "splitfuse"
    assert settings.enable_prefix_caching is True
    assert settings.num_kv_pages is None
    assert settings.kv_cache_memory == 1 << 30


def test_env_overrides_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BLOCKZOO_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("BLOCKZOO_PORT", "9123")
    monkeypatch.setenv("BLOCKZOO_DTYPE", "bfloat16")
    monkeypatch.setenv("BLOCKZOO_SCHEDULER_POLICY", "prefill_first")
    monkeypatch.setenv("BLOCKZOO_ENABLE_PREFIX_CACHING", "false")
    monkeypatch.setenv("BLOCKZOO_NUM_KV_PAGES", "77")
    monkeypatch.setenv("BLOCKZOO_REDIS_URL", "redis://127.0.0.1:6379/0")
    settings = Settings()
    assert settings.data_dir == tmp_path
    assert settings.port == 9123
    assert settings.dtype == "bfloat16"
    assert settings.scheduler_policy == "prefill_first"
    assert settings.enable_prefix_caching is False
    assert settings.num_kv_pages == 77
    assert settings.redis_url == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BLOCKZOO_DTYPE", "float8"),
        ("BLOCKZOO_PORT", "70000"),
        ("BLOCKZOO_PAGE_SIZE", "0"),
        ("BLOCKZOO_SCHEDULER_POLICY", "fifo"),
        ("BLOCKZOO_MAX_NUM_SEQS", "many"),
    ],
)
def test_bad_values_are_rejected(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_database_url_defaults_to_sqlite_under_data_dir(tmp_path: Path) -> None:
    url = Settings(data_dir=tmp_path).resolved_database_url()
    assert url.startswith("sqlite:///")
    assert Path(url.removeprefix("sqlite:///")).parent == tmp_path.resolve()
    explicit = "postgresql://postgres@127.0.0.1:5432/test"
    assert Settings(database_url=explicit).resolved_database_url() == explicit


def test_num_kv_pages_from_memory() -> None:
    assert Settings(kv_cache_memory=10_000).resolved_num_kv_pages(bytes_per_page=1_000) == 10
    assert Settings(kv_cache_memory=10_999).resolved_num_kv_pages(bytes_per_page=1_000) == 10
    assert Settings(num_kv_pages=3).resolved_num_kv_pages(bytes_per_page=1_000) == 3
    with pytest.raises(ValueError):
        Settings(kv_cache_memory=10).resolved_num_kv_pages(bytes_per_page=1_000)
