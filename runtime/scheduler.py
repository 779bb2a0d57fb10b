"""The scheduler: owns the waiting and running queues and decides each step; it never executes."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator

from runtime.admission_order import ResidencyAwareOrder
from runtime.errors import PromptTooLongError
from runtime.page_allocator import PageAllocator
from runtime.preemption import PreemptionStrategy, RecomputePreemption
from runtime.request import Request, RequestStatus
from runtime.scheduler_config import SchedulerConfig
from runtime.scheduler_output import SchedulerOutput
from runtime.scheduling_policy import SchedulingPolicy, StepBuilder, make_policy


class Scheduler:
    """Decides, step by step, which tokens of which requests run, within the token budget.

    Per step the engine calls `schedule()`, runs the output on the executor, calls
    `update_after_step(output)`, appends sampled tokens to the requests whose chunk had
    `sample=True`, and calls `finish_request` for those that stopped. The step filling rules live
    in a `SchedulingPolicy` (config.policy) and the preemption mode in a `PreemptionStrategy`.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        kv: PageAllocator,
        preemption: PreemptionStrategy | None = None,
        policy: SchedulingPolicy | None = None,
        order: ResidencyAwareOrder | None = None,
    ) -> None:
        if kv.page_size != config.page_size:
            raise ValueError(f"KV cache page size {kv.page_size} != scheduler page size {config.page_size}")
        if kv.enable_prefix_caching != config.enable_prefix_caching:
            raise ValueError(
                f"KV cache enable_prefix_caching={kv.enable_prefix_caching} disagrees with the scheduler"
                f" config ({config.enable_prefix_caching})"
            )
        self.config = config
        self.kv = kv
        self.preemption = preemption if preemption is not None else RecomputePreemption(kv)
        self.policy = policy if policy is not None else make_policy(config.policy)
        self.order = order
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._requests: dict[str, Request] = {}
        self._num_preemptions = 0

    # -- views -------------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def has_unfinished(self) -> bool:
        return bool(self._running or self._waiting)

    @property
    def running(self) -> tuple[Request, ...]:
        """Running requests in admission order (a snapshot)."""
        return tuple(self._running)

    @property
    def waiting(self) -> tuple[Request, ...]:
        """Waiting requests in the order they will be admitted (a snapshot)."""
        return tuple(self._waiting)

    @property
    def num_preemptions(self) -> int:
        return self._num_preemptions

    def get_request(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    # -- lifecycle ---------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already scheduled")
        if request.is_finished or request.num_computed_tokens or request.page_table:
            raise ValueError(f"request {request.request_id!r} is finished or already holds KV: {request!r}")
        self._check_fits(request)
        self._requests[request.request_id] = request
        self._waiting.append(request)

    def _check_fits(self, request: Request) -> None:
        # No request id in these messages: they reach the client, and the id is the server's.
        prompt_len = request.num_prompt_tokens
        max_tokens = request.params.max_tokens
        limits = [n for n in (request.max_model_len, self.config.max_model_len) if n is not None]
        limit = min(limits, default=None)
        if limit is not None and prompt_len + max_tokens > limit:
            raise PromptTooLongError(
                f"prompt of {prompt_len} tokens plus max_tokens {max_tokens} = {prompt_len + max_tokens}"
                f" exceeds max_model_len {limit}"
            )
        if prompt_len > self.kv.capacity_tokens:
            raise PromptTooLongError(
                f"prompt of {prompt_len} tokens cannot fit the KV cache of {self.kv.capacity_tokens} tokens"
                f" ({self.kv.num_total_pages} pages of {self.kv.page_size})"
            )

    def waiting_head(self, n: int) -> Iterator[Request]:
        """The first `n` waiting requests, without copying the queue."""
        return itertools.islice(self._waiting, n)

    def schedule(self) -> SchedulerOutput:
        if self.order is not None:
            self.order.reorder(self._waiting)
        step = StepBuilder(self.config, self.kv, self.preemption, self._waiting, self._running)
        self.policy.fill(step)
        self._num_preemptions += len(step.preempted)
        return step.build()

    def update_after_step(self, output: SchedulerOutput) -> None:
        """Record that the executor computed the scheduled tokens, and cache pages that filled up."""
        for chunk in output.chunks:
            request = chunk.request
            # Finished or aborted while the step ran: its pages are already gone.
            if request.status != RequestStatus.RUNNING:
                continue
            request.num_computed_tokens += chunk.num_tokens
            self.kv.cache_full_pages(request, request.num_computed_tokens)

    def finish_request(self, request: Request, status: RequestStatus) -> None:
        if not status.finished:
            raise ValueError(f"finish_request needs a finished status, got {status}")
        if self._requests.get(request.request_id) is not request:
            raise ValueError(f"request {request.request_id!r} is not scheduled here")
        if request.status == RequestStatus.RUNNING:
            self._running.remove(request)
        else:
            self._waiting.remove(request)
        del self._requests[request.request_id]
        self.kv.free(request)
        request.status = status

    def abort_request(self, request_id: str) -> Request | None:
        """Abort a waiting or running request; None if no such request is scheduled."""
        request = self._requests.get(request_id)
        if request is None:
            return None
        self.finish_request(request, RequestStatus.FINISHED_ABORTED)
        return request
