"""Prefix-cache pages are shared within a tenant, and across tenants only where the setting allows.

A hit shows in a request's latency, so a page shared across tenants lets one tenant time another's
prompts. The salt comes from the router's policy (`prefix_cache_salt`) and reaches every page key,
in every KV segment, through `LLMEngine.add_request(cache_salt=...)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from blockzoo.settings import Settings
from blockzoo.tiny_models import TinyModelCache
from router.inference import PrefixCacheSharing, prefix_cache_salt
from runtime.chain import Chain
from runtime.checkpoint_loader import load_tokenizer
from runtime.engine import LLMEngine
from runtime.kv_segments import KVSegments
from runtime.sampling_params import SamplingParams
from tests.runtime.engine_helpers import finish_all
from tests.zoo.zoo_helpers import add_tenant, fine_tune_top_layers, open_zoo
from zoo.catalog.database import factory_engine

PAGE = 8
PARAMS = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
PROMPT = [5 + (7 * i) % 400 for i in range(4 * PAGE + 3)]  # four full pages, then a partial one


class Models(NamedTuple):
    base: Chain
    ft: Chain  # acme's fine-tune of the base's top layer: layers 0-2 agree with the base
    base_dir: Path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tiny_model_factory: TinyModelCache) -> Models:
    root = tmp_path_factory.mktemp("salt")
    base_dir = tiny_model_factory("llama", num_layers=4)
    zoo = open_zoo(root / "zoo")
    zoo.add_base("base", base_dir)
    add_tenant(zoo, "acme")
    add_tenant(zoo, "globex")
    zoo.register("acme", "ft", fine_tune_top_layers(base_dir, root / "ft", layers=[3], seed=4))
    chains = Models(
        zoo.load_chain(zoo.resolve(None, "base"), torch.float32),
        zoo.load_chain(zoo.resolve("acme", "ft"), torch.float32),
        base_dir,
    )
    factory_engine(zoo.sessions).dispose()
    return chains


class Served(NamedTuple):
    tokens: list[int]
    segment_hits: list[int]  # prompt tokens found in each KV segment's cache at admission


class Server:
    """One engine over the base's family (KV cut after layer 2), salting as `sharing` says."""

    def __init__(self, models: Models, sharing: PrefixCacheSharing) -> None:
        self.models = models
        self.sharing = sharing
        settings = Settings(kv_cache_memory=16 << 20, page_size=PAGE)
        self.engine = LLMEngine(
            models.base, load_tokenizer(models.base_dir), settings, kv_segments=KVSegments.cut_at(4, [3])
        )
        self._n = 0

    def serve(self, tenant: str, model: str) -> Served:
        chain = self.models.ft if model == "ft" else self.models.base
        salt = prefix_cache_salt(self.sharing, tenant, shared_model=model == "base")
        before = list(self.engine.kv_manager.sharing.hits)
        self._n += 1
        rid = f"r{self._n}"
        self.engine.add_request(PROMPT, PARAMS, request_id=rid, chain=chain, tenant=tenant, cache_salt=salt)
        tokens = finish_all(self.engine)[rid]
        after = self.engine.kv_manager.sharing.hits
        return Served(tokens, [a - b for a, b in zip(after, before, strict=True)])

    def assert_all_free(self) -> None:
        stats = self.engine.stats()
        assert stats.num_running == stats.num_waiting == 0
        assert stats.num_free_pages == stats.num_total_pages


CACHED = 4 * PAGE  # the full pages of PROMPT (the last token is always computed)


def test_by_default_tenants_never_share_pages(models: Models) -> None:
    server = Server(models, "tenant")
    first = server.serve("acme", "base")
    assert first.segment_hits == [0, 0]
    other = server.serve("globex", "base")
    assert other.segment_hits == [0, 0]  # globex cannot tell that acme sent this prompt
    assert other.tokens == first.tokens
    assert server.serve("acme", "base").segment_hits == [CACHED, CACHED]  # the cache works within acme
    server.assert_all_free()


def test_one_tenants_models_still_share_the_lower_layers(models: Models) -> None:
    server = Server(models, "tenant")
    server.serve("acme", "base")
    ft = server.serve("acme", "ft")
    # Layers 0-2 (segment 0) agree with the base: their pages come from acme's base request.
    assert ft.segment_hits == [CACHED, 0]
    assert server.serve("acme", "ft").segment_hits == [CACHED, CACHED]
    assert server.serve("globex", "base").segment_hits == [0, 0]
    server.assert_all_free()


def test_global_sharing_shares_across_tenants(models: Models) -> None:
    server = Server(models, "global")
    first = server.serve("acme", "base")
    other = server.serve("globex", "base")
    assert other.segment_hits == [CACHED, CACHED] and other.tokens == first.tokens
    assert server.serve("acme", "ft").segment_hits == [CACHED, 0]  # globex's pages, below the cut
    server.assert_all_free()


def test_public_bases_share_across_tenants_but_fine_tunes_do_not(models: Models) -> None:
    server = Server(models, "public_bases")
    server.serve("acme", "base")
    assert server.serve("globex", "base").segment_hits == [CACHED, CACHED]
    server = Server(models, "public_bases")
    server.serve("acme", "ft")  # a tenant's own model: its pages stay acme's
    assert server.serve("globex", "base").segment_hits == [0, 0]
    server.assert_all_free()
