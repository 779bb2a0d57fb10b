"""The last known catalog answers: used only when the database is unreachable, dropped when not found."""

from __future__ import annotations

from typing import NoReturn

import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

from router.catalog_fallback import LastKnown
from router.errors import is_database_unavailable
from zoo.errors import NotFoundError


def unreachable() -> NoReturn:
    raise OperationalError("SELECT 1", {}, Exception("connection refused"))


def test_the_last_answer_is_served_only_while_the_database_is_unreachable() -> None:
    store: LastKnown[str] = LastKnown("model")
    assert store.lookup("k", lambda: "v1") == "v1"
    assert store.lookup("k", unreachable) == "v1"
    # A fresh answer replaces it; an unknown key still gets the database's error.
    assert store.lookup("k", lambda: "v2") == "v2"
    assert store.lookup("k", unreachable) == "v2"
    with pytest.raises(OperationalError):
        store.lookup("other", unreachable)


def test_not_found_and_other_errors_drop_the_entry_and_pass_through() -> None:
    store: LastKnown[str] = LastKnown("API key")
    store.lookup("revoked", lambda: "tenant")
    assert store.lookup("revoked", lambda: None) is None
    with pytest.raises(OperationalError):
        store.lookup("revoked", unreachable)
    store.lookup("deleted", lambda: "model")

    def gone() -> str:
        raise NotFoundError("no such model")

    with pytest.raises(NotFoundError):
        store.require("deleted", gone)
    with pytest.raises(OperationalError):
        store.lookup("deleted", unreachable)


def test_a_catalog_change_empties_it_and_it_is_bounded() -> None:
    store: LastKnown[int] = LastKnown("model", max_entries=3)
    for i in range(5):
        store.lookup(i, lambda i=i: i)  # type: ignore[misc]
    assert len(store) == 3
    with pytest.raises(OperationalError):
        store.lookup(0, unreachable)  # the oldest went first
    assert store.lookup(4, unreachable) == 4
    store.clear()
    with pytest.raises(OperationalError):
        store.lookup(4, unreachable)


def test_only_connection_failures_count_as_unreachable() -> None:
    assert is_database_unavailable(OperationalError("x", {}, Exception("gone")))
    assert not is_database_unavailable(IntegrityError("x", {}, Exception("duplicate")))
    assert not is_database_unavailable(ValueError("x"))
    wrapped = RuntimeError("job failed")
    wrapped.__cause__ = OperationalError("x", {}, Exception("gone"))
    assert is_database_unavailable(wrapped)
