"""Usage accounting: tokens and requests per (tenant, model, UTC hour), one row each.

Usage is added to its hour's row with `INSERT … ON CONFLICT DO UPDATE`, so concurrent recorders
(threads, or several API processes) never lose an update or create a second row. The server sums
requests in memory first (`router.usage_buffer`) and writes the sums here about once a second.
Recording is synchronous database work: call it from a thread, not on the event loop.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any, NamedTuple

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from zoo.catalog.database import factory_engine
from zoo.catalog.models import Usage
from zoo.registry import Zoo

log = logging.getLogger(__name__)

_INSERTS: dict[str, Any] = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}


def hour_of(at: datetime) -> datetime:
    """The start of the UTC hour containing `at` (which must be timezone-aware)."""
    if at.tzinfo is None:
        raise ValueError(f"naive datetime {at!r}: usage times must be timezone-aware")
    return at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


class UsageRow(NamedTuple):
    """Tokens and requests of one tenant on one model in one UTC hour."""

    tenant_id: int
    model_id: int
    hour: datetime  # any moment of the hour: record_many rounds it down
    prompt_tokens: int
    completion_tokens: int
    requests: int


class UsageRecorder:
    """Adds finished requests to the zoo catalog's `usage` table."""

    def __init__(self, zoo: Zoo) -> None:
        dialect = factory_engine(zoo.sessions).dialect.name
        insert = _INSERTS.get(dialect)
        if insert is None:
            raise ValueError(f"usage recording supports SQLite and PostgreSQL, not {dialect}")
        self._engine = factory_engine(zoo.sessions)
        self._upsert = self._upsert_statement(insert)

    def record(
        self,
        tenant_id: int,
        model_id: int,
        prompt_tokens: int,
        completion_tokens: int,
        at: datetime,
        requests: int = 1,
    ) -> bool:
        """Add `requests` requests of `prompt_tokens` + `completion_tokens` in all to `at`'s hour row.

        Returns False, with a warning logged, when the tenant or model no longer exists (deleted
        while the request ran): there is nothing left to bill it to.
        """
        return (
            self.record_many([UsageRow(tenant_id, model_id, at, prompt_tokens, completion_tokens, requests)])
            == 1
        )

    def record_many(self, rows: list[UsageRow]) -> int:
        """Add every row in one transaction; returns how many were recorded.

        If one of them names a tenant or model deleted meanwhile, the rows are retried one by one so
        that only the orphans are dropped (with a warning).
        """
        for row in rows:
            if row.prompt_tokens < 0 or row.completion_tokens < 0 or row.requests < 0:
                raise ValueError(f"usage counts must be >= 0, got {row}")
        try:
            # One statement, executed for every row (executemany): compiled once, not per row.
            with self._engine.begin() as conn:
                conn.execute(self._upsert, [row._asdict() | {"hour": hour_of(row.hour)} for row in rows])
            return len(rows)
        except IntegrityError as exc:
            if len(rows) > 1:
                return sum(self.record_many([row]) for row in rows)
            log.warning(
                "usage of tenant %d on model %d not recorded: %s",
                rows[0].tenant_id,
                rows[0].model_id,
                exc.orig or exc,
            )
            return 0

    @staticmethod
    def _upsert_statement(insert: Any) -> Any:
        table = Usage.__table__
        stmt = insert(table)
        return stmt.on_conflict_do_update(
            index_elements=[table.c.tenant_id, table.c.model_id, table.c.hour],
            set_={
                "prompt_tokens": table.c.prompt_tokens + stmt.excluded.prompt_tokens,
                "completion_tokens": table.c.completion_tokens + stmt.excluded.completion_tokens,
                "requests": table.c.requests + stmt.excluded.requests,
            },
        )
