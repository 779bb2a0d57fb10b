"""Usage rows accumulate per (tenant, model, UTC hour), atomically, on SQLite and PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from router.usage import UsageRecorder, hour_of
from router.usage_buffer import UsageBuffer
from zoo.block_store import BlockStore
from zoo.catalog.database import factory_engine, open_catalog
from zoo.catalog.models import Model, Usage
from zoo.catalog.tenants import create_tenant
from zoo.catalog.types import ModelKind, ModelStatus
from zoo.registry import Zoo

T0 = datetime(2025, 3, 4, 10, 15, 30, tzinfo=UTC)


@pytest.fixture
def zoo(migrated_url: str, tmp_path: Path) -> Iterator[Zoo]:
    sessions = open_catalog(migrated_url, auto_migrate=False)
    try:
        yield Zoo(sessions, BlockStore(tmp_path / "store"))
    finally:
        factory_engine(sessions).dispose()


def seed(zoo: Zoo) -> tuple[int, int, int]:
    """A tenant with two models; returns (tenant id, model id, other model id)."""
    with zoo.sessions() as session, session.begin():
        tenant, _ = create_tenant(session, "acme")
        models = [
            Model(tenant_id=tenant.id, name=name, kind=ModelKind.LORA, status=ModelStatus.READY)
            for name in ("one", "two")
        ]
        session.add_all(models)
        session.flush()
        return tenant.id, models[0].id, models[1].id


def rows(zoo: Zoo) -> list[tuple[int, datetime, int, int, int]]:
    with zoo.sessions() as session:
        found = session.scalars(select(Usage).order_by(Usage.model_id, Usage.hour)).all()
        return [(u.model_id, u.hour, u.prompt_tokens, u.completion_tokens, u.requests) for u in found]


def test_records_accumulate_into_one_row_per_hour(zoo: Zoo) -> None:
    tenant, model, other = seed(zoo)
    usage = UsageRecorder(zoo)
    hour = datetime(2025, 3, 4, 10, tzinfo=UTC)
    assert usage.record(tenant, model, 10, 5, T0)
    assert usage.record(tenant, model, 3, 2, T0 + timedelta(minutes=20))
    # 11:59:59 at UTC+2 is 09:59:59 UTC: the hour before.
    plus_two = timezone(timedelta(hours=2))
    assert usage.record(tenant, model, 1, 1, datetime(2025, 3, 4, 11, 59, 59, tzinfo=plus_two))
    assert usage.record(tenant, model, 7, 0, hour + timedelta(hours=1))
    assert usage.record(tenant, other, 4, 4, T0)
    assert rows(zoo) == [
        (model, hour - timedelta(hours=1), 1, 1, 1),
        (model, hour, 13, 7, 2),
        (model, hour + timedelta(hours=1), 7, 0, 1),
        (other, hour, 4, 4, 1),
    ]


def test_concurrent_records_lose_nothing(zoo: Zoo) -> None:
    tenant, model, _ = seed(zoo)
    usage = UsageRecorder(zoo)

    def record(i: int) -> bool:
        return usage.record(tenant, model, i, 2 * i, T0 + timedelta(seconds=i))

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(record, range(48)))
    assert all(results)
    total = sum(range(48))
    assert rows(zoo) == [(model, hour_of(T0), total, 2 * total, 48)]


def test_vanished_model_is_not_recorded(zoo: Zoo) -> None:
    tenant, _, _ = seed(zoo)
    usage = UsageRecorder(zoo)
    assert usage.record(tenant, 10_000, 1, 1, T0) is False
    assert rows(zoo) == []


def test_bad_input_is_refused(zoo: Zoo) -> None:
    tenant, model, _ = seed(zoo)
    usage = UsageRecorder(zoo)
    with pytest.raises(ValueError, match="naive"):
        usage.record(tenant, model, 1, 1, datetime(2025, 3, 4, 10))
    with pytest.raises(ValueError, match=">= 0"):
        usage.record(tenant, model, -1, 1, T0)
    assert rows(zoo) == []


def test_buffer_sums_requests_and_writes_one_row_each(zoo: Zoo) -> None:
    tenant, model, other = seed(zoo)
    buffer = UsageBuffer(UsageRecorder(zoo), interval_s=3600)
    for i in range(10):
        buffer.add(tenant, model, i, 1, T0 + timedelta(seconds=i))
    buffer.add(tenant, other, 5, 5, T0)
    buffer.add(tenant, model, 2, 2, T0 + timedelta(hours=1))
    assert rows(zoo) == [] and buffer.pending_requests() == 12
    assert buffer.flush() == 3
    hour = hour_of(T0)
    assert rows(zoo) == [
        (model, hour, 45, 10, 10),
        (model, hour + timedelta(hours=1), 2, 2, 1),
        (other, hour, 5, 5, 1),
    ]
    buffer.add(tenant, model, 1, 1, T0)
    buffer.close()  # writes what is left
    assert rows(zoo)[0] == (model, hour, 46, 11, 11)


def test_buffer_keeps_the_sums_when_the_catalog_is_unreachable(zoo: Zoo) -> None:
    tenant, model, _ = seed(zoo)
    buffer = UsageBuffer(UsageRecorder(zoo), interval_s=3600)
    buffer.add(tenant, model, 3, 4, T0)
    engine = factory_engine(zoo.sessions)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE usage RENAME TO usage_away")
    try:
        with pytest.raises(DBAPIError):
            buffer.flush()
        buffer.add(tenant, model, 1, 1, T0)
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE usage_away RENAME TO usage")
    assert buffer.flush() == 1
    assert rows(zoo) == [(model, hour_of(T0), 4, 5, 2)]


def test_buffer_drops_only_the_rows_of_a_vanished_model(zoo: Zoo) -> None:
    tenant, model, _ = seed(zoo)
    buffer = UsageBuffer(UsageRecorder(zoo), interval_s=3600)
    buffer.add(tenant, 10_000, 1, 1, T0)
    buffer.add(tenant, model, 2, 3, T0)
    assert buffer.flush() == 1
    assert rows(zoo) == [(model, hour_of(T0), 2, 3, 1)]


def test_buffer_writes_in_the_background(zoo: Zoo) -> None:
    tenant, model, _ = seed(zoo)
    buffer = UsageBuffer(UsageRecorder(zoo), interval_s=0.05)
    buffer.start()
    try:
        buffer.add(tenant, model, 2, 3, T0)
        deadline = time.monotonic() + 30
        while not rows(zoo) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert rows(zoo) == [(model, hour_of(T0), 2, 3, 1)]
    finally:
        buffer.close()
