"""Over HTTP: a tenant's repeated prompt hits the prefix cache; another tenant's same prompt does not."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from blockzoo.settings import Settings
from blockzoo.tiny_models import TinyModelCache
from router.app import create_app
from router.auth import admin_key_digest
from router.inference import InferenceService
from router.services import Services
from tests.router.live_server import serve
from tests.zoo.zoo_helpers import add_tenant, open_zoo
from zoo.catalog.database import factory_engine

PAGE = 8


@pytest.fixture(scope="module", params=["tenant", "global"])
def live(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_factory: TinyModelCache,
) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("prefix-tenancy")
    zoo = open_zoo(root / "zoo")
    zoo.add_base("tiny-base", tiny_model_factory("llama", num_layers=2))
    keys = {t: add_tenant(zoo, t) for t in ("acme", "globex")}
    settings = Settings(
        data_dir=root / "data",
        kv_cache_memory=8 << 20,
        max_model_len=256,
        page_size=PAGE,
        prefix_cache_sharing=request.param,
    )
    app = create_app(Services(settings, zoo, admin_key_digest("admin")), InferenceService(settings, zoo))
    with serve(app) as url:
        yield {"url": url, "keys": keys, "sharing": request.param}
    factory_engine(zoo.sessions).dispose()


def cached_tokens(live: dict[str, Any], tenant: str, prompt: list[int]) -> int:
    client = openai.OpenAI(base_url=live["url"] + "/v1", api_key=live["keys"][tenant], max_retries=0)
    usage = client.completions.create(model="tiny-base", prompt=prompt, max_tokens=2, temperature=0).usage
    assert usage is not None and usage.prompt_tokens_details is not None
    return usage.prompt_tokens_details.cached_tokens or 0


def test_prefix_cache_hits_stay_within_a_tenant_unless_shared(live: dict[str, Any]) -> None:
    prompt = [5 + (11 * i) % 300 for i in range(5 * PAGE + 1)]
    assert cached_tokens(live, "acme", prompt) == 0
    other = cached_tokens(live, "globex", prompt)
    assert other == (5 * PAGE if live["sharing"] == "global" else 0)
    assert cached_tokens(live, "acme", prompt) == 5 * PAGE
