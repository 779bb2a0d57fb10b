"""The OpenAI-compatible API on a live uvicorn server, called with the official `openai` client."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import torch

from blockzoo.settings import Settings
from blockzoo.tiny_models import TinyModelCache
from router.app import create_app
from router.auth import admin_key_digest
from router.inference import InferenceService
from router.services import Services
from runtime.checkpoint_loader import load_tokenizer
from runtime.engine import LLMEngine
from runtime.sampling_params import SamplingParams
from tests.router.live_server import serve
from tests.zoo.test_lora_oracle import make_adapter
from tests.zoo.zoo_helpers import add_tenant, open_zoo


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_factory: TinyModelCache
) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("live")
    base = tiny_model_factory("llama", num_layers=2)
    zoo = open_zoo(root / "zoo")
    zoo.add_base("tiny-base", base)
    keys = {"acme": add_tenant(zoo, "acme"), "globex": add_tenant(zoo, "globex")}
    zoo.register(
        "acme",
        "acme-lora",
        make_adapter(base, root / "ad", {"r": 4, "target_modules": ["q_proj", "v_proj"]}, 7),
    )
    settings = Settings(data_dir=root / "data", kv_cache_memory=16 << 20, max_model_len=256, page_size=8)
    inference = InferenceService(settings, zoo)
    app = create_app(Services(settings, zoo, admin_key_digest("admin-secret")), inference)
    with serve(app) as url:
        yield {"url": url, "keys": keys, "zoo": zoo, "base": base, "inference": inference}


def client(live: dict[str, Any], tenant: str = "acme") -> openai.OpenAI:
    return openai.OpenAI(base_url=live["url"] + "/v1", api_key=live["keys"][tenant], max_retries=0)


def offline_greedy(live: dict[str, Any], model: str, prompt_ids: list[int], n: int) -> list[int]:
    zoo = live["zoo"]
    chain = zoo.load_chain(zoo.resolve("acme", model), torch.float32)
    engine = LLMEngine(chain, load_tokenizer(live["base"]), Settings(kv_cache_memory=8 << 20))
    engine.add_request(
        prompt_ids, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), request_id="x"
    )
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens = out.token_ids
    return tokens


def test_models_lists_own_and_shared(live: dict[str, Any]) -> None:
    acme = {m.id: m for m in client(live).models.list().data}
    assert set(acme) == {"tiny-base", "acme-lora"}
    assert (
        acme["acme-lora"].model_extra is not None and acme["acme-lora"].model_extra["parent"] == "tiny-base"
    )
    assert acme["acme-lora"].model_extra["root"] == "tiny-base"
    globex = {m.id for m in client(live, "globex").models.list().data}
    assert globex == {"tiny-base"}


def test_completion_matches_offline_engine(live: dict[str, Any]) -> None:
    prompt = [1, 12, 40, 77, 5, 300]
    resp = client(live).completions.create(
        model="acme-lora", prompt=prompt, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    expected = offline_greedy(live, "acme-lora", prompt, 10)
    tok = load_tokenizer(live["base"])
    assert resp.choices[0].text == tok.decode(expected, skip_special_tokens=True)
    assert resp.usage is not None and resp.usage.completion_tokens == 10 and resp.usage.prompt_tokens == 6
    assert resp.choices[0].finish_reason == "length"


def test_streamed_completion_equals_non_streamed(live: dict[str, Any]) -> None:
    c = client(live)
    kwargs: dict[str, Any] = {
        "model": "tiny-base",
        "prompt": "The zoo keeps",
        "max_tokens": 12,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    whole = c.completions.create(**kwargs)
    pieces, usage = [], None
    for chunk in c.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces) == whole.choices[0].text
    assert usage is not None and usage.completion_tokens == 12
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens is not None


def test_chat_streamed_and_not(live: dict[str, Any]) -> None:
    c = client(live)
    messages: list[Any] = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello zoo"},
    ]
    whole = c.chat.completions.create(
        model="acme-lora",
        messages=messages,
        max_tokens=8,
        temperature=0,
        seed=3,
        extra_body={"ignore_eos": True},
    )
    assert whole.choices[0].message.role == "assistant"
    text = "".join(
        ch.choices[0].delta.content or ""
        for ch in c.chat.completions.create(
            model="acme-lora",
            messages=messages,
            max_tokens=8,
            temperature=0,
            seed=3,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        if ch.choices
    )
    assert text == whole.choices[0].message.content
    assert whole.usage is not None and whole.usage.completion_tokens == 8


def test_n_seed_logprobs_and_stop(live: dict[str, Any]) -> None:
    c = client(live)
    a = c.completions.create(model="tiny-base", prompt="abc", max_tokens=6, n=3, seed=11, temperature=1.0)
    b = c.completions.create(model="tiny-base", prompt="abc", max_tokens=6, n=3, seed=11, temperature=1.0)
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]
    assert sorted(ch.index for ch in a.choices) == [0, 1, 2]
    lp = c.completions.create(model="tiny-base", prompt="abc", max_tokens=4, temperature=0, logprobs=2)
    assert lp.choices[0].logprobs is not None and len(lp.choices[0].logprobs.token_logprobs or []) == 4
    free = (
        c.completions.create(
            model="tiny-base", prompt="abc", max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    stop = next(
        free[i : i + 2] for i in range(5, len(free) - 2) if free[i : i + 2].strip() == free[i : i + 2]
    )
    stopped = c.completions.create(
        model="tiny-base",
        prompt="abc",
        max_tokens=20,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert stopped.choices[0].text == free[: free.index(stop)] and stopped.choices[0].finish_reason == "stop"


def test_errors_have_openai_shape(live: dict[str, Any]) -> None:
    c = client(live)
    with pytest.raises(openai.NotFoundError) as missing:
        c.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert missing.value.code == "model_not_found"
    # Another tenant's model does not exist for globex: 404, not 403.
    with pytest.raises(openai.NotFoundError):
        client(live, "globex").completions.create(model="acme-lora", prompt="x", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live["url"] + "/v1", api_key="bz-wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError) as too_long:
        c.completions.create(model="tiny-base", prompt=list(range(5, 300)), max_tokens=2)
    assert "maximum context length" in str(too_long.value)
    with pytest.raises(openai.UnprocessableEntityError):
        c.completions.create(model="tiny-base", prompt="x", max_tokens=-3)
    raw = httpx.post(
        live["url"] + "/v1/completions",
        content=b"{not json",
        headers={"Authorization": f"Bearer {live['keys']['acme']}", "content-type": "application/json"},
    )
    assert raw.status_code == 422 and set(raw.json()["error"]) == {"message", "type", "param", "code"}
    assert raw.headers["x-request-id"]


def test_client_disconnect_aborts_request(live: dict[str, Any]) -> None:
    headers = {"Authorization": f"Bearer {live['keys']['acme']}"}
    body = {
        "model": "tiny-base",
        "prompt": "go",
        "max_tokens": 200,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream(
        "POST", live["url"] + "/v1/completions", json=body, headers=headers, timeout=30
    ) as resp:
        for line in resp.iter_lines():
            if line.startswith("data:"):
                break  # first token arrived; now hang up
    deadline = time.monotonic() + 10
    engine_stats = None
    while time.monotonic() < deadline:
        engine_stats = _engine_stats(live)
        if engine_stats["running"] == 0 and engine_stats["waiting"] == 0:
            break
        time.sleep(0.1)
    assert engine_stats is not None and engine_stats["running"] == 0 and engine_stats["waiting"] == 0
    assert engine_stats["free_pages"] == engine_stats["total_pages"]


def _engine_stats(live: dict[str, Any]) -> dict[str, int]:
    app_inference: InferenceService = live["inference"]
    s = app_inference.stats()
    return {
        "running": s.num_running,
        "waiting": s.num_waiting,
        "free_pages": s.num_free_pages,
        "total_pages": s.num_total_pages,
    }
