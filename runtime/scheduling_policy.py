"""How one step is filled: the shared step-building moves and the two policies built from them."""

from __future__ import annotations

from collections import deque
from typing import Protocol

from runtime.kv_cache_manager import KVCacheExhaustedError
from runtime.page_allocator import PageAllocator
from runtime.preemption import PreemptionStrategy
from runtime.request import Request, RequestStatus
from runtime.scheduler_config import SchedulerConfig, SchedulingPolicyName
from runtime.scheduler_output import ScheduledChunk, SchedulerOutput


def is_decode(chunk: ScheduledChunk) -> bool:
    """One-token chunks run as decodes (the executor batches them in one attention call)."""
    return chunk.num_tokens == 1


class StepBuilder:
    """One step under construction: the queues it may change, the budget left, the chunks so far.

    `running` is in admission order; preemption takes victims from its end (the most recently
    admitted). `waiting` is FCFS with preempted requests pushed back to its front.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        kv: PageAllocator,
        preemption: PreemptionStrategy,
        waiting: deque[Request],
        running: list[Request],
    ) -> None:
        self.config = config
        self.kv = kv
        self.preemption = preemption
        self.waiting = waiting
        self.running = running
        self.budget = config.max_num_batched_tokens
        self.chunks: list[ScheduledChunk] = []
        self.preempted: list[Request] = []

    def build(self) -> SchedulerOutput:
        # Stable sort: decodes first, each group keeps scheduling order.
        chunks = sorted(self.chunks, key=lambda c: not is_decode(c))
        num_tokens = sum(c.num_tokens for c in chunks)
        return SchedulerOutput(chunks=chunks, preempted=self.preempted, num_batched_tokens=num_tokens)

    def schedule_running(self) -> None:
        """Give every running request its pending tokens (decode or next prompt chunk), oldest first.

        When a request cannot get pages, the most recently admitted running request is preempted
        until it can; if that victim is the request itself it simply waits. A lone request that
        cannot get pages can never progress, which is a configuration error.
        """
        i = 0
        while i < len(self.running) and self.budget > 0:
            request = self.running[i]
            num_tokens = min(request.num_pending_tokens, self.budget)
            if num_tokens <= 0:
                i += 1
                continue
            if not self._allocate_or_preempt(request, num_tokens):
                break  # the request preempted itself; it was the last running one
            self._add_chunk(request, num_tokens)
            i += 1

    def _allocate_or_preempt(self, request: Request, num_tokens: int) -> bool:
        while not self.kv.allocate(request, num_tokens):
            if len(self.running) == 1:
                raise KVCacheExhaustedError(
                    f"request {request.request_id} needs {request.num_computed_tokens + num_tokens} tokens"
                    f" of KV but the cache holds only {self.kv.capacity_tokens}"
                    f" ({self.kv.num_total_pages} pages of {self.kv.page_size}); give the cache more"
                    " pages or lower max_model_len"
                )
            victim = self.running.pop()
            self.preempt(victim)
            if victim is request:
                return False
        return True

    def preempt(self, request: Request) -> None:
        self.preemption.preempt(request)
        self.waiting.appendleft(request)
        self.preempted.append(request)

    def can_admit(self) -> bool:
        return bool(self.waiting) and self.budget > 0 and len(self.running) < self.config.max_num_seqs

    def admit_next(self, allow_chunking: bool) -> bool:
        """Admit the head of the waiting queue (FCFS, no skipping) with as many tokens as allowed.

        Uses the prefix cache first. Without `allow_chunking` the whole remaining prompt must fit
        the budget, except for the step's first chunk: a prompt longer than the whole budget then
        runs alone (over budget) rather than never. Returns False when the head cannot be admitted
        (budget or pages).
        """
        request = self.waiting[0]
        cached_pages, num_cached = self.kv.find_cached_prefix(request)
        remaining = request.num_tokens - num_cached
        if allow_chunking:
            num_tokens = min(remaining, self.budget)
        elif remaining <= self.budget or not self.chunks:
            num_tokens = remaining
        else:
            return False
        if not self.kv.allocate(request, num_tokens, cached_pages):
            return False
        self.waiting.popleft()
        request.num_computed_tokens = num_cached
        request.num_cached_tokens = num_cached
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        self._add_chunk(request, num_tokens)
        return True

    def _add_chunk(self, request: Request, num_tokens: int) -> None:
        sample = request.num_computed_tokens + num_tokens == request.num_tokens
        self.chunks.append(ScheduledChunk(request, num_tokens, sample))
        self.budget -= num_tokens


class SchedulingPolicy(Protocol):
    """Fills one step using the moves of a `StepBuilder`."""

    def fill(self, step: StepBuilder) -> None: ...


class SplitFusePolicy:
    """Running requests first (decodes and prompt continuations), then new prompts split to fill
    the budget exactly. Nothing new is admitted in a step that had to preempt: memory is short."""

    def fill(self, step: StepBuilder) -> None:
        step.schedule_running()
        if step.preempted:
            return
        while step.can_admit() and step.admit_next(allow_chunking=True):
            pass


class PrefillFirstPolicy:
    """Whole new prompts alone whenever one can be admitted (as many as fit the budget, at least
    one); otherwise a decode-only step."""

    def fill(self, step: StepBuilder) -> None:
        while step.can_admit() and step.admit_next(allow_chunking=False):
            pass
        if not step.chunks:
            step.schedule_running()


def make_policy(name: SchedulingPolicyName) -> SchedulingPolicy:
    if name == "splitfuse":
        return SplitFusePolicy()
    if name == "prefill_first":
        return PrefillFirstPolicy()
    raise ValueError(f"unknown scheduling policy {name!r}; expected 'splitfuse' or 'prefill_first'")
