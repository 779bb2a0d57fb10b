"""The synchronous engine: add requests, step, abort. One step = schedule → execute → sample → output."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import PreTrainedTokenizerBase

from blockzoo.settings import Settings
from runtime.admission_order import ResidencyAwareOrder
from runtime.chain import Chain
from runtime.checkpoint_loader import load_checkpoint, load_tokenizer
from runtime.errors import PromptTooLongError
from runtime.executor import ModelExecutor
from runtime.kv_segments import KVSegments, SegmentedKVCacheManager
from runtime.kv_tensors import KVTensors, bytes_per_page
from runtime.output_processor import OutputProcessor
from runtime.outputs import RequestOutput
from runtime.request import Request, RequestStatus
from runtime.sampler import Sampler
from runtime.sampling_params import SamplingParams
from runtime.scheduler import Scheduler
from runtime.scheduler_config import SchedulerConfig, context_limit
from runtime.scheduler_output import SchedulerOutput

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class EngineStats(NamedTuple):
    """A snapshot for metrics and tests."""

    num_running: int
    num_waiting: int
    num_free_pages: int
    num_total_pages: int
    kv_usage: float
    num_preemptions: int
    prefix_queries: int
    prefix_hits: int
    # Prompt tokens whose lower layers' KV came from another model's request (KV segments).
    cross_model_kv_hits: int = 0


class StepFailedError(RuntimeError):
    """A step raised: the requests it ran were aborted (their KV freed); the engine and every
    other request go on. `request_ids` are those requests; the original error is `__cause__`."""

    def __init__(self, request_ids: list[str]) -> None:
        super().__init__(f"an engine step failed for {len(request_ids)} request(s)")
        self.request_ids = request_ids


class LLMEngine:
    """Serves one chain: continuous batching over paged KV with a fixed per-step token budget."""

    def __init__(
        self,
        chain: Chain,
        tokenizer: PreTrainedTokenizerBase,
        settings: Settings,
        kv_segments: KVSegments | None = None,
    ) -> None:
        """`kv_segments` cuts the layers where the models this engine serves diverge, so that their
        requests share the KV pages of the layers they agree on (see runtime.kv_segments)."""
        if settings.num_threads:
            torch.set_num_threads(settings.num_threads)
        self.chain = chain
        self.tokenizer = tokenizer
        self.settings = settings
        config = chain.config
        num_pages = settings.resolved_num_kv_pages(bytes_per_page(config, settings.page_size, chain.dtype))
        self.kv_segments = kv_segments or KVSegments.whole(config.num_layers)
        if self.kv_segments.bounds[-1] != config.num_layers:
            raise ValueError(f"KV segments {self.kv_segments.bounds} do not cover {config.num_layers} layers")
        self.kv_manager = SegmentedKVCacheManager(
            self.kv_segments, num_pages, settings.page_size, settings.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=settings.max_num_seqs,
                max_num_batched_tokens=settings.max_num_batched_tokens,
                # Only the server's cap here: each request carries its own model's limit.
                max_model_len=settings.max_model_len,
                page_size=settings.page_size,
                policy=settings.scheduler_policy,
                enable_prefix_caching=settings.enable_prefix_caching,
            ),
            self.kv_manager,
            order=ResidencyAwareOrder(settings.residency_max_wait_s),
        )
        self.executor = ModelExecutor(
            chain,
            KVTensors(config, num_pages, settings.page_size, chain.dtype),
            per_block_batching=settings.per_block_batching,
            max_block_rows=settings.max_block_rows,
            segments=self.kv_segments,
        )
        self.sampler = Sampler()
        self.outputs = OutputProcessor(tokenizer)
        self.eos_token_ids = frozenset(config.eos_token_ids) | (
            frozenset([tokenizer.eos_token_id]) if tokenizer.eos_token_id is not None else frozenset()
        )
        self._ids = itertools.count()

    @classmethod
    def from_path(cls, path: Path, settings: Settings | None = None) -> LLMEngine:
        settings = settings or Settings()
        chain = load_checkpoint(Path(path), DTYPES[settings.dtype])
        return cls(chain, load_tokenizer(Path(path)), settings)

    def encode(self, prompt: str | list[int], tokenizer: PreTrainedTokenizerBase | None = None) -> list[int]:
        if isinstance(prompt, str):
            return list((tokenizer or self.tokenizer).encode(prompt))
        return list(prompt)

    def max_model_len(self, chain: Chain | None = None) -> int:
        """The context limit of requests on `chain` (default the engine's own): its own, capped."""
        return context_limit(
            (chain or self.chain).config.max_position_embeddings, self.settings.max_model_len
        )

    def check_compatible(self, chain: Chain) -> None:
        """Chains share this engine's KV pool only if their KV shapes and dtype agree with its own."""
        a, b = self.chain.config, chain.config
        shape_a = (a.num_layers, a.num_kv_heads, a.head_dim, self.chain.dtype)
        shape_b = (b.num_layers, b.num_kv_heads, b.head_dim, chain.dtype)
        if shape_a != shape_b:
            raise ValueError(f"chain KV layout {shape_b} does not match this engine's {shape_a}")

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        arrival_time: float | None = None,
        chain: Chain | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        tenant: str = "",
        model: str = "",
        cache_salt: str | None = None,
    ) -> str:
        """Queue a request (on `chain`, default the engine's own); raises RequestError if it can never fit.

        `cache_salt` limits prefix-cache sharing to requests with the same salt (the server passes
        one per tenant); None shares with every request whose chain agrees.
        """
        if chain is not None:
            self.check_compatible(chain)
        run_chain = chain or self.chain
        token_ids = self.encode(prompt, tokenizer)
        if not token_ids:
            raise PromptTooLongError("the prompt is empty after tokenization")
        vocab = run_chain.config.vocab_size
        if any(t < 0 or t >= vocab for t in token_ids):
            raise PromptTooLongError(f"prompt token ids must be in [0, {vocab})")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        eos = frozenset(run_chain.config.eos_token_ids)
        tok = tokenizer or self.tokenizer
        if tok.eos_token_id is not None:
            eos |= {tok.eos_token_id}
        request = Request(
            rid,
            token_ids,
            params,
            eos_token_ids=eos if chain is not None else self.eos_token_ids,
            chain_digest=run_chain.digest,
            arrival_time=arrival_time,
            tenant=tenant,
            model=model,
            chain=chain,
            max_model_len=self.max_model_len(run_chain),
            cache_salt=b"" if cache_salt is None else cache_salt.encode("utf-8"),
        )
        if self.kv_segments.num_segments > 1:
            request.segment_salts = self.kv_segments.salts(run_chain)
        self.scheduler.add_request(request)
        self.outputs.add(request, tokenizer)
        return rid

    def abort(self, request_id: str) -> bool:
        request = self.scheduler.abort_request(request_id)
        if request is None:
            return False
        self.outputs.remove(request_id)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.scheduler.has_unfinished)

    def step(self) -> list[RequestOutput]:
        """Run one step. If it raises, its requests are aborted and StepFailedError names them."""
        try:
            plan = self.scheduler.schedule()
        except Exception as exc:
            # The scheduler was working on the running requests (e.g. one that can never get pages).
            raise self._fail(list(self.scheduler.running)) from exc
        # BlockLLM's speculative loading: fetch the blocks of queued requests while this step runs.
        for waiting in self.scheduler.waiting_head(self.settings.max_num_seqs):
            (waiting.chain or self.chain).prefetch()
        if plan.empty:
            return []
        try:
            return self._run(plan)
        except Exception as exc:
            raise self._fail([chunk.request for chunk in plan.chunks]) from exc

    def _fail(self, requests: list[Request]) -> StepFailedError:
        """Abort `requests` that are still scheduled (freeing their KV) after their step raised.

        Their new KV pages may be half written, but pages join the prefix cache only after a whole
        forward pass wrote them, so freeing them leaves nothing wrong behind. Every one of them is
        named in the error, even one that finished before the step raised: its last output is lost.
        """
        for request in requests:
            if self.scheduler.get_request(request.request_id) is request:
                self.abort(request.request_id)
        return StepFailedError(list(dict.fromkeys(r.request_id for r in requests)))

    def _run(self, plan: SchedulerOutput) -> list[RequestOutput]:
        result = self.executor.execute(plan)
        self.scheduler.update_after_step(plan)
        sampled = self.sampler(result.logits, result.requests)
        now = time.monotonic()
        outputs: list[RequestOutput] = []
        for request, token, logprob in zip(result.requests, sampled.token_ids, sampled.logprobs, strict=True):
            request.append_output_token(token)
            out = self.outputs.process(request, token, logprob, now)
            if out.finished:
                self.scheduler.finish_request(request, RequestStatus(out.finish_reason))
            outputs.append(out)
        return outputs

    def stats(self) -> EngineStats:
        kv = self.kv_manager
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_free_pages=kv.num_free_pages,
            num_total_pages=kv.num_total_pages,
            kv_usage=kv.usage,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_queries=kv.prefix_stats.queries,
            prefix_hits=kv.prefix_stats.hits,
            cross_model_kv_hits=sum(kv.sharing.shared_beyond_start),
        )
