"""A model-free executor and engine loop for scheduler tests.

`FakeExecutor` keeps a fake physical KV cache: one (chain digest, token id) record per page slot.
Running a chunk writes its tokens into the request's slots; sampling reads the request's whole
context back from its pages and hashes it into a deterministic "next token". A wrong page table
(a bad prefix-cache hit, a page shared across chains, a page reused while still referenced) thus
either trips an invariant check or changes the generated tokens.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import NamedTuple

from runtime.kv_cache_manager import KVCacheManager
from runtime.request import Request, RequestStatus
from runtime.scheduler import Scheduler
from runtime.scheduler_output import SchedulerOutput
from runtime.scheduling_policy import is_decode


class InvariantViolation(AssertionError):
    """The scheduler produced a step that a real executor could not run correctly."""


def fake_next_token(chain_digest: bytes, token_ids: Sequence[int], vocab_size: int) -> int:
    digest = hashlib.blake2b(
        chain_digest + struct.pack(f"<{len(token_ids)}q", *token_ids), digest_size=8
    ).digest()
    return int.from_bytes(digest, "little") % vocab_size


class ChunkRecord(NamedTuple):
    request_id: str
    start: int
    num_tokens: int
    sample: bool


class StepRecord(NamedTuple):
    chunks: list[ChunkRecord]
    preempted: list[str]
    num_batched_tokens: int


class FakeExecutor:
    """Checks each step's invariants, 'runs' it on fake KV slots, and returns sampled tokens."""

    def __init__(
        self,
        kv: KVCacheManager,
        max_num_batched_tokens: int,
        vocab_size: int = 50_000,
        allow_lone_long_prompt: bool = False,
    ) -> None:
        self.kv = kv
        self.budget = max_num_batched_tokens
        # prefill_first never splits prompts: one longer than the budget runs alone, over budget.
        self.allow_lone_long_prompt = allow_lone_long_prompt
        self.vocab_size = vocab_size
        self.page_size = kv.page_size
        self.slots: list[tuple[bytes, int] | None] = [None] * (kv.num_total_pages * kv.page_size)

    def _slot(self, request: Request, position: int) -> int:
        page_index = position // self.page_size
        if page_index >= len(request.page_table):
            raise InvariantViolation(
                f"{request.request_id}: token {position} has no page (table {request.page_table})"
            )
        return request.page_table[page_index] * self.page_size + position % self.page_size

    def _check_step(self, output: SchedulerOutput) -> None:
        total = sum(c.num_tokens for c in output.chunks)
        if total != output.num_batched_tokens:
            raise InvariantViolation(f"num_batched_tokens {output.num_batched_tokens} != chunk sum {total}")
        lone_prompt = len(output.chunks) == 1 and output.chunks[0].sample
        if total > self.budget and not (self.allow_lone_long_prompt and lone_prompt):
            raise InvariantViolation(f"step has {total} tokens, budget is {self.budget}")
        seen_prefill = False
        ids = [c.request.request_id for c in output.chunks]
        if len(set(ids)) != len(ids):
            raise InvariantViolation(f"a request is scheduled twice in one step: {ids}")
        for chunk in output.chunks:
            req = chunk.request
            if is_decode(chunk) and seen_prefill:
                raise InvariantViolation("a decode comes after a prefill chunk")
            seen_prefill = seen_prefill or not is_decode(chunk)
            end = req.num_computed_tokens + chunk.num_tokens
            if req.status != RequestStatus.RUNNING or chunk.num_tokens < 1 or end > req.num_tokens:
                raise InvariantViolation(f"bad chunk {chunk.num_tokens} tokens for {req!r}")
            if chunk.sample != (end == req.num_tokens):
                raise InvariantViolation(f"{req.request_id}: sample={chunk.sample} but chunk ends at {end}")
            if len(set(req.page_table)) != len(req.page_table):
                raise InvariantViolation(f"{req.request_id}: duplicate pages {req.page_table}")
            if any(self.kv.ref_count(p) < 1 for p in req.page_table):
                raise InvariantViolation(f"{req.request_id}: page table holds an unreferenced page")
            for pos in range(req.num_computed_tokens, end):
                page = self._slot(req, pos) // self.page_size
                if self.kv.ref_count(page) != 1 or self.kv.is_cached(page):
                    raise InvariantViolation(f"{req.request_id}: writes into shared or cached page {page}")

    def execute(self, output: SchedulerOutput) -> list[tuple[Request, int]]:
        self._check_step(output)
        for chunk in output.chunks:
            req = chunk.request
            for pos in range(req.num_computed_tokens, req.num_computed_tokens + chunk.num_tokens):
                self.slots[self._slot(req, pos)] = (req.chain_digest, req.token_at(pos))
        sampled: list[tuple[Request, int]] = []
        for chunk in output.chunks:
            if not chunk.sample:
                continue
            req = chunk.request
            context = [self.slots[self._slot(req, pos)] for pos in range(req.num_tokens)]
            expected = [(req.chain_digest, t) for t in req.all_token_ids]
            if context != expected:
                raise InvariantViolation(f"{req.request_id}: KV read back differs from its tokens")
            sampled.append((req, fake_next_token(req.chain_digest, req.all_token_ids, self.vocab_size)))
        return sampled


class FakeEngine:
    """The engine loop over a real Scheduler and a FakeExecutor; finishes requests at max_tokens."""

    def __init__(self, scheduler: Scheduler, max_steps: int = 10_000) -> None:
        self.scheduler = scheduler
        self.max_steps = max_steps
        config = scheduler.config
        self.executor = FakeExecutor(
            scheduler.kv,
            config.max_num_batched_tokens,
            allow_lone_long_prompt=config.policy == "prefill_first",
        )
        self.finished: dict[str, Request] = {}
        self.steps: list[StepRecord] = []

    def step(self) -> StepRecord:
        """One engine step; raises if the scheduler stalls (empty step with work, or too many steps)."""
        if len(self.steps) >= self.max_steps:
            raise InvariantViolation(f"no completion after {self.max_steps} steps")
        output = self.scheduler.schedule()
        if output.empty and self.scheduler.has_unfinished:
            raise InvariantViolation("the scheduler produced an empty step with work pending")
        record = StepRecord(
            chunks=[
                ChunkRecord(c.request.request_id, c.request.num_computed_tokens, c.num_tokens, c.sample)
                for c in output.chunks
            ],
            preempted=[r.request_id for r in output.preempted],
            num_batched_tokens=output.num_batched_tokens,
        )
        sampled = self.executor.execute(output)
        self.scheduler.update_after_step(output)
        for req, token in sampled:
            req.append_output_token(token)
            if req.num_output_tokens >= req.params.max_tokens:
                self.scheduler.finish_request(req, RequestStatus.FINISHED_LENGTH)
                self.finished[req.request_id] = req
        self.steps.append(record)
        return record

    def run(self) -> dict[str, list[int]]:
        while self.scheduler.has_unfinished:
            self.step()
        return {rid: list(r.output_token_ids) for rid, r in self.finished.items()}
