"""A fault inside an engine step reaches the client as a clean error; the server goes on serving."""

from __future__ import annotations

import time
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
from runtime.engine import LLMEngine
from runtime.scheduler_output import ExecutorOutput, SchedulerOutput
from tests.router.live_server import serve
from tests.zoo.zoo_helpers import add_tenant, open_zoo
from zoo.catalog.database import factory_engine

PROMPT = [1, 12, 40, 77, 5, 300]


class Fault:
    """Makes the engine's step fail once, `after_steps` steps after it is armed."""

    def __init__(self, engine: LLMEngine) -> None:
        self.real = engine.executor.execute
        self.countdown: int | None = None
        engine.executor.execute = self  # type: ignore[method-assign,assignment]

    def arm(self, after_steps: int = 0) -> None:
        self.countdown = after_steps

    def __call__(self, plan: SchedulerOutput) -> ExecutorOutput:
        result = self.real(plan)
        if self.countdown is not None:
            if self.countdown == 0:
                self.countdown = None
                raise RuntimeError("injected fault at /srv/secret/path")
            self.countdown -= 1
        return result


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_factory: TinyModelCache
) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("step-failure")
    zoo = open_zoo(root / "zoo")
    zoo.add_base("tiny-base", tiny_model_factory("llama", num_layers=2))
    key = add_tenant(zoo, "acme")
    settings = Settings(data_dir=root / "data", kv_cache_memory=8 << 20, max_model_len=256, page_size=8)
    inference = InferenceService(settings, zoo)
    app = create_app(Services(settings, zoo, admin_key_digest("admin")), inference)
    with serve(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
        expected = complete(client)  # starts the base's engine
        engine = inference.engine_for(inference.load(inference.resolve("acme", "tiny-base"))).engine
        yield {"client": client, "fault": Fault(engine), "engine": engine, "expected": expected}
    factory_engine(zoo.sessions).dispose()


def complete(client: openai.OpenAI) -> str:
    resp = client.completions.create(
        model="tiny-base", prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    return resp.choices[0].text


def assert_engine_drained(engine: LLMEngine) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats.num_running == stats.num_waiting == 0 and stats.num_free_pages == stats.num_total_pages:
            return
        time.sleep(0.05)
    raise AssertionError(f"engine not drained: {engine.stats()}")


def test_non_streaming_request_gets_a_generic_500_and_the_server_goes_on(live: dict[str, Any]) -> None:
    live["fault"].arm()
    with pytest.raises(openai.InternalServerError) as err:
        complete(live["client"])
    assert err.value.status_code == 500
    body = err.value.response.text
    assert "internal server error" in body
    assert "injected" not in body and "/srv" not in body and "Traceback" not in body
    assert_engine_drained(live["engine"])
    assert complete(live["client"]) == live["expected"]


def test_streaming_request_ends_with_an_error_event(live: dict[str, Any]) -> None:
    live["fault"].arm(after_steps=3)  # a few tokens reach the client first
    stream = live["client"].completions.create(
        model="tiny-base",
        prompt=PROMPT,
        max_tokens=50,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    texts: list[str] = []
    with pytest.raises(openai.APIError) as err:
        for chunk in stream:
            texts.append(chunk.choices[0].text)
    assert texts and "".join(texts) == live["expected"][: len("".join(texts))]
    assert err.value.message == "internal server error"
    assert "injected" not in str(err.value.body)
    assert_engine_drained(live["engine"])
    assert complete(live["client"]) == live["expected"]
