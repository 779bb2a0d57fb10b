"""Which waiting request goes next: prefer one whose blocks are resident, without starving anyone.

BlockLLM's scheduler favours batches whose blocks are already in memory, since admitting a
request whose blocks must be loaded stalls the step. Favouring alone would starve the models
nobody else uses, so a request that has waited `max_wait_s` is never passed over again.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from runtime.request import Request


class ResidencyAwareOrder:
    """Lets at most one resident request per step go ahead of a non-resident head of the queue."""

    def __init__(
        self, max_wait_s: float = 2.0, lookahead: int = 16, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_wait_s = max_wait_s
        self.lookahead = lookahead
        self.clock = clock
        self.bypasses = 0

    @staticmethod
    def resident(request: Request) -> bool:
        return request.chain is None or request.chain.is_resident()

    def reorder(self, waiting: deque[Request]) -> None:
        if len(waiting) < 2:
            return
        head = waiting[0]
        if self.resident(head) or self.clock() - head.arrival_time >= self.max_wait_s:
            return
        for i in range(1, min(self.lookahead, len(waiting))):
            candidate = waiting[i]
            if self.resident(candidate):
                del waiting[i]
                waiting.appendleft(candidate)
                self.bypasses += 1
                return
