"""How a running request gives its KV pages back when the cache runs out.

This is the seam for preemption modes. Recompute (here) drops the KV and recomputes it later as
part of the prompt. A swap mode plugs in as another `PreemptionStrategy`: it would record a
swap-out of the request's pages to host memory before freeing them, keep `num_computed_tokens`,
and on re-admission swap the pages back in instead of recomputing.
"""

from __future__ import annotations

from typing import Protocol

from runtime.page_allocator import PageAllocator
from runtime.request import Request, RequestStatus


class PreemptionStrategy(Protocol):
    """Releases a running request's pages; the scheduler then puts it at the front of the queue."""

    def preempt(self, request: Request) -> None: ...


class RecomputePreemption:
    """Frees the pages and forgets the computed KV; generated tokens are kept and recomputed."""

    def __init__(self, kv: PageAllocator) -> None:
        self.kv = kv

    def preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
