"""Engines and session factories for the catalog, from a SQLAlchemy URL.

SQLite (the embedded default) gets the pragmas a multi-threaded server needs: foreign keys enforced
(off by default in SQLite), WAL so readers do not block the writer, and a busy timeout so a second
writer waits instead of failing at once.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry, StaticPool

DEFAULT_BUSY_TIMEOUT_MS = 10_000


class CatalogSchemaError(RuntimeError):
    """The catalog database is not at the schema revision this code needs."""


def is_sqlite(url: str | URL) -> bool:
    """Whether `url` names a SQLite database."""
    return make_url(url).get_backend_name() == "sqlite"


def _is_sqlite_memory(url: URL) -> bool:
    database = url.database or ""
    return database in ("", ":memory:") or url.query.get("mode") == "memory"


def make_engine(
    url: str | URL, *, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS, echo: bool = False
) -> Engine:
    """An engine for `url`; for SQLite it creates the file's folder and sets the pragmas on every connection."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed, echo=echo, pool_pre_ping=True)

    memory = _is_sqlite_memory(parsed)
    kwargs: dict[str, Any] = {"echo": echo}
    if memory:
        # One shared connection, or every pooled connection would see its own empty database.
        kwargs["poolclass"] = StaticPool
        kwargs["connect_args"] = {"check_same_thread": False}
    elif parsed.database:
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed, **kwargs)

    def set_pragmas(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            if not memory:
                _enable_wal(cursor, busy_timeout_ms)
                # With WAL, NORMAL loses no committed data on a crash of the process, only of the OS.
                cursor.execute("PRAGMA synchronous=NORMAL")
        finally:
            cursor.close()

    event.listen(engine, "connect", set_pragmas)
    return engine


def _enable_wal(cursor: Any, busy_timeout_ms: int) -> None:
    # Switching to WAL can answer SQLITE_BUSY without consulting the busy handler (while another
    # process opens or recovers the WAL), so retry it for as long as the busy timeout allows.
    deadline = time.monotonic() + busy_timeout_ms / 1000
    delay = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions bound to `engine`; objects stay readable after commit (no implicit reload)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def factory_engine(factory: sessionmaker[Session]) -> Engine:
    """The engine a session factory from this module is bound to (to dispose of it)."""
    bind = factory.kw.get("bind")
    if not isinstance(bind, Engine):
        raise TypeError("session factory is not bound to an Engine")
    return bind


def open_catalog(url: str | URL, auto_migrate: bool) -> sessionmaker[Session]:
    """Sessions on the catalog at `url`, whose schema is checked to be at the latest revision.

    With `auto_migrate`, a SQLite catalog is upgraded first (the embedded default is migrated on start).
    Other databases are shared by several processes, so they are migrated explicitly with
    `blockzoo db upgrade`; here they are only checked. Raises `CatalogSchemaError` when not at head.
    """
    # migrate builds its engines with make_engine, so it is imported here rather than at the top.
    from zoo.catalog import migrate

    engine = make_engine(url)
    try:
        if auto_migrate and is_sqlite(engine.url):
            migrate.upgrade(engine)
        current, head = migrate.current_revision(engine), migrate.head_revision()
        if current != head:
            where = engine.url.render_as_string(hide_password=True)
            raise CatalogSchemaError(
                f"catalog {where} is at schema revision {current or 'none'}, this BlockZoo needs {head}; "
                f"run `blockzoo db upgrade --url {where}`"
            )
    except BaseException:
        engine.dispose()
        raise
    return session_factory(engine)
