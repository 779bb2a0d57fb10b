"""Usage accounting: tokens and requests per (tenant, model, UTC hour), one row each.

Each finished request adds to its hour's row with one `INSERT … ON CONFLICT DO UPDATE`, so concurrent
recorders (threads, or several API processes) never lose an update or create a second row. `record` is
synchronous database work: call it from a thread (`run_in_threadpool`), not on the event loop.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from fastapi import Request
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


class UsageRecorder:
    """Adds finished requests to the zoo catalog's `usage` table."""

    def __init__(self, zoo: Zoo) -> None:
        dialect = factory_engine(zoo.sessions).dialect.name
        insert = _INSERTS.get(dialect)
        if insert is None:
            raise ValueError(f"usage recording supports SQLite and PostgreSQL, not {dialect}")
        self._zoo = zoo
        self._insert = insert

    def record(
        self, tenant_id: int, model_id: int, prompt_tokens: int, completion_tokens: int, at: datetime
    ) -> bool:
        """Add one request of `prompt_tokens` + `completion_tokens` to its hour's row.

        Returns False, with a warning logged, when the tenant or model no longer exists (deleted
        while the request ran): there is nothing left to bill it to.
        """
        if prompt_tokens < 0 or completion_tokens < 0:
            raise ValueError(f"token counts must be >= 0, got {prompt_tokens} and {completion_tokens}")
        table = Usage.__table__
        stmt = self._insert(table).values(
            tenant_id=tenant_id,
            model_id=model_id,
            hour=hour_of(at),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            requests=1,
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[table.c.tenant_id, table.c.model_id, table.c.hour],
            set_={
                "prompt_tokens": table.c.prompt_tokens + stmt.excluded.prompt_tokens,
                "completion_tokens": table.c.completion_tokens + stmt.excluded.completion_tokens,
                "requests": table.c.requests + stmt.excluded.requests,
            },
        )
        try:
            with self._zoo.sessions() as session, session.begin():
                session.execute(stmt)
        except IntegrityError as exc:
            log.warning(
                "usage of tenant %d on model %d not recorded: %s", tenant_id, model_id, exc.orig or exc
            )
            return False
        return True


def get_usage(request: Request) -> UsageRecorder:
    usage: UsageRecorder = request.app.state.usage
    return usage
