"""The last catalog answer for each API key and model, used only while the database is unreachable.

`CatalogCache` keeps lookups for a couple of seconds to save the database work; this keeps them so
that an outage of the database does not stop inference on models already served. A lookup that
fails because the database is unreachable (`is_database_unavailable`) gets the last answer that
succeeded for the same key; one never seen before fails as before (a 503). A lookup that succeeds
replaces the entry, one that finds nothing (a revoked key, a deleted model) drops it, and any
catalog change this process commits empties the whole store, as it does the cache.

Keys are held by their SHA-256 digest, never in clear. The store is bounded and forgets the least
recently used entries first.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from router.errors import is_database_unavailable

log = logging.getLogger(__name__)

V = TypeVar("V")
DEFAULT_MAX_ENTRIES = 10_000


class LastKnown(Generic[V]):
    """Last successful lookups by key; `lookup` consults it only when the database is unreachable."""

    def __init__(self, what: str, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.what = what
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._items: OrderedDict[Hashable, V] = OrderedDict()
        self._outage = False

    def lookup(self, key: Hashable, fetch: Callable[[], V | None]) -> V | None:
        """`fetch()`, remembered under `key`; if the database is unreachable, the last answer for `key`
        (or the database's error when there is none). Other errors, and None, pass through."""
        try:
            value = fetch()
        except Exception as exc:
            if not is_database_unavailable(exc):
                # Not found, or anything else the database said: the last answer no longer holds.
                self.forget(key)
                raise
            with self._lock:
                found = self._items.get(key)
                first = not self._outage
                self._outage = True
            if found is None:
                raise
            if first:
                # Once per outage: every request would otherwise log the same line.
                log.warning("catalog unreachable: serving the last known %s entries", self.what)
            return found
        with self._lock:
            if self._outage:
                self._outage = False
                log.warning("catalog answers again: %s lookups use it", self.what)
            if value is None:
                self._items.pop(key, None)
            else:
                self._items[key] = value
                self._items.move_to_end(key)
                while len(self._items) > self.max_entries:
                    self._items.popitem(last=False)
        return value

    def require(self, key: Hashable, fetch: Callable[[], V]) -> V:
        """`lookup` for a fetch that raises rather than answering None (such as resolving a model)."""
        found = self.lookup(key, fetch)
        if found is None:
            raise LookupError(f"{self.what} lookup answered nothing")
        return found

    def forget(self, key: Hashable) -> None:
        with self._lock:
            self._items.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
