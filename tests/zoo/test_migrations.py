"""Migration 0001 on SQLite and PostgreSQL: up, down, up again; the ORM matches it; constraints hold."""

from __future__ import annotations

import argparse
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Integer, MetaData, delete, inspect, select, text
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session, sessionmaker

from blockzoo.commands import db as db_command
from zoo.catalog import migrate
from zoo.catalog.database import CatalogSchemaError, factory_engine, make_engine, open_catalog
from zoo.catalog.models import (
    ApiKey,
    AuditLog,
    Base,
    BaseModel,
    Block,
    ChainEntry,
    ChainEntryDelta,
    Delta,
    Model,
    RegistrationJob,
    Tenant,
    Usage,
)
from zoo.catalog.types import BlockKind, DeltaKind, JobStatus, ModelKind, ModelStatus

# The schema the issue asks for, written out here rather than read from the code under test.
EXPECTED_COLUMNS = {
    "tenants": {"id", "name", "created_at", "disabled", "requests_per_minute", "tokens_per_minute",
                "max_concurrent", "max_models", "max_storage_bytes"},
    "api_keys": {"id", "tenant_id", "key_prefix", "key_hash", "name", "created_at", "revoked_at",
                 "last_used_at"},
    "base_models": {"id", "name", "shape_digest", "architecture", "config_json", "created_at"},
    "models": {"id", "tenant_id", "name", "kind", "status", "base_model_id", "config_json", "tokenizer_id",
               "chain_digest", "naive_bytes", "stored_bytes_new", "created_at"},
    "chain_entries": {"model_id", "position", "block_id"},
    "chain_entry_deltas": {"model_id", "position", "delta_id", "order"},
    "blocks": {"id", "kind", "nbytes", "ref_count", "dtype", "quantization", "source_block_id", "created_at"},
    "deltas": {"id", "kind", "target_block_id", "nbytes", "ref_count", "rank", "alpha", "scaling",
               "meta_json", "created_at"},
    "registration_jobs": {"id", "created_at", "updated_at", "tenant_id", "model_id", "actor", "model_name",
                          "status", "progress", "detail_json", "error"},
    "audit_log": {"id", "ts", "tenant_id", "actor", "action", "model_name", "status", "detail_json"},
    "usage": {"id", "tenant_id", "model_id", "hour", "prompt_tokens", "completion_tokens", "requests"},
}  # fmt: skip

HOUR = datetime(2026, 1, 2, 3, 0, tzinfo=UTC)


def digest(ch: str) -> str:
    return ch * 64


