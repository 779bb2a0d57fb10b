"""Residency-aware admission: resident models go first, but nobody waits past the bound."""

from __future__ import annotations

from collections import deque
from typing import Any

from runtime.admission_order import ResidencyAwareOrder
from runtime.request import Request
from runtime.sampling_params import SamplingParams


class _Chain:
    """Only what the ordering reads of a chain: whether its blocks are resident."""

    def __init__(self, resident: bool) -> None:
        self.resident = resident

    def is_resident(self) -> bool:
        return self.resident


def req(rid: str, chain: Any, at: float) -> Request:
    return Request(rid, [1, 2], SamplingParams(), arrival_time=at, chain=chain)


def test_resident_request_goes_ahead_of_a_cold_head_until_the_head_has_waited_enough() -> None:
    now = [10.0]
    order = ResidencyAwareOrder(max_wait_s=2.0, clock=lambda: now[0])
    cold, hot = _Chain(False), _Chain(True)
    waiting = deque([req("cold", cold, 9.5), req("hot1", hot, 9.6), req("hot2", hot, 9.7)])
    order.reorder(waiting)
    assert [r.request_id for r in waiting] == ["hot1", "cold", "hot2"]
    waiting.popleft()  # hot1 admitted
    now[0] = 12.0  # cold has now waited 2.5 s: it may not be passed over again
    order.reorder(waiting)
    assert [r.request_id for r in waiting] == ["cold", "hot2"]
    assert order.bypasses == 1


def test_nothing_moves_when_the_head_is_resident_or_nothing_else_is() -> None:
    order = ResidencyAwareOrder(clock=lambda: 0.0)
    hot, cold = _Chain(True), _Chain(False)
    waiting = deque([req("a", hot, 0.0), req("b", cold, 0.0)])
    order.reorder(waiting)
    assert [r.request_id for r in waiting] == ["a", "b"]
    waiting = deque([req("c", cold, 0.0), req("d", cold, 0.0)])
    order.reorder(waiting)
    assert [r.request_id for r in waiting] == ["c", "d"]
