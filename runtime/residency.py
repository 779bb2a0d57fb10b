"""Block residency: blocks are loaded on demand into a weights budget and evicted least recently used.

A block used by the running batch is pinned and never evicted. A background loader prefetches
the blocks of queued requests (BlockLLM's speculative loading) so a step rarely waits on a load.
On a GPU "resident" means in device memory; on the CPU it means copied out of the block file
into process memory, so an evicted block really has to be read again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

Loader = Callable[[], tuple[Any, int]]


@dataclass
class ResidencyStats:
    """Counters for metrics and tests."""

    resident_bytes: int = 0
    peak_resident_bytes: int = 0
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    load_seconds: float = 0.0
    prefetched: int = 0
    over_budget: int = 0


class _Entry:
    __slots__ = ("nbytes", "pins", "value")

    def __init__(self, value: Any, nbytes: int) -> None:
        self.value = value
        self.nbytes = nbytes
        self.pins = 0


class BlockResidency:
    """Resident blocks by key under a byte budget (None: unbounded)."""

    def __init__(self, budget_bytes: int | None, prefetch: bool = True) -> None:
        self.budget = budget_bytes
        self.stats = ResidencyStats()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Condition()
        self._loading: set[str] = set()
        self._queue: queue.SimpleQueue[tuple[str, Loader] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        if prefetch:
            self._thread = threading.Thread(target=self._prefetch_loop, name="blockzoo-prefetch", daemon=True)
            self._thread.start()

    def is_resident(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def resident_keys(self) -> set[str]:
        with self._lock:
            return set(self._entries)

    def get(self, key: str, loader: Loader) -> Any:
        """The block, loading it (and evicting others) if it is not resident."""
        with self._lock:
            while True:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    self.stats.hits += 1
                    return entry.value
                if key not in self._loading:
                    break
                self._lock.wait()  # another thread (the prefetcher) is loading it
            self.stats.misses += 1
            self._loading.add(key)
        return self._load(key, loader)

    def _load(self, key: str, loader: Loader) -> Any:
        try:
            start = time.perf_counter()
            value, nbytes = loader()
            elapsed = time.perf_counter() - start
        except BaseException:
            with self._lock:
                self._loading.discard(key)
                self._lock.notify_all()
            raise
        with self._lock:
            self._loading.discard(key)
            self.stats.loads += 1
            self.stats.load_seconds += elapsed
            self._make_room(nbytes)
            self._entries[key] = _Entry(value, nbytes)
            self.stats.resident_bytes += nbytes
            self.stats.peak_resident_bytes = max(self.stats.peak_resident_bytes, self.stats.resident_bytes)
            self._lock.notify_all()
            return value

    def _make_room(self, nbytes: int) -> None:
        if self.budget is None:
            return
        for key in list(self._entries):
            if self.stats.resident_bytes + nbytes <= self.budget:
                return
            entry = self._entries[key]
            if entry.pins == 0:
                del self._entries[key]
                self.stats.resident_bytes -= entry.nbytes
                self.stats.evictions += 1
        if self.stats.resident_bytes + nbytes > self.budget:
            # Everything left is pinned by the running batch: admit the block over budget rather
            # than fail the step; the scheduler keeps such batches rare.
            self.stats.over_budget += 1

    def pin(self, keys: list[tuple[str, Loader]]) -> None:
        """Load (if needed) and pin blocks for the duration of a step."""
        for key, loader in keys:
            while True:
                self.get(key, loader)
                with self._lock:
                    entry = self._entries.get(key)
                    if entry is not None:  # else a concurrent load evicted it meanwhile: load again
                        entry.pins += 1
                        break

    def unpin(self, keys: list[str]) -> None:
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None and entry.pins > 0:
                    entry.pins -= 1
            # A step that had to go over budget gives the excess back as soon as it ends.
            self._make_room(0)

    def prefetch(self, items: list[tuple[str, Loader]]) -> None:
        """Queue blocks for the background loader; it skips what is resident by then."""
        for key, loader in items:
            if not self.is_resident(key):
                self._queue.put((key, loader))

    def _prefetch_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            key, loader = item
            with self._lock:
                if key in self._entries or key in self._loading:
                    continue
                if self.budget is not None and self._free_after_eviction() < 1:
                    continue
                self._loading.add(key)
            try:
                self._load(key, loader)
                self.stats.prefetched += 1
            except Exception:  # a failed prefetch is retried by the on-demand load
                log.exception("prefetch failed", extra={"block": key})

    def _free_after_eviction(self) -> int:
        if self.budget is None:
            return 1 << 62
        unpinned = sum(e.nbytes for e in self._entries.values() if e.pins == 0)
        return self.budget - self.stats.resident_bytes + unpinned

    def shutdown(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None