def table_names(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def check_schema(url: str) -> None:
    engine = make_engine(url)
    try:
        inspector = inspect(engine)
        assert set(inspector.get_table_names()) == {*EXPECTED_COLUMNS, "alembic_version"}
        for table, columns in EXPECTED_COLUMNS.items():
            assert {c["name"] for c in inspector.get_columns(table)} == columns, table
        assert inspector.get_pk_constraint("chain_entries")["constrained_columns"] == ["model_id", "position"]
        model_uniques = [u["column_names"] for u in inspector.get_unique_constraints("models")]
        assert ["tenant_id", "name"] in model_uniques
    finally:
        engine.dispose()


def populate(factory: sessionmaker[Session]) -> None:
    """A small zoo: a tenant, a base and a LoRA model sharing blocks, with jobs, audit and usage."""
    with factory() as s:
        tenant = Tenant(name="acme", max_models=3)
        s.add(ApiKey(tenant=tenant, key_prefix="bz-abcdefghi", key_hash=digest("f"), name="k"))
        base = BaseModel(
            name="tiny-llama", shape_digest=digest("e"), architecture="llama", config_json={"a": 1}
        )
        embed = Block(id=digest("1"), kind=BlockKind.EMBED, nbytes=10, ref_count=2, dtype="float32")
        layer = Block(id=digest("2"), kind=BlockKind.LAYER, nbytes=20, ref_count=2, dtype="float32")
        head = Block(id=digest("3"), kind=BlockKind.HEAD, nbytes=30, ref_count=2, dtype="float32")
        quant = Block(
            id=digest("4"), kind=BlockKind.LAYER, nbytes=6, dtype="int4", quantization="w4a16-g128",
            source_block=layer,
        )  # fmt: skip
        lora = Delta(id=digest("5"), kind=DeltaKind.LORA, target_block=layer, nbytes=4, rank=8, alpha=16.0,
                     scaling=2.0, meta_json={"targets": ["q_proj", "v_proj"]})  # fmt: skip
        shared = Model(name="tiny-llama", kind=ModelKind.BASE, status=ModelStatus.READY, base_model=base)
        tuned = Model(tenant=tenant, name="support-bot", kind=ModelKind.LORA, base_model=base, naive_bytes=64)
        for model in (shared, tuned):
            model.chain = [ChainEntry(position=i, block=b) for i, b in enumerate((embed, layer, head))]
        tuned.chain[1].deltas = [ChainEntryDelta(order=0, delta=lora)]
        s.add_all([base, quant, shared, tuned])
        s.flush()
        s.add(RegistrationJob(tenant_id=tenant.id, model_id=tuned.id, actor="cli", model_name="support-bot",
                              status=JobStatus.RUNNING, progress=0.5))  # fmt: skip
        s.add(AuditLog(tenant_id=tenant.id, actor="cli", action="model.register", status="ok"))
        s.add(Usage(tenant_id=tenant.id, model_id=tuned.id, hour=HOUR, prompt_tokens=7, completion_tokens=5,
                    requests=1))  # fmt: skip
        s.commit()


def check_populated(factory: sessionmaker[Session]) -> None:
    with factory() as s:
        tuned = s.scalars(
            select(Model).where(Model.name == "support-bot", Model.tenant_id.is_not(None))
        ).one()
        assert tuned.kind is ModelKind.LORA and tuned.status is ModelStatus.REGISTERING
        assert tuned.tenant is not None and tuned.tenant.name == "acme" and tuned.tenant.max_models == 3
        assert tuned.base_model is not None and tuned.base_model.config_json == {"a": 1}
        assert [e.block_id for e in tuned.chain] == [digest("1"), digest("2"), digest("3")]
        assert [d.delta.meta_json for d in tuned.chain[1].deltas] == [{"targets": ["q_proj", "v_proj"]}]
        quant = s.get_one(Block, digest("4"))
        assert quant.source_block_id == digest("2") and quant.quantization == "w4a16-g128"
        usage = s.scalars(select(Usage)).one()
        assert usage.hour == HOUR and usage.hour.tzinfo is not None
        job = s.scalars(select(RegistrationJob)).one()
        assert job.status is JobStatus.RUNNING and job.progress == 0.5
        assert tuned.created_at.tzinfo is not None
        assert abs(datetime.now(UTC) - tuned.created_at) < timedelta(minutes=5)


def test_upgrade_downgrade_upgrade(empty_url: str) -> None:
    assert migrate.current_revision(empty_url) is None
    migrate.upgrade(empty_url)
    assert migrate.current_revision(empty_url) == migrate.head_revision()
    check_schema(empty_url)
    factory = open_catalog(empty_url, auto_migrate=False)
    try:
        populate(factory)
        check_populated(factory)
    finally:
        factory_engine(factory).dispose()

    migrate.downgrade(empty_url, "base")
    assert migrate.current_revision(empty_url) is None
    assert table_names(empty_url) == {"alembic_version"}

    migrate.upgrade(empty_url)
    check_schema(empty_url)
    factory = open_catalog(empty_url, auto_migrate=False)
    try:
        with factory() as s:
            assert s.scalars(select(Tenant)).all() == []
        populate(factory)
        check_populated(factory)
    finally:
        factory_engine(factory).dispose()


def diffs_against(url: str, metadata: MetaData) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(context, metadata))
    finally:
        engine.dispose()


def test_orm_metadata_matches_the_migration(empty_url: str) -> None:
    migrate.upgrade(empty_url)
    assert diffs_against(empty_url, Base.metadata) == []

    # The comparison is live: a column the migration lacks is reported.
    drifted = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.sorted_tables:
        table.to_metadata(drifted)
    drifted.tables["tenants"].append_column(Column("extra", Integer, nullable=True))
    diffs = diffs_against(empty_url, drifted)
    assert len(diffs) == 1 and "extra" in repr(diffs[0])


