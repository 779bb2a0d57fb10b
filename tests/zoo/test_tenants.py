"""Tenants and API keys on SQLite and PostgreSQL, and the `blockzoo tenant` command."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import inspect, select, text
from sqlalchemy.orm import Session, sessionmaker

from blockzoo.commands import tenant as tenant_command
from zoo.catalog import migrate, tenants
from zoo.catalog.database import factory_engine, open_catalog
from zoo.catalog.models import ApiKey, AuditLog, Model, Tenant
from zoo.catalog.types import ModelKind

KEY_RE = re.compile(r"^bz-[A-Za-z0-9_-]{43}$")


def every_cell(session: Session) -> str:
    """Every value in every table of the catalog, as one string."""
    bind = session.get_bind()
    cells: list[str] = []
    for table in inspect(bind).get_table_names():
        for row in session.execute(text(f'SELECT * FROM "{table}"')):
            cells.extend(str(value) for value in row)
    return "\n".join(cells)


def test_create_tenant_returns_a_key_stored_only_hashed(db_session: Session) -> None:
    tenant, key = tenants.create_tenant(db_session, "acme")
    db_session.commit()
    assert KEY_RE.fullmatch(key)
    row = db_session.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant.id)).one()
    assert row.key_hash == hashlib.sha256(key.encode()).hexdigest()
    assert key.startswith(row.key_prefix) and len(row.key_prefix) < 16
    dump = every_cell(db_session)
    assert row.key_hash in dump  # the dump does see the key table
    assert key not in dump and key[len(row.key_prefix) :] not in dump


def test_sqlite_files_never_hold_the_plaintext(sqlite_url: str) -> None:
    factory = open_catalog(sqlite_url, auto_migrate=True)
    try:
        with factory() as s:
            _, key = tenants.create_tenant(s, "acme")
            s.commit()
    finally:
        factory_engine(factory).dispose()
    folder = Path(sqlite_url.removeprefix("sqlite:///")).parent
    contents = b"".join(p.read_bytes() for p in folder.iterdir() if p.is_file())
    assert b"acme" in contents  # what was written is there ...
    assert key.encode() not in contents and key[12:].encode() not in contents  # ... but not the key


def test_authenticate(db_session: Session) -> None:
    acme, key = tenants.create_tenant(db_session, "acme")
    other, other_key = tenants.create_tenant(db_session, "other")
    db_session.commit()
    assert tenants.authenticate(db_session, key) is acme
    assert tenants.authenticate(db_session, other_key) is other
    last = "A" if key[-1] != "A" else "B"
    assert tenants.authenticate(db_session, key[:-1] + last) is None  # same prefix, wrong key
    assert tenants.authenticate(db_session, "bz-" + "x" * 43) is None
    assert tenants.authenticate(db_session, "") is None
    assert tenants.authenticate(db_session, key + "x") is None


def test_authenticate_records_last_use_coarsely(db_session: Session) -> None:
    _, key = tenants.create_tenant(db_session, "acme")
    t0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    tenants.authenticate(db_session, key, now=t0)
    tenants.authenticate(db_session, key, now=t0 + timedelta(seconds=5))
    db_session.commit()
    assert db_session.scalars(select(ApiKey.last_used_at)).one() == t0
    tenants.authenticate(db_session, key, now=t0 + timedelta(minutes=2))
    db_session.commit()
    assert db_session.scalars(select(ApiKey.last_used_at)).one() == t0 + timedelta(minutes=2)


def test_revoked_key_and_disabled_tenant_fail(db_session: Session) -> None:
    acme, first = tenants.create_tenant(db_session, "acme")
    row, second = tenants.create_key(db_session, "acme", name="ci")
    db_session.commit()
    revoked = tenants.revoke_key(db_session, "acme", row.key_prefix)
    db_session.commit()
    assert [r.id for r in revoked] == [row.id] and revoked[0].revoked_at is not None
    assert tenants.authenticate(db_session, second) is None
    assert tenants.authenticate(db_session, first) is acme
    assert [k.name for k in tenants.list_keys(db_session, "acme")] == ["default"]
    assert len(tenants.list_keys(db_session, "acme", include_revoked=True)) == 2
    with pytest.raises(tenants.ApiKeyNotFound):
        tenants.revoke_key(db_session, "acme", row.key_prefix)

    tenants.set_disabled(db_session, "acme", True)
    db_session.commit()
    assert tenants.authenticate(db_session, first) is None
    tenants.set_disabled(db_session, "acme", False)
    assert tenants.authenticate(db_session, first) is acme


def test_duplicate_name_is_a_clear_error(catalog: sessionmaker[Session]) -> None:
    with catalog() as s:
        tenants.create_tenant(s, "acme")
        s.commit()
    with catalog() as s, pytest.raises(tenants.TenantExists, match="'acme' already exists"):
        tenants.create_tenant(s, "acme")
    with catalog() as s:
        assert [t.name for t in tenants.list_tenants(s)] == ["acme"]
        assert len(s.scalars(select(ApiKey)).all()) == 1


@pytest.mark.parametrize("name", ["", "Acme", "-acme", "_x", "a b", "a/b", "é", "a" * 64, "acme\n"])
def test_invalid_names_are_refused(name: str) -> None:
    with pytest.raises(tenants.InvalidTenantName, match="invalid tenant name"):
        tenants.validate_tenant_name(name)


def test_create_tenant_validates_the_name(db_session: Session) -> None:
    with pytest.raises(tenants.InvalidTenantName, match="'Acme'"):
        tenants.create_tenant(db_session, "Acme")
    assert db_session.scalars(select(Tenant)).all() == []


@pytest.mark.parametrize("name", ["a", "0", "acme-2_b", "a" * 63])
def test_valid_names_are_accepted(name: str) -> None:
    assert tenants.validate_tenant_name(name) == name


def test_quotas_and_listing(db_session: Session) -> None:
    quotas = tenants.TenantQuotas(requests_per_minute=60, max_storage_bytes=10 * 2**30)
    tenants.create_tenant(db_session, "zeta", quotas)
    tenants.create_tenant(db_session, "alpha")
    db_session.commit()
    assert [t.name for t in tenants.list_tenants(db_session)] == ["alpha", "zeta"]
    zeta = tenants.get_tenant(db_session, "zeta")
    assert tenants.TenantQuotas.of(zeta) == quotas
    assert zeta.max_storage_bytes == 10 * 2**30 and zeta.tokens_per_minute is None
    tenants.set_quotas(db_session, "zeta", tenants.TenantQuotas(max_models=2))
    db_session.commit()
    assert (zeta.requests_per_minute, zeta.max_models) == (None, 2)
    with pytest.raises(tenants.InvalidQuota):
        tenants.TenantQuotas(max_concurrent=-1)
    with pytest.raises(tenants.TenantNotFound):
        tenants.get_tenant(db_session, "nobody")


def test_delete_tenant(db_session: Session) -> None:
    acme, key = tenants.create_tenant(db_session, "acme")
    db_session.add(Model(tenant=acme, name="m", kind=ModelKind.FULL))
    db_session.commit()
    with pytest.raises(tenants.TenantHasModels, match="1 model"):
        tenants.delete_tenant(db_session, "acme")
    db_session.rollback()
    db_session.execute(text("DELETE FROM models"))
    tenants.delete_tenant(db_session, "acme")
    db_session.commit()
    assert db_session.scalars(select(Tenant)).all() == []
    assert db_session.scalars(select(ApiKey)).all() == []
    assert tenants.authenticate(db_session, key) is None
    actions = db_session.scalars(select(AuditLog.action).order_by(AuditLog.id)).all()
    assert actions == ["tenant.create", "tenant.delete"]


def tenant_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    tenant_command.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    result: int = args.handler(args)
    return result


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BLOCKZOO_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("BLOCKZOO_DATABASE_URL", raising=False)
    return tmp_path


def test_cli_create_prints_only_the_json(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tenant_cli("tenant", "create", "acme", "--json", "--max-models", "4") == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    document = json.loads(out)
    assert list(document) == ["tenant", "api_key"]
    assert document["tenant"] == "acme" and KEY_RE.fullmatch(document["api_key"])

    factory = open_catalog(f"sqlite:///{data_dir / 'catalog.db'}", auto_migrate=False)
    try:
        with factory() as s:
            tenant = tenants.authenticate(s, document["api_key"])
            assert tenant is not None and tenant.name == "acme" and tenant.max_models == 4
    finally:
        factory_engine(factory).dispose()

    assert tenant_cli("tenant", "list", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(r["tenant"], r["active_keys"], r["quotas"]["max_models"]) for r in listed] == [("acme", 1, 4)]


def test_cli_errors_go_to_stderr(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tenant_cli("tenant", "create", "acme", "--json") == 0
    capsys.readouterr()
    assert tenant_cli("tenant", "create", "acme", "--json") == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "already exists" in captured.err
    assert tenant_cli("tenant", "create", "Bad Name") == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "invalid tenant name" in captured.err


def test_cli_keys_lifecycle(pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert tenant_cli("tenant", "create", "acme", "--url", pg_url) == 2  # Postgres is never auto-migrated
    assert "blockzoo db upgrade" in capsys.readouterr().err
    migrate.upgrade(pg_url)
    assert tenant_cli("tenant", "create", "acme", "--json", "--url", pg_url) == 0
    first = json.loads(capsys.readouterr().out)["api_key"]
    assert tenant_cli("tenant", "add-key", "acme", "--json", "--url", pg_url) == 0
    second = json.loads(capsys.readouterr().out)["api_key"]
    assert tenant_cli("tenant", "keys", "acme", "--json", "--url", pg_url) == 0
    prefixes = [k["prefix"] for k in json.loads(capsys.readouterr().out)]
    assert sorted(prefixes) == sorted([first[:12], second[:12]])
    assert tenant_cli("tenant", "revoke-key", "acme", second[:12], "--url", pg_url) == 0
    assert tenant_cli("tenant", "delete", "acme", "--url", pg_url) == 0
    capsys.readouterr()
    assert tenant_cli("tenant", "list", "--json", "--url", pg_url) == 0
    assert json.loads(capsys.readouterr().out) == []
