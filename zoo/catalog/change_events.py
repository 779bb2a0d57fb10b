"""Telling caches that the catalog changed: a callback after every commit that wrote catalog rows.

Sessions from one factory report a commit that flushed ORM objects (new, changed or deleted rows)
or ran an ORM UPDATE or DELETE; a key's `last_used_at` alone does not count. Plain INSERT statements, which is how usage is recorded, do not count:
usage is not something a cache holds, and it is written all the time.

This sees only this process's commits. Other processes (the CLI, other API servers) are covered by
the caches' time-to-live.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import event, inspect
from sqlalchemy.orm import ORMExecuteState, Session, sessionmaker

# Columns that are bookkeeping, not anything a cache holds: a key's last use is written as requests
# authenticate, and must not empty the caches each time.
_BOOKKEEPING = frozenset({("api_keys", "last_used_at")})


def _changed(obj: object) -> bool:
    state = inspect(obj)
    table = getattr(type(obj), "__tablename__", "")
    return any(attr.history.has_changes() and (table, attr.key) not in _BOOKKEEPING for attr in state.attrs)


def on_catalog_change(factory: sessionmaker[Session], callback: Callable[[], None]) -> None:
    """Call `callback` after each commit, in sessions of `factory`, that changed catalog rows."""
    # Each listener keeps its own mark, so that several of them on one factory all hear of a change.
    flag = object()

    def before_flush(session: Session, _context: Any, _instances: Any) -> None:
        if session.new or session.deleted or any(_changed(obj) for obj in session.dirty):
            session.info[flag] = True

    def do_orm_execute(state: ORMExecuteState) -> None:
        if state.is_update or state.is_delete:
            state.session.info[flag] = True

    def after_commit(session: Session) -> None:
        if session.info.pop(flag, False):
            callback()

    def after_rollback(session: Session) -> None:
        session.info.pop(flag, None)

    event.listen(factory, "before_flush", before_flush)
    event.listen(factory, "do_orm_execute", do_orm_execute)
    event.listen(factory, "after_commit", after_commit)
    event.listen(factory, "after_soft_rollback", lambda session, _tx: after_rollback(session))
