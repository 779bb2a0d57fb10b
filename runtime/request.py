"""A request's state as the engine tracks it: tokens, progress, status and page table."""

from __future__ import annotations

import enum
import time

import torch

from runtime.chain import Chain
from runtime.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    """Where a request is in its life. Finished states carry the OpenAI finish reason."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )


class Request:
    """One generation: prompt, outputs so far, and how far the KV cache has been computed.

    `num_computed_tokens` counts tokens whose keys and values are in the cache; the scheduler
    hands out new tokens starting there (prompt chunks or one decode token), so prefill and
    decode are not separate phases. `page_table` lists the KV pages holding those tokens.
    `chain_digest` salts the prefix-cache hashes so only requests whose model chains agree share
    pages, and `cache_salt` further limits sharing to requests with the same salt.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: frozenset[int] = frozenset(),
        chain_digest: bytes = b"",
        arrival_time: float | None = None,
        tenant: str = "",
        model: str = "",
        chain: Chain | None = None,
        max_model_len: int | None = None,
        cache_salt: bytes = b"",
    ) -> None:
        if not prompt_token_ids:
            raise ValueError("prompt must contain at least one token")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.eos_token_ids = eos_token_ids
        self.chain_digest = chain_digest
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.tenant = tenant
        self.model = model
        # The model this request runs; None means the engine's default chain.
        self.chain = chain
        # Its model's own context limit (prompt plus output); None: only the scheduler's cap applies.
        self.max_model_len = max_model_len
        # Who may share this request's prefix-cache pages (e.g. its tenant); b"" shares with everyone
        # whose chain agrees. It goes into every page key next to the chain digest.
        self.cache_salt = cache_salt
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        # Prompt tokens served from the prefix cache at the last admission (OpenAI cached_tokens).
        self.num_cached_tokens = 0
        self.num_preemptions = 0
        # One page table per KV segment (layers that share pages across models; see kv_segments);
        # with one segment, `page_table` is the only one.
        self.page_tables: list[list[int]] = [[]]
        # The prefix-cache salt of each KV segment (None: `chain_digest` for all of them).
        self.segment_salts: list[bytes] | None = None
        # Per KV segment: positions below this are already in that segment's pages (a prefix
        # shared with another model's request), so the executor must not write them again.
        self.kv_write_floors: list[int] | None = None
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator()
            self.generator.manual_seed(params.seed)

    @property
    def page_table(self) -> list[int]:
        return self.page_tables[0]

    @page_table.setter
    def page_table(self, pages: list[int]) -> None:
        self.page_tables[0] = pages

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_at(self, index: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[index] if index < n else self.output_token_ids[index - n]

    def tokens_slice(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    @property
    def num_pending_tokens(self) -> int:
        """Tokens known but not yet in the KV cache."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.value}, prompt={self.num_prompt_tokens},"
            f" out={self.num_output_tokens}, computed={self.num_computed_tokens})"
        )