def test_constraints_are_enforced(catalog: sessionmaker[Session]) -> None:
    populate(catalog)
    with catalog() as s:
        s.add(ChainEntry(model_id=1, position=9, block_id=digest("9")))  # no such block
        with pytest.raises(IntegrityError):
            s.flush()
        s.rollback()
        tenant_id = s.scalars(select(Tenant.id)).one()
        s.add(Model(tenant_id=tenant_id, name="support-bot", kind=ModelKind.FULL))
        with pytest.raises(IntegrityError):
            s.flush()
        s.rollback()
        s.add(Model(tenant_id=None, name="tiny-llama", kind=ModelKind.BASE))  # shared names are unique too
        with pytest.raises(IntegrityError):
            s.flush()
        s.rollback()
        with pytest.raises(IntegrityError):
            s.execute(text("UPDATE blocks SET kind = 'bogus' WHERE kind = 'head'"))
        s.rollback()
        with pytest.raises(IntegrityError):
            s.execute(delete(Block).where(Block.id == digest("2")))  # still in two chains
        s.rollback()
        with pytest.raises(IntegrityError):
            s.execute(delete(Tenant))  # still owns a model
        s.rollback()


def test_deleting_a_model_removes_its_chain(catalog: sessionmaker[Session]) -> None:
    populate(catalog)
    with catalog() as s:
        s.execute(delete(Model).where(Model.tenant_id.is_not(None)))
        s.commit()
        assert len(s.scalars(select(ChainEntry)).all()) == 3  # the shared model's chain
        assert s.scalars(select(ChainEntryDelta)).all() == []
        assert s.scalars(select(Usage)).all() == []
        assert s.scalars(select(RegistrationJob.model_id)).one() is None


def test_timestamps_are_utc_aware(catalog: sessionmaker[Session]) -> None:
    plus_two = timezone(timedelta(hours=2))
    with catalog() as s:
        s.add(Tenant(name="tz", created_at=datetime(2026, 5, 1, 12, 0, tzinfo=plus_two)))
        s.commit()
    with catalog() as s:
        created = s.scalars(select(Tenant.created_at)).one()
        assert created == datetime(2026, 5, 1, 10, 0, tzinfo=UTC)
        assert created.utcoffset() == timedelta(0)
        s.add(Tenant(name="naive", created_at=datetime(2026, 5, 1, 12, 0)))
        with pytest.raises(StatementError, match="timezone-aware"):
            s.flush()


def test_concurrent_processes_migrate_sqlite_once(sqlite_url: str) -> None:
    # Several BlockZoo processes starting together on a new embedded catalog must not race.
    code = "import sys; from zoo.catalog import migrate; migrate.upgrade(sys.argv[1])"
    repo = Path(__file__).resolve().parents[2]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, sqlite_url], cwd=repo, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    errors = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    check_schema(sqlite_url)
    assert migrate.current_revision(sqlite_url) == migrate.head_revision()


def test_sqlite_pragmas(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10_000
    finally:
        engine.dispose()


def test_open_catalog_migrates_sqlite_but_only_checks_postgres(sqlite_url: str, pg_url: str) -> None:
    factory = open_catalog(sqlite_url, auto_migrate=True)
    factory_engine(factory).dispose()
    assert migrate.current_revision(sqlite_url) == migrate.head_revision()
    with pytest.raises(CatalogSchemaError, match="blockzoo db upgrade"):
        open_catalog(pg_url, auto_migrate=True)
    assert table_names(pg_url) == set()


def db_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    db_command.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    result: int = args.handler(args)
    return result


def test_db_cli(empty_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert db_cli("db", "current", "--url", empty_url) == 0
    assert capsys.readouterr().out == "none\n"
    assert db_cli("db", "upgrade", "--url", empty_url) == 0
    assert capsys.readouterr().out.rstrip().endswith(f"at revision {migrate.head_revision()}")
    check_schema(empty_url)
    assert db_cli("db", "current", "--url", empty_url) == 0
    assert capsys.readouterr().out == f"{migrate.head_revision()}\n"
    assert db_cli("db", "downgrade", "base", "--url", empty_url) == 0
    assert table_names(empty_url) == {"alembic_version"}
    capsys.readouterr()
    assert db_cli("db", "downgrade", "nonexistent", "--url", empty_url) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ")


def test_db_cli_defaults_to_the_settings_catalog(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BLOCKZOO_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("BLOCKZOO_DATABASE_URL", raising=False)
    assert db_cli("db", "upgrade") == 0
    assert str(tmp_path) in capsys.readouterr().out
    assert migrate.current_revision(f"sqlite:///{tmp_path}/catalog.db") == migrate.head_revision()
