"""Where the router meets the runtime: resolve a tenant's model, load its chain, pick its engine.

One engine per base model: every model registered on a base has the base's KV layout, so
their requests share one page pool and one step loop (and later, per-block batches). Chains
are loaded from the zoo on first use and kept in a small LRU.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import NamedTuple

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from transformers import PreTrainedTokenizerBase

from blockzoo.settings import Settings
from runtime.async_engine import AsyncLLMEngine
from runtime.chain import Chain
from runtime.checkpoint_loader import load_tokenizer
from runtime.engine import DTYPES, EngineStats, LLMEngine
from runtime.kv_segments import KVSegments
from runtime.outputs import RequestOutput
from runtime.residency import BlockResidency
from runtime.sampling_params import SamplingParams
from zoo.kv_layout import kv_cuts
from zoo.registry import ModelRef, Zoo

log = logging.getLogger(__name__)


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
        with self._lock:
            engine = self._engines.get(loaded.engine_key)
            if engine is None:
                config = loaded.chain.config
                cuts = kv_cuts(self.zoo, loaded.engine_key, self.settings.max_kv_segments)
                segments = KVSegments.cut_at(config.num_layers, cuts)
                log.info("starting engine", extra={"base": loaded.engine_key, "kv_segments": segments.bounds})
                engine = AsyncLLMEngine(
                    LLMEngine(loaded.chain, loaded.tokenizer, self.settings, kv_segments=segments)
                )
                engine.start()
                self._engines[loaded.engine_key] = engine
            return engine

    async def generate(
        self,
        loaded: LoadedModel,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        tenant: str,
    ) -> AsyncIterator[RequestOutput]:
        engine = self.engine_for(loaded)
        async for out in engine.generate(
            prompt,
            params,
            request_id,
            chain=loaded.chain,
            tokenizer=loaded.tokenizer,
            tenant=tenant,
            model=loaded.ref.name,
        ):
            yield out

    def max_model_len(self, loaded: LoadedModel) -> int:
        return self.settings.max_model_len or loaded.chain.config.max_position_embeddings

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
