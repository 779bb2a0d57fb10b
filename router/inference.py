"""Where the router meets the runtime: resolve a tenant's model, load its chain, pick its engine.

One engine per base model: every model registered on a base has the base's KV layout, so
their requests share one page pool and one step loop (and per-block batches). The engine is
configured from the base itself, never from whichever of its fine-tunes was asked for first; each
request carries its own model's context limit. Chains are loaded from the zoo on first use and kept
in a small LRU.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Literal, NamedTuple

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from transformers import PreTrainedTokenizerBase

from blockzoo.settings import Settings
from runtime.async_engine import AsyncLLMEngine
from runtime.chain import Chain
from runtime.checkpoint_loader import load_tokenizer
from runtime.engine import DTYPES, EngineStats, LLMEngine
from runtime.kv_segments import KVSegments
from runtime.residency import BlockResidency
from runtime.scheduler_config import context_limit
from zoo.kv_layout import kv_cuts
from zoo.registry import ModelRef, Zoo

log = logging.getLogger(__name__)

PrefixCacheSharing = Literal["tenant", "public_bases", "global"]


def prefix_cache_salt(sharing: PrefixCacheSharing, tenant: str, shared_model: bool) -> str | None:
    """The engine's `cache_salt` for a request of `tenant` on a model (`shared_model`: a public one).

    A prefix-cache hit shows in a request's latency, so pages shared across tenants would let one
    tenant time another's prompts. "tenant" salts by tenant (a tenant's own models still share,
    the lower layers' KV segments included); "public_bases" lets requests on public models share
    across tenants; "global" shares wherever the chains agree (None: no salt).
    """
    if sharing == "global" or (sharing == "public_bases" and shared_model):
        return None
    return f"tenant:{tenant}"


class LoadedModel(NamedTuple):
    """A model ready to run: its catalog entry, chain and tokenizer."""

    ref: ModelRef
    chain: Chain
    tokenizer: PreTrainedTokenizerBase

    @property
    def engine_key(self) -> str:
        return self.ref.base or self.ref.name


class InferenceService:
    """Engines keyed by base model, and an LRU of loaded chains."""

    def __init__(self, settings: Settings, zoo: Zoo, max_loaded_models: int = 32) -> None:
        self.settings = settings
        self.zoo = zoo
        self.max_loaded_models = max_loaded_models
        self._models: OrderedDict[int, LoadedModel] = OrderedDict()
        self._engines: dict[str, AsyncLLMEngine] = {}
        self._lock = threading.Lock()
        # One budget for every engine's blocks: models of all bases compete for the same memory.
        self.residency = BlockResidency(settings.weights_memory)

    def resolve(self, tenant: str, name: str) -> ModelRef:
        """The model as this tenant sees it (its own, or a shared base); NotFoundError otherwise."""
        return self.zoo.resolve(tenant, name)

    def loaded(self, ref: ModelRef) -> LoadedModel | None:
        """The model if its chain is loaded and current (no catalog or disk access), else None."""
        with self._lock:
            loaded = self._models.get(ref.id)
            if loaded is not None and loaded.ref.chain_digest == ref.chain_digest:
                self._models.move_to_end(ref.id)
                return loaded
        return None

    def load(self, ref: ModelRef) -> LoadedModel:
        """The model's chain and tokenizer, with its base's engine started (off the event loop)."""
        loaded = self._load_chain(ref)
        self.engine_for(loaded)
        return loaded

    def _load_chain(self, ref: ModelRef) -> LoadedModel:
        loaded = self.loaded(ref)
        if loaded is not None:
            return loaded
        chain = self.zoo.load_chain(
            ref,
            DTYPES[self.settings.dtype],
            residency=self.residency,
            quantization=self.settings.weights_quantization,
        )
        tokenizer = load_tokenizer(self.zoo.tokenizer_path(ref))
        loaded = LoadedModel(ref, chain, tokenizer)
        with self._lock:
            self._models[ref.id] = loaded
            while len(self._models) > self.max_loaded_models:
                self._models.popitem(last=False)
        return loaded

    async def load_async(self, ref: ModelRef) -> LoadedModel:
        result: LoadedModel = await run_in_threadpool(self.load, ref)
        return result

    def engine_for(self, loaded: LoadedModel) -> AsyncLLMEngine:
        """The engine of the model's base, started on first use from the base model itself."""
        key = loaded.engine_key
        with self._lock:
            engine = self._engines.get(key)
        if engine is not None:
            return engine
        # The base, not `loaded`: the engine's KV pool and default chain must not depend on which
        # model of the base happened to be asked for first.
        root = self._load_chain(self.zoo.resolve(None, key)) if loaded.ref.base is not None else loaded
        cuts = kv_cuts(self.zoo, key, self.settings.max_kv_segments)
        with self._lock:
            engine = self._engines.get(key)
            if engine is None:
                segments = KVSegments.cut_at(root.chain.config.num_layers, cuts)
                log.info("starting engine", extra={"base": key, "kv_segments": segments.bounds})
                engine = AsyncLLMEngine(
                    LLMEngine(root.chain, root.tokenizer, self.settings, kv_segments=segments)
                )
                engine.start()
                self._engines[key] = engine
            return engine

    def cache_salt(self, loaded: LoadedModel, tenant: str) -> str | None:
        """Who may share this request's prefix-cache pages, per the `prefix_cache_sharing` setting."""
        return prefix_cache_salt(self.settings.prefix_cache_sharing, tenant, loaded.ref.tenant is None)

    def max_model_len(self, loaded: LoadedModel) -> int:
        """The model's own context limit (its config), capped by the server's `max_model_len`."""
        return context_limit(loaded.chain.config.max_position_embeddings, self.settings.max_model_len)

    def stats(self) -> EngineStats:
        """Engine figures summed over every base's engine, for /metrics."""
        with self._lock:
            engines = list(self._engines.values())
        parts = [e.engine.stats() for e in engines]
        if not parts:
            return EngineStats(0, 0, 0, 0, 0.0, 0, 0, 0)
        total_pages = sum(p.num_total_pages for p in parts)
        free = sum(p.num_free_pages for p in parts)
        return EngineStats(
            num_running=sum(p.num_running for p in parts),
            num_waiting=sum(p.num_waiting for p in parts),
            num_free_pages=free,
            num_total_pages=total_pages,
            kv_usage=(1 - free / total_pages) if total_pages else 0.0,
            num_preemptions=sum(p.num_preemptions for p in parts),
            prefix_queries=sum(p.prefix_queries for p in parts),
            prefix_hits=sum(p.prefix_hits for p in parts),
            cross_model_kv_hits=sum(p.cross_model_kv_hits for p in parts),
        )

    def resident_bytes(self) -> int:
        return self.residency.stats.resident_bytes

    def shutdown(self) -> None:
        with self._lock:
            engines = list(self._engines.values())
            self._engines.clear()
        for engine in engines:
            engine.shutdown()
        self.residency.shutdown()


def get_inference(request: Request) -> InferenceService:
    service: InferenceService = request.app.state.inference
    return service
