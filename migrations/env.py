"""Alembic environment of the catalog.

It is run by `zoo.catalog.migrate`, which puts either an open `connection` or a `url` into
`config.attributes`; nothing is read from an ini file or from global state.

On SQLite the whole run is one `BEGIN IMMEDIATE` transaction: SQLite's DDL is transactional, so a
failed migration leaves nothing half-done, and two processes that start at once take turns instead of
both creating tables. Foreign keys are switched off meanwhile, as batch mode recreates tables
(Alembic's advice), and checked before commit.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from zoo.catalog.database import make_engine
from zoo.catalog.models import Base

# Any constant works; it only has to be the same for every BlockZoo process.
_PG_MIGRATION_LOCK = 0x0B10C200


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def _migrate_sqlite(connection: Connection) -> None:
    if connection.in_transaction():
        raise RuntimeError("migrations need a connection that has no transaction open")
    connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
    try:
        connection.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            _configure(connection)
            context.run_migrations()
            violations = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if violations:
                raise RuntimeError(f"migration left rows that break foreign keys: {violations[:5]}")
        except BaseException:
            connection.rollback()
            raise
        connection.commit()
    finally:
        connection.exec_driver_sql("PRAGMA foreign_keys=ON")
        connection.commit()


def _migrate_other(connection: Connection) -> None:
    _configure(connection)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
        context.run_migrations()
    connection.commit()


def _migrate(connection: Connection) -> None:
    if connection.dialect.name == "sqlite":
        _migrate_sqlite(connection)
    else:
        _migrate_other(connection)


def run() -> None:
    """Run the migrations Alembic asked for, online against a connection or offline as SQL text."""
    attributes = context.config.attributes
    connection: Connection | None = attributes.get("connection")
    url = attributes.get("url")
    if context.is_offline_mode():
        if url is None:
            raise RuntimeError("offline migrations need config.attributes['url']")
        context.configure(
            url=url,
            target_metadata=Base.metadata,
            literal_binds=True,
            render_as_batch=str(url).startswith("sqlite"),
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    if connection is not None:
        _migrate(connection)
        return
    if url is None:
        raise RuntimeError("set config.attributes['connection'] or ['url'] (see zoo.catalog.migrate)")
    engine = make_engine(url)
    try:
        with engine.connect() as own_connection:
            _migrate(own_connection)
    finally:
        engine.dispose()


run()
