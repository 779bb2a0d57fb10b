"""Catalog fixtures on real databases: a SQLite file and a throwaway PostgreSQL database per test.

PostgreSQL is the server at 127.0.0.1:5432 (trust auth, database `test`) that `make services` starts;
BLOCKZOO_TEST_POSTGRES_URL overrides the admin URL. Databases are named `bz_test_<random>`, created
through an AUTOCOMMIT admin connection and dropped at teardown: one per test for `pg_url` (empty), one
per session for `migrated_url` (at head, emptied before each test).
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, inspect
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from zoo.catalog import migrate
from zoo.catalog.database import factory_engine, open_catalog

PG_ADMIN_CANDIDATES = (
    "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    "postgresql+psycopg://root@127.0.0.1:5432/test",
)
BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[Engine]:
    """An AUTOCOMMIT engine on the server's `test` database, as the first role that can connect."""
    override = os.environ.get("BLOCKZOO_TEST_POSTGRES_URL")
    candidates = (override,) if override else PG_ADMIN_CANDIDATES
    errors: list[str] = []
    for url in candidates:
        engine = create_engine(url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect():
                pass
        except OperationalError as exc:
            engine.dispose()
            errors.append(f"{url}: {exc.orig}")
            continue
        yield engine
        engine.dispose()
        return
    pytest.fail("no PostgreSQL for the catalog tests (run `make services`):\n" + "\n".join(errors))


def _create_database(admin: Engine) -> str:
    name = f"bz_test_{secrets.token_hex(6)}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    return name


def _drop_database(admin: Engine, name: str) -> None:
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _url_of(admin: Engine, name: str) -> str:
    return admin.url.set(database=name).render_as_string(hide_password=False)


@pytest.fixture
def pg_url(pg_admin: Engine) -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database, dropped after the test."""
    name = _create_database(pg_admin)
    try:
        yield _url_of(pg_admin, name)
    finally:
        _drop_database(pg_admin, name)


@pytest.fixture
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The URL of a SQLite file that does not exist yet, in a fresh folder."""
    return f"sqlite:///{tmp_path_factory.mktemp('catalog') / 'catalog.db'}"


@pytest.fixture(params=BACKENDS)
def empty_url(request: pytest.FixtureRequest) -> str:
    """An empty catalog database: once on SQLite, once on PostgreSQL."""
    url: str = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    return url


# Migrating, or creating a PostgreSQL database, takes a good part of a second. Tests that only need a
# migrated catalog share one PostgreSQL database, emptied before each test, and copy one SQLite file.
@pytest.fixture(scope="session")
def pg_migrated_database(pg_admin: Engine) -> Iterator[str]:
    """The URL of a PostgreSQL database at head, shared by the tests of this session."""
    name = _create_database(pg_admin)
    try:
        url = _url_of(pg_admin, name)
        migrate.upgrade(url)
        yield url
    finally:
        _drop_database(pg_admin, name)


def _empty_tables(url: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            tables = [t for t in inspect(conn).get_table_names() if t != "alembic_version"]
            if tables:
                names = ", ".join(f'"{t}"' for t in tables)
                conn.exec_driver_sql(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def sqlite_migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite catalog file at head that tests copy (its WAL is checkpointed when the engine closes)."""
    path = tmp_path_factory.mktemp("catalog_template") / "catalog.db"
    migrate.upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(params=BACKENDS)
def migrated_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A catalog database at head with no rows: once on SQLite, once on PostgreSQL."""
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("sqlite_migrated_template")
        target = tmp_path_factory.mktemp("catalog") / "catalog.db"
        shutil.copyfile(template, target)
        yield f"sqlite:///{target}"
        return
    url: str = request.getfixturevalue("pg_migrated_database")
    _empty_tables(url)
    yield url


@pytest.fixture
def catalog(migrated_url: str) -> Iterator[sessionmaker[Session]]:
    """Sessions on a catalog migrated to head, on each backend."""
    factory = open_catalog(migrated_url, auto_migrate=False)
    try:
        yield factory
    finally:
        factory_engine(factory).dispose()


@pytest.fixture
def db_session(catalog: sessionmaker[Session]) -> Iterator[Session]:
    """One session on a migrated catalog, closed after the test."""
    with catalog() as s:
        yield s
