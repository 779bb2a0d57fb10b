"""The catalog's answers on the request path, kept for a few seconds.

Every inference request needs its API key's tenant and its model's catalog entry. Asked of the
database each time, they cost two worker-thread hops and about a millisecond of GIL-holding SQLAlchemy
per request, which the engine thread pays for in step time. Here they are kept for `ttl_s`, and
dropped at once whenever this process commits a change to the catalog (`on_catalog_change`), so a key
revoked or a model deleted through this server's API stops working immediately; through another
process (the CLI, a second server) within `ttl_s`.

Keys are held by their SHA-256 digest, never in clear. Only successful lookups are kept, so an
unknown key or model is always asked of the database (and a newly registered model is served at once).
A lookup that raced with a change is not kept: `put_*` takes the `generation` read before the lookup
and drops the answer if the catalog changed since.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class _TTLMap(Generic[K, V]):
    """A bounded map whose entries expire `ttl_s` after they were put."""

    def __init__(self, ttl_s: float, max_entries: int, clock: Callable[[], float]) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] <= self._clock():
            self._items.pop(key, None)
            return None
        return item[1]

    def put(self, key: K, value: V) -> None:
        if self.ttl_s <= 0:
            return
        self._items[key] = (self._clock() + self.ttl_s, value)
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class CatalogCache(Generic[K, V]):
    """Principals by API-key digest and catalog entries by (tenant, model name), for `ttl_s` seconds."""

    def __init__(
        self, ttl_s: float, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._lock = threading.Lock()
        self._principals: _TTLMap[bytes, K] = _TTLMap(ttl_s, max_entries, clock)
        self._models: _TTLMap[tuple[str, str], V] = _TTLMap(ttl_s, max_entries, clock)
        self.generation = 0

    def principal(self, key: str) -> K | None:
        with self._lock:
            return self._principals.get(key_digest(key))

    def put_principal(self, key: str, principal: K, generation: int) -> None:
        with self._lock:
            if generation == self.generation:
                self._principals.put(key_digest(key), principal)

    def model(self, tenant: str, name: str) -> V | None:
        with self._lock:
            return self._models.get((tenant, name))

    def put_model(self, tenant: str, name: str, ref: V, generation: int) -> None:
        with self._lock:
            if generation == self.generation:
                self._models.put((tenant, name), ref)

    def invalidate(self) -> None:
        """Forget everything: the catalog changed."""
        with self._lock:
            self._principals.clear()
            self._models.clear()
            self.generation += 1
