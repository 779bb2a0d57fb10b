"""Run the catalog's Alembic migrations from Python, without an alembic.ini.

The Alembic `Config` is built here: its script location is the `migrations` package folder (so it works
from an installed package), and the connection travels in `Config.attributes`, which `migrations/env.py`
reads. Nothing is kept between calls.

Alembic's `context` and `op` are process-wide proxies, so two threads migrating at once would trample
each other; `_ALEMBIC_LOCK` runs one migration at a time per process. Separate processes take turns:
on PostgreSQL through an advisory lock (see `migrations/env.py`), on a SQLite file through an OS lock
on a file beside it.
"""

from __future__ import annotations

import contextlib
import fcntl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine
from sqlalchemy.engine import URL, make_url

import migrations
from zoo.catalog.database import make_engine

MIGRATIONS_DIR = Path(migrations.__file__).resolve().parent

Target = str | URL | Engine

# Guards Alembic's own process-global proxies, not state of ours.
_ALEMBIC_LOCK = threading.Lock()


def alembic_config(connection: Connection | None = None, url: str | URL | None = None) -> Config:
    """An Alembic config for the catalog migrations, bound to `connection` (preferred) or `url`."""
    config = Config()
    # ConfigParser interpolates '%', so escape it in the path.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.attributes["connection"] = connection
    config.attributes["url"] = url
    return config


@contextmanager
def _connection(target: Target) -> Iterator[Connection]:
    engine = target if isinstance(target, Engine) else make_engine(target)
    try:
        with engine.connect() as connection:
            yield connection
    finally:
        if engine is not target:
            engine.dispose()


@contextmanager
def _sqlite_file_lock(database: str) -> Iterator[None]:
    # SQLite's own locks can answer "database is locked" without waiting (while a first process
    # turns on WAL), so processes migrating one file take turns on an OS lock beside it first.
    lock_path = Path(database).expanduser()
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{lock_path}.migrate-lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _process_lock(target: Target) -> contextlib.AbstractContextManager[None]:
    url = target.url if isinstance(target, Engine) else make_url(target)
    database = url.database or ""
    if (
        url.get_backend_name() != "sqlite"
        or database in ("", ":memory:")
        or url.query.get("mode") == "memory"
    ):
        return nullcontext()
    return _sqlite_file_lock(database)


def _run(target: Target, action: Callable[[Config], None]) -> None:
    with _ALEMBIC_LOCK, _process_lock(target), _connection(target) as connection:
        action(alembic_config(connection=connection))
        connection.commit()


def upgrade(target: Target, revision: str = "head") -> None:
    """Upgrade the catalog at `target` (a URL or an engine) to `revision`."""
    _run(target, lambda config: command.upgrade(config, revision))


def downgrade(target: Target, revision: str) -> None:
    """Downgrade the catalog at `target` to `revision` (`base` removes every table)."""
    _run(target, lambda config: command.downgrade(config, revision))


def current_revision(target: Target) -> str | None:
    """The revision the catalog at `target` is at, or None when it was never migrated."""
    with _connection(target) as connection:
        revision = MigrationContext.configure(connection).get_current_revision()
        connection.rollback()
        return revision


def head_revision() -> str:
    """The newest revision the migrations define."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations found in {MIGRATIONS_DIR}")
    return head
