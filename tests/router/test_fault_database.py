"""The catalog database goes away under a live server (real PostgreSQL, the official openai client).

Inference on models already served goes on, from the last lookups that succeeded; writes (tenants,
keys, registrations) answer 503 with a message that says the database is unavailable, and no
traceback is logged. Usage of the requests served meanwhile is kept and written once it returns.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import Engine, func, make_url, select

from blockzoo.settings import Settings
from blockzoo.tiny_demo_zoo import write_lora_adapter
from blockzoo.tiny_models import TinyModelCache
from router.jobs import JobOwner, JobRunner
from router.server import build_server
from runtime.errors import BlockZooError
from tests.router.live_server import serve
from tests.zoo.zoo_helpers import add_tenant, open_zoo
from zoo.catalog import migrate
from zoo.catalog.models import RegistrationJob, Usage
from zoo.catalog.types import JobStatus

ADMIN = {"Authorization": "Bearer admin-key"}


class Outage:
    """Makes one PostgreSQL database refuse connections and cuts the ones it has, then undoes it."""

    def __init__(self, admin: Engine, url: str) -> None:
        self.admin = admin
        self.name = make_url(url).database

    def begin(self) -> None:
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS false')
            conn.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                f" WHERE datname = '{self.name}' AND pid <> pg_backend_pid()"
            )

    def end(self) -> None:
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS true')


@pytest.fixture
def outage(pg_admin: Engine, pg_url: str) -> Iterator[Outage]:
    migrate.upgrade(pg_url)
    found = Outage(pg_admin, pg_url)
    try:
        yield found
    finally:
        found.end()


def served_tokens(client: openai.OpenAI, model: str) -> int:
    out = client.completions.create(
        model=model, prompt="the zoo", max_tokens=3, extra_body={"ignore_eos": True}
    )
    assert out.usage is not None
    streamed = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
    )
    assert any(chunk.choices and chunk.choices[0].finish_reason for chunk in streamed)
    return out.usage.completion_tokens


def assert_503(resp: httpx.Response) -> None:
    assert resp.status_code == 503, resp.text
    error = resp.json()["error"]
    assert error["code"] == "database_unavailable" and "database" in error["message"]
    assert "/" not in error["message"] and "postgres" not in error["message"].lower()
    assert resp.headers.get("retry-after")


def test_database_down_keeps_inference_and_refuses_writes(
    tmp_path: Path,
    pg_url: str,
    outage: Outage,
    tiny_model_factory: TinyModelCache,
    caplog: pytest.LogCaptureFixture,
) -> None:
    uploads = tmp_path / "uploads"
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=pg_url,
        kv_cache_memory=8 << 20,
        admin_key="admin-key",
        # Short, so that during the outage every lookup has expired and must do without the database.
        catalog_cache_ttl_s=0.2,
        usage_flush_interval_s=0.2,
        register_paths=[uploads],
    )
    built = build_server(settings)
    zoo = built.inference.zoo
    base = tiny_model_factory("llama")
    zoo.add_base("demo-base", base)
    key = add_tenant(zoo, "acme")
    unseen = add_tenant(zoo, "quiet")
    zoo.register("acme", "acme-lora", write_lora_adapter(base, tmp_path / "lora", 4, ["q_proj", "v_proj"], 1))
    write_lora_adapter(base, uploads / "late", 4, ["q_proj"], 2)
    with serve(built.app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)
        tenant = {"Authorization": f"Bearer {key}"}
        served = 0
        for model in ("demo-base", "acme-lora"):
            served += 2
            served_tokens(client, model)

        outage.begin()
        caplog.clear()
        time.sleep(0.3)
        with caplog.at_level(logging.WARNING):
            for _ in range(2):
                for model in ("demo-base", "acme-lora"):
                    assert served_tokens(client, model) == 3
                    served += 2
            assert_503(httpx.post(url + "/admin/v1/tenants", json={"name": "newcomer"}, headers=ADMIN))
            assert_503(httpx.post(url + "/admin/v1/tenants/acme/keys", json={}, headers=ADMIN))
            assert_503(
                httpx.patch(url + "/admin/v1/tenants/acme", json={"requests_per_minute": 5}, headers=ADMIN)
            )
            assert_503(
                httpx.post(
                    url + "/v1/fine-tunes/from-path",
                    json={"name": "late", "path": str(uploads / "late")},
                    headers=tenant,
                )
            )
            # A valid key this server never saw cannot be checked: unavailable, not "invalid", not a 500.
            assert_503(
                httpx.post(
                    url + "/v1/completions",
                    json={"model": "demo-base", "prompt": "x", "max_tokens": 1},
                    headers={"Authorization": f"Bearer {unseen}"},
                )
            )
            assert httpx.get(url + "/ready").status_code == 503
            assert httpx.get(url + "/health").status_code == 200
            time.sleep(0.5)  # a few usage flushes fail meanwhile
        tracebacks = [r for r in caplog.records if r.exc_info]
        assert not tracebacks, [r.getMessage() for r in tracebacks]

        outage.end()
        created = httpx.post(url + "/admin/v1/tenants", json={"name": "newcomer"}, headers=ADMIN)
        assert created.status_code == 201, created.text
        assert httpx.get(url + "/ready").status_code == 200
        # Usage of every request, the ones served during the outage included, reaches the catalog.
        deadline = time.monotonic() + 10
        while True:
            with zoo.sessions() as session:
                recorded = session.scalar(select(func.coalesce(func.sum(Usage.requests), 0)))
            if recorded == served or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert recorded == served


def test_a_job_that_ends_during_an_outage_is_recorded_once_the_database_returns(
    outage: Outage, pg_url: str, tmp_path: Path
) -> None:

    zoo = open_zoo(tmp_path / "zoo", pg_url)
    add_tenant(zoo, "acme")
    runner = JobRunner(zoo, tmp_path / "uploads")
    owner = JobOwner(None, "admin")
    release = threading.Event()

    def task(_progress: object) -> object:
        release.wait(30)
        raise BlockZooError("the folder is not a model")

    job_id = runner.create(owner, "m")
    runner.start(job_id, task, None, owner, "model.register")  # type: ignore[arg-type]
    deadline = time.monotonic() + 10
    while runner.get(job_id, None).status != "running":  # type: ignore[union-attr]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    outage.begin()
    release.set()  # the job fails while nothing can be written
    time.sleep(1.5)
    outage.end()
    runner.wait(job_id, timeout=30)
    with zoo.sessions() as session:
        row = session.get(RegistrationJob, job_id)
        assert row is not None and row.status == JobStatus.FAILED
        assert row.error == "the folder is not a model"
    runner.shutdown()
