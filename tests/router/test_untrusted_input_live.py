"""Hostile input on a live uvicorn server: template bombs, huge prompts and bodies, and every hostile value
of the OpenAI routes answered with a clear 4xx, while /health keeps answering and memory stays put.

The tenant model `acme-bomb` is a full fine-tune whose tokenizer carries a chat template that renders
ordinary conversations but turns into a bomb when the last message names one. It is registered through
the zoo directly, as a template that passes the registration probes would be: render-time limits must
hold on their own.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from blockzoo.settings import Settings
from blockzoo.tiny_models import TinyModelCache
from router.app import create_app
from router.auth import admin_key_digest
from router.inference import InferenceService
from router.jobs import build_jobs
from router.routes_health import router as health_router
from router.routes_models import models_router
from router.services import Services
from router.uploads import UploadLimits
from tests.router.live_server import serve
from tests.zoo.zoo_helpers import add_tenant, open_zoo

BOMB_CHARS = 400_000_000
CONDITIONAL_BOMB = (
    "{%- set last = messages[-1]['content'] -%}"
    "{%- if last == 'mul' -%}{% set s = 'x' * " + str(BOMB_CHARS) + " %}{{ s }}"
    "{%- elif last == 'concat' -%}{% set ns = namespace(s='x' * 1000) %}"
    "{% for i in range(30) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}"
    "{%- elif last == 'range' -%}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    "{%- elif last == 'output' -%}{% for i in range(100000) %}" + "y" * 4000 + "{% endfor %}"
    "{%- elif last == 'raise' -%}{{ raise_exception('this model takes no such conversation') }}"
    "{%- else -%}<|im_start|>user\n{{ last }}<|im_end|>\n<|im_start|>assistant\n{%- endif -%}"
)
OBVIOUS_BOMB = "{% set s = 'x' * 400000000 %}{{ s }}"
MiB = 1 << 20


def _with_template(base: Path, out: Path, template: str) -> Path:
    shutil.copytree(base, out)
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_factory: TinyModelCache
) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("untrusted")
    base = tiny_model_factory("llama", num_layers=2)
    zoo = open_zoo(root / "zoo")
    zoo.add_base("tiny-base", base)
    keys = {"acme": add_tenant(zoo, "acme")}
    zoo.register("acme", "acme-bomb", _with_template(base, root / "bomb", CONDITIONAL_BOMB))
    settings = Settings(
        data_dir=root / "data",
        kv_cache_memory=16 << 20,
        max_model_len=256,
        page_size=8,
        max_sequences_per_request=8,
        # Longer than the /health bound, so a render on the event loop would show as a stall.
        chat_template_timeout_s=2.0,
    )
    inference = InferenceService(settings, zoo)
    jobs = build_jobs(settings, zoo)
    app = create_app(
        Services(settings, zoo, admin_key_digest("admin-secret")),
        inference,
        routers=[health_router, models_router([], UploadLimits(64 * MiB, 64 * MiB))],
        state={"jobs": jobs},
        on_shutdown=[jobs.shutdown],
    )
    with serve(app) as url:
        yield {"url": url, "keys": keys, "base": base, "root": root}


def client(live: dict[str, Any]) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=live["url"] + "/v1", api_key=live["keys"]["acme"], max_retries=0, timeout=60
    )


def raw_post(live: dict[str, Any], path: str, body: bytes, **headers: str) -> httpx.Response:
    return httpx.post(
        live["url"] + path,
        content=body,
        headers={
            "Authorization": f"Bearer {live['keys']['acme']}",
            "content-type": "application/json",
            **headers,
        },
        timeout=60,
    )


class HealthWatch:
    """Polls /health from another thread; `worst` is the slowest answer seen (inf if one failed)."""

    def __init__(self, url: str) -> None:
        self.url = url + "/health"
        self.worst = 0.0
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as http:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    ok = http.get(self.url).status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.worst = max(self.worst, time.monotonic() - start if ok else float("inf"))
                self.polls += 1
                time.sleep(0.02)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def _rss_peak_reset() -> None:
    # Writing 5 to clear_refs resets VmHWM, so the peak read afterwards is this test's alone.
    Path("/proc/self/clear_refs").write_text("5")


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


def assert_error(
    exc: openai.APIStatusError | httpx.Response, status: int, code: str, param: str | None
) -> str:
    response = exc.response if isinstance(exc, openai.APIStatusError) else exc
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["code"], error["param"]) == (code, param), error
    assert "Traceback" not in error["message"] and "/work" not in error["message"]
    return str(error["message"])


@pytest.fixture
def no_errors_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """The server runs in this process: nothing at ERROR (a traceback of a 500) may be logged."""
    caplog.set_level(logging.WARNING)
    yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


@pytest.mark.parametrize("variant", ["mul", "concat", "range", "output"])
def test_template_bomb_is_a_400_and_the_server_stays_responsive(
    live: dict[str, Any], variant: str, no_errors_logged: None
) -> None:
    _rss_peak_reset()
    before = _rss("VmRSS")
    with HealthWatch(live["url"]) as watch, pytest.raises(openai.BadRequestError) as bomb:
        client(live).chat.completions.create(
            model="acme-bomb", messages=[{"role": "user", "content": variant}], max_tokens=2
        )
    message = assert_error(bomb.value, 400, "invalid_chat_template", "messages")
    assert "limit" in message or "more than" in message or "over" in message
    assert watch.polls > 0 and watch.worst < 1.0, f"/health took {watch.worst:.2f}s during the {variant} bomb"
    assert _rss("VmHWM") - before < 100 * MiB, "the bomb grew the server's memory"
    # The same model still serves ordinary conversations.
    ok = client(live).chat.completions.create(
        model="acme-bomb", messages=[{"role": "user", "content": "hello"}], max_tokens=2
    )
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_raise_exception_in_a_template_is_a_400_that_says_so(
    live: dict[str, Any], no_errors_logged: None
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client(live).chat.completions.create(
            model="acme-bomb", messages=[{"role": "user", "content": "raise"}], max_tokens=2
        )
    message = assert_error(refused.value, 400, "chat_template_error", "messages")
    assert "this model takes no such conversation" in message


def test_registration_refuses_an_obvious_template_bomb(live: dict[str, Any], no_errors_logged: None) -> None:
    folder = _with_template(live["base"], live["root"] / "obvious", OBVIOUS_BOMB)
    files = [
        ("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in sorted(folder.iterdir())
    ]
    with HealthWatch(live["url"]) as watch:
        response = httpx.post(
            live["url"] + "/v1/fine-tunes",
            data={"name": "acme-obvious"},
            files=files,
            headers={"Authorization": f"Bearer {live['keys']['acme']}"},
            timeout=60,
        )
    message = assert_error(response, 400, "invalid_chat_template", "files")
    assert message.startswith("chat_template.jinja:")
    assert watch.worst < 1.0


def test_large_prompt_is_refused_early_and_the_server_stays_responsive(
    live: dict[str, Any], no_errors_logged: None
) -> None:
    prompt = ("The zoo keeps many blocks, émoji 🙂. " * 100_000)[: 3 * MiB]
    with HealthWatch(live["url"]) as watch:
        for _ in range(3):
            with pytest.raises(openai.BadRequestError) as completions:
                client(live).completions.create(model="tiny-base", prompt=prompt, max_tokens=2)
            # Refused by its length alone, before any tokenizing ("…longer than any 256-token text can be").
            assert "256-token" in assert_error(completions.value, 400, "context_length_exceeded", "prompt")
            with pytest.raises(openai.BadRequestError) as chat:
                client(live).chat.completions.create(
                    model="tiny-base", messages=[{"role": "user", "content": prompt}], max_tokens=2
                )
            assert "256-token" in assert_error(chat.value, 400, "context_length_exceeded", "messages")
    assert watch.polls > 0 and watch.worst < 1.0, f"/health took {watch.worst:.2f}s during 3 MB prompts"


def test_large_token_id_prompt_keeps_the_server_responsive(
    live: dict[str, Any], no_errors_logged: None
) -> None:
    # 1.8 million token ids fill most of the 4 MiB body limit; validating them must not hold the loop.
    body = json.dumps({"model": "tiny-base", "prompt": [1] * 1_800_000}, separators=(",", ":")).encode()
    with HealthWatch(live["url"]) as watch:
        for _ in range(3):
            too_long = raw_post(live, "/v1/completions", body)
            assert_error(too_long, 400, "context_length_exceeded", "prompt")
    assert watch.polls > 0 and watch.worst < 1.0, f"/health took {watch.worst:.2f}s during token-id prompts"


def test_oversized_body_is_a_413(live: dict[str, Any], no_errors_logged: None) -> None:
    body = json.dumps({"model": "tiny-base", "prompt": "x" * (5 * MiB), "max_tokens": 1}).encode()
    assert_error(raw_post(live, "/v1/completions", body), 413, "request_too_large", None)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit counts bytes as they arrive
        yield b'{"model": "tiny-base", "prompt": "'
        for _ in range(6):
            yield b"x" * MiB
        yield b'"}'

    streamed = httpx.post(
        live["url"] + "/v1/completions",
        content=chunks(),
        headers={"Authorization": f"Bearer {live['keys']['acme']}", "content-type": "application/json"},
        timeout=60,
    )
    assert_error(streamed, 413, "request_too_large", None)


def test_too_many_sequences_is_a_400_naming_n(live: dict[str, Any], no_errors_logged: None) -> None:
    with pytest.raises(openai.BadRequestError) as many:
        client(live).completions.create(model="tiny-base", prompt=["a", "b", "c"], n=3, max_tokens=1)
    assert_error(many.value, 400, "invalid_value", "n")
    with pytest.raises(openai.BadRequestError) as prompts:
        client(live).completions.create(model="tiny-base", prompt=["a"] * 9, max_tokens=1)
    assert_error(prompts.value, 400, "invalid_value", "prompt")


@pytest.mark.parametrize(
    ("route", "extra", "param"),
    [
        ("chat", {"response_format": {"type": "json_object"}}, "response_format"),
        ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ("chat", {"tool_choice": "required"}, "tool_choice"),
        ("chat", {"logit_bias": {"5": 100}}, "logit_bias"),
        ("chat", {"functions": [{"name": "f"}]}, "functions"),
        ("chat", {"parallel_tool_calls": False}, "parallel_tool_calls"),
        ("chat", {"modalities": ["text", "audio"]}, "modalities"),
        ("chat", {"reasoning_effort": "high"}, "reasoning_effort"),
        ("chat", {"some_new_knob": 1}, "some_new_knob"),
        ("completions", {"best_of": 3}, "best_of"),
        ("completions", {"logit_bias": {"5": -100}}, "logit_bias"),
        ("completions", {"suffix": "tail"}, "suffix"),
    ],
)
def test_unsupported_parameters_are_refused(
    live: dict[str, Any], route: str, extra: dict[str, Any], param: str, no_errors_logged: None
) -> None:
    c = client(live)
    with pytest.raises(openai.BadRequestError) as refused:
        if route == "chat":
            c.chat.completions.create(
                model="tiny-base",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=1,
                extra_body=extra,
            )
        else:
            c.completions.create(model="tiny-base", prompt="hi", max_tokens=1, extra_body=extra)
    assert_error(refused.value, 400, "unsupported_parameter", param)


def test_no_op_values_and_harmless_parameters_are_accepted(
    live: dict[str, Any], no_errors_logged: None
) -> None:
    resp = client(live).chat.completions.create(
        model="tiny-base",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=1,
        user="u-1",
        store=False,
        metadata={"k": "v"},
        response_format={"type": "text"},
        tool_choice="none",
        extra_body={"service_tier": "auto", "logit_bias": {}},
    )
    assert resp.choices[0].finish_reason in ("length", "stop")


def test_top_logprobs_without_logprobs_is_refused(live: dict[str, Any], no_errors_logged: None) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client(live).chat.completions.create(
            model="tiny-base", messages=[{"role": "user", "content": "hi"}], max_tokens=1, top_logprobs=3
        )
    assert_error(refused.value, 400, "invalid_value", "top_logprobs")


def test_tool_calls_in_messages_are_refused(live: dict[str, Any], no_errors_logged: None) -> None:
    call: Any = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    with pytest.raises(openai.BadRequestError) as refused:
        client(live).chat.completions.create(
            model="tiny-base",
            messages=[
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
            ],
            max_tokens=1,
        )
    assert_error(refused.value, 400, "unsupported_parameter", "messages[1].tool_calls")


# Raw JSON text: the openai client cannot send lone surrogates, NaN or 5000-digit integers.
LONE = '"\\ud800 tail"'
HOSTILE_BODIES = {
    "surrogate_prompt": ("/v1/completions", '{"model": "tiny-base", "prompt": ' + LONE + "}", 400, "prompt"),
    "surrogate_prompt_list": (
        "/v1/completions", '{"model": "tiny-base", "prompt": ["ok", ' + LONE + "]}", 400, "prompt[1]"
    ),
    "surrogate_message": (
        "/v1/chat/completions",
        '{"model": "tiny-base", "messages": [{"role": "user", "content": ' + LONE + "}]}",
        400,
        "messages[0].content",
    ),
    "surrogate_stop": (
        "/v1/completions", '{"model": "tiny-base", "prompt": "a", "stop": [' + LONE + "]}", 400, "stop[0]"
    ),
    "surrogate_model": ("/v1/completions", '{"model": ' + LONE + ', "prompt": "a"}', 400, "model"),
    "nan_temperature": ("/v1/completions", '{"model": "tiny-base", "prompt": "a", "temperature": NaN}', 422, "temperature"),
    "inf_temperature": (
        "/v1/chat/completions",
        '{"model": "tiny-base", "messages": [{"role": "user", "content": "a"}], "temperature": Infinity}',
        422,
        "temperature",
    ),
    "inf_top_p": ("/v1/completions", '{"model": "tiny-base", "prompt": "a", "top_p": -Infinity}', 422, "top_p"),
    "huge_seed": ("/v1/completions", '{"model": "tiny-base", "prompt": "a", "seed": ' + "9" * 4000 + "}", 422, "seed"),
    "huge_top_k": ("/v1/completions", '{"model": "tiny-base", "prompt": "a", "top_k": ' + "9" * 4000 + "}", 422, "top_k"),
    "huge_min_tokens": (
        "/v1/completions", '{"model": "tiny-base", "prompt": "a", "min_tokens": ' + "9" * 30 + "}", 422, "min_tokens"
    ),
    "huge_stop_token_id": (
        "/v1/completions", '{"model": "tiny-base", "prompt": "a", "stop_token_ids": [' + "9" * 30 + "]}", 422,
        "stop_token_ids.0",
    ),
    "huge_prompt_token": ("/v1/completions", '{"model": "tiny-base", "prompt": [1, ' + "9" * 4000 + "]}", 422, None),
    "5000_digit_int": ("/v1/completions", '{"model": "tiny-base", "prompt": "a", "seed": ' + "9" * 5000 + "}", 400, None),
    "deep_json": ("/v1/completions", '{"model": "tiny-base", "prompt": "a", "metadata": ' + "[" * 100_000 + "]" * 100_000 + "}", 400, None),
    "deep_but_parseable": ("/v1/completions", '{"model": "tiny-base", "prompt": ' + "[" * 500 + "]" * 500 + "}", 422, None),
    "surrogate_content_part": (
        "/v1/chat/completions",
        '{"model": "tiny-base", "messages": [{"role": "user", "content": [{"type": "text", "text": ' + LONE + "}]}]}",
        400,
        "messages[0].content[0].text",
    ),
    "too_many_messages": (
        "/v1/chat/completions",
        '{"model": "tiny-base", "messages": [' + ",".join(['{"role":"user","content":"a"}'] * 100_000) + "]}",
        400,
        "messages",
    ),
    "surrogate_unknown_key": ("/v1/completions", '{"model": "tiny-base", "prompt": "a", "\\udc00x": 1}', 400, "\\udc00x"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(HOSTILE_BODIES))
def test_hostile_values_get_a_4xx_naming_the_field(
    live: dict[str, Any], case: str, no_errors_logged: None
) -> None:
    path, body, status, param = HOSTILE_BODIES[case]
    response = raw_post(live, path, body.encode())
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param, error
    assert "Traceback" not in error["message"] and "/work" not in error["message"]
    if case.endswith("temperature"):
        assert "finite" in error["message"], error
    # The connection survives: the server is fine and answers the next request.
    assert httpx.get(live["url"] + "/health", timeout=5).status_code == 200
