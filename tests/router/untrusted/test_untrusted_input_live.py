"""Chat-template bombs, huge prompts and bodies, and fan-out on a live uvicorn server: each gets a clear
4xx while /health keeps answering within a second and the server's memory stays put."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.router.untrusted.helpers import (
    OBVIOUS_BOMB,
    HealthWatch,
    MiB,
    assert_error,
    client,
    raw_post,
    rss,
    rss_peak_reset,
    with_template,
)


@pytest.mark.parametrize("variant", ["mul", "concat", "range", "output"])
def test_template_bomb_is_a_400_and_the_server_stays_responsive(
    live: dict[str, Any], variant: str, no_errors_logged: None
) -> None:
    rss_peak_reset()
    before = rss("VmRSS")
    with HealthWatch(live["url"]) as watch, pytest.raises(openai.BadRequestError) as bomb:
        client(live).chat.completions.create(
            model="acme-bomb", messages=[{"role": "user", "content": variant}], max_tokens=2
        )
    message = assert_error(bomb.value, 400, "invalid_chat_template", "messages")
    assert "limit" in message or "more than" in message or "over" in message
    assert watch.polls > 0 and watch.worst < 1.0, f"/health took {watch.worst:.2f}s during the {variant} bomb"
    assert rss("VmHWM") - before < 100 * MiB, "the bomb grew the server's memory"
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
    folder = with_template(live["base"], live["root"] / "obvious", OBVIOUS_BOMB)
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
