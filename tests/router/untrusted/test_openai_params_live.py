"""The OpenAI routes on a live server refuse what they do not implement and every hostile value with a
4xx that names the parameter, never a 500 or a traceback in the log."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.router.untrusted.helpers import (
    assert_error,
    client,
    raw_post,
)


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
