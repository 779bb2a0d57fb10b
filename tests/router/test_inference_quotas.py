"""Quotas on the inference routes of a live server: 429 with rate-limit headers, then recovery."""

from __future__ import annotations

import time
from pathlib import Path

import openai
import pytest

from blockzoo.settings import Settings
from blockzoo.tiny_models import TinyModelCache
from router.app import create_app
from router.auth import admin_key_digest
from router.inference import InferenceService
from router.quotas import InProcessQuotas
from router.services import Services
from tests.router.live_server import serve
from tests.zoo.zoo_helpers import add_tenant, open_zoo
from zoo.catalog.tenants import TenantQuotas, set_quotas


def test_requests_per_window_give_429_then_recover(
    tmp_path: Path, tiny_model_factory: TinyModelCache
) -> None:
    zoo = open_zoo(tmp_path / "zoo")
    zoo.add_base("base", tiny_model_factory("llama"))
    key = add_tenant(zoo, "limited")
    other = add_tenant(zoo, "free")
    with zoo.sessions() as session, session.begin():
        set_quotas(session, "limited", TenantQuotas(requests_per_minute=2))
    settings = Settings(data_dir=tmp_path / "data", kv_cache_memory=8 << 20)
    # A one-second window so the test sees the bucket refill without waiting a minute.
    app = create_app(
        Services(settings, zoo, admin_key_digest("x")),
        InferenceService(settings, zoo),
        state={"quotas": InProcessQuotas(window_seconds=1.0)},
    )
    with serve(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
        ok = client.completions.with_raw_response.create(model="base", prompt="a", max_tokens=2)
        assert ok.headers["x-ratelimit-limit-requests"] == "2"
        client.completions.create(model="base", prompt="a", max_tokens=2)
        with pytest.raises(openai.RateLimitError) as limited:
            client.completions.create(model="base", prompt="a", max_tokens=2)
        assert limited.value.response.headers.get("retry-after")
        assert limited.value.response.headers["x-ratelimit-remaining-requests"] == "0"
        # Another tenant is not affected.
        openai.OpenAI(base_url=url + "/v1", api_key=other, max_retries=0).completions.create(
            model="base", prompt="a", max_tokens=2
        )
        time.sleep(1.1)
        client.completions.create(model="base", prompt="a", max_tokens=2)
