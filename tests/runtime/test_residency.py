"""BlockResidency: LRU eviction within the budget, pins, and background prefetch."""

from __future__ import annotations

import threading
import time

from runtime.residency import BlockResidency, Loader


def loader_for(name: str, size: int, calls: list[str]) -> Loader:
    def load() -> tuple[object, int]:
        calls.append(name)
        return object(), size

    return load


def test_lru_eviction_respects_budget_and_pins() -> None:
    calls: list[str] = []
    r = BlockResidency(budget_bytes=300, prefetch=False)
    items = {k: loader_for(k, 100, calls) for k in "abcd"}
    for k in "abc":
        r.get(k, items[k])
    assert r.stats.resident_bytes == 300 and calls == ["a", "b", "c"]
    r.get("a", items["a"])  # a is now most recently used
    r.get("d", items["d"])  # evicts b, the least recently used
    assert r.resident_keys() == {"a", "c", "d"} and r.stats.evictions == 1
    assert r.stats.hits == 1 and r.stats.misses == 4
    r.pin([("c", items["c"]), ("d", items["d"])])
    r.get("b", items["b"])  # must evict a: c and d are pinned
    assert r.resident_keys() == {"b", "c", "d"}
    r.pin([("b", items["b"])])
    r.get("a", items["a"])  # everything pinned: admitted over budget rather than evicting a pinned block
    assert {"b", "c", "d"} <= r.resident_keys() and r.stats.over_budget == 1
    r.unpin(["b", "c", "d"])
    r.get("b", items["b"])
    assert r.stats.resident_bytes <= 400


def test_prefetch_loads_in_background_and_get_waits_for_it() -> None:
    started, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def slow() -> tuple[object, int]:
        calls.append("slow")
        started.set()
        release.wait(5)
        return "value", 10

    r = BlockResidency(budget_bytes=None)
    try:
        r.prefetch([("x", slow)])
        assert started.wait(5)
        result: list[object] = []
        getter = threading.Thread(target=lambda: result.append(r.get("x", slow)))
        getter.start()
        time.sleep(0.1)
        assert not result  # waiting for the prefetch, not loading a second copy
        release.set()
        getter.join(5)
        assert result == ["value"] and calls == ["slow"] and r.stats.prefetched == 1
    finally:
        r.shutdown()


def test_excess_from_an_over_budget_step_is_released_at_unpin() -> None:
    calls: list[str] = []
    r = BlockResidency(budget_bytes=200, prefetch=False)
    items = [(k, loader_for(k, 100, calls)) for k in "abc"]
    r.pin(items)  # the step needs 300 bytes: admitted over budget
    assert r.stats.resident_bytes == 300 and r.stats.over_budget == 1
    r.unpin([k for k, _ in items])
    assert r.stats.resident_bytes <= 200 and r.stats.evictions == 1
