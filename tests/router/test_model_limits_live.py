"""Each model keeps its own context limit: a short fine-tune loaded first limits only itself."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
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
from tests.zoo.zoo_helpers import add_tenant, fine_tune_top_layers, open_zoo
from zoo.catalog.database import factory_engine

SERVER_CAP = 256


def short_context_fine_tune(base: Path, out: Path, max_position_embeddings: int) -> Path:
    """A full fine-tune of `base` (top layer changed) whose config allows only a short context."""
    fine_tune_top_layers(base, out, [1], seed=5)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["max_position_embeddings"] = max_position_embeddings
    config_path.write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module", params=[None, SERVER_CAP], ids=["no-server-cap", "server-cap"])
def live(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_factory: TinyModelCache,
) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("limits")
    base = tiny_model_factory("llama", num_layers=2)  # max_position_embeddings 2048
    zoo = open_zoo(root / "zoo")
    zoo.add_base("tiny-base", base)
    keys = {"acme": add_tenant(zoo, "acme"), "globex": add_tenant(zoo, "globex")}
    zoo.register("acme", "short-ft", short_context_fine_tune(base, root / "short", 40))
    settings = Settings(
        data_dir=root / "data", kv_cache_memory=16 << 20, max_model_len=request.param, page_size=8
    )
    inference = InferenceService(settings, zoo)
    app = create_app(Services(settings, zoo, admin_key_digest("admin")), inference)
    with serve(app) as url:
        yield {"url": url, "keys": keys, "inference": inference, "zoo": zoo, "cap": request.param}
    factory_engine(zoo.sessions).dispose()


def client(live: dict[str, Any], tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=live["url"] + "/v1", api_key=live["keys"][tenant], max_retries=0)


def prompt(n: int) -> list[int]:
    return [5 + i % 200 for i in range(n)]


def complete(live: dict[str, Any], tenant: str, model: str, n: int) -> Any:
    return client(live, tenant).completions.create(
        model=model, prompt=prompt(n), max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
    )


def test_a_short_fine_tune_loaded_first_limits_only_itself(live: dict[str, Any]) -> None:
    # The fine-tune arrives first: before the fix its 40-token limit became the engine's for everyone.
    assert complete(live, "acme", "short-ft", 10).usage.completion_tokens == 4
    long = complete(live, "globex", "tiny-base", 100)
    assert long.usage.prompt_tokens == 100 and long.usage.completion_tokens == 4
    assert complete(live, "acme", "tiny-base", 100).usage.completion_tokens == 4
    with pytest.raises(openai.BadRequestError) as err:
        complete(live, "acme", "short-ft", 100)
    assert err.value.code == "context_length_exceeded"
    assert "maximum context length is 40 tokens" in err.value.message
    # Within its 40 tokens, prompt plus max_tokens is the fine-tune's own bound too.
    with pytest.raises(openai.BadRequestError) as err:
        complete(live, "acme", "short-ft", 38)
    assert err.value.code == "context_length_exceeded" and err.value.param == "max_tokens"
    assert "maximum context length is 40 tokens" in err.value.message and "req-" not in err.value.message


def test_the_server_setting_caps_every_model(live: dict[str, Any]) -> None:
    # Without a cap the base's own 2048 positions are its limit; with one, the cap is.
    limit = live["cap"] or 2048
    with pytest.raises(openai.BadRequestError) as err:
        complete(live, "globex", "tiny-base", limit + 10)
    assert err.value.code == "context_length_exceeded"
    assert f"maximum context length is {limit} tokens" in err.value.message


def test_limits_come_from_each_models_own_config(live: dict[str, Any]) -> None:
    inference: InferenceService = live["inference"]
    short = inference.load(inference.resolve("acme", "short-ft"))
    base = inference.load(inference.resolve("globex", "tiny-base"))
    assert inference.max_model_len(short) == 40
    assert inference.max_model_len(base) == (live["cap"] or 2048)
    # One engine serves the base's family, configured from the base itself.
    engine = inference.engine_for(short)
    assert engine is inference.engine_for(base)
    assert engine.engine.chain.digest == base.chain.digest
