"""A client's X-Request-Id is a label: reusing one, from any tenant, never touches another request."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest

from blockzoo.logging_setup import RequestContextFilter, configure_logging, request_log_context
from blockzoo.tiny_models import TinyModelCache
from runtime.sampling_params import SamplingParams
from tests.router.live_stack import Stack, live_stack

PROMPT = [1, 12, 40, 77, 5, 300]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_factory: TinyModelCache) -> Iterator[Stack]:
    with live_stack(tmp_path_factory.mktemp("identity"), tiny_model_factory) as s:
        yield s


def greedy(**extra: Any) -> dict[str, Any]:
    return {
        "model": "tiny-base",
        "prompt": PROMPT,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
        **extra,
    }


def test_reused_request_id_across_tenants_leaves_both_streams_whole(stack: Stack) -> None:
    expected = stack.client().completions.create(**greedy()).choices[0].text
    label = "shared-label-42"
    acme = stack.client("acme", timeout=15).completions.with_streaming_response.create(
        stream=True, extra_headers={"X-Request-Id": label}, **greedy()
    )
    globex = stack.client("globex", timeout=15).completions.with_streaming_response.create(
        stream=True, extra_headers={"X-Request-Id": label}, **greedy()
    )
    with acme as first:
        chunks_a = first.parse()
        texts_a = [next(iter(chunks_a)).choices[0].text]  # acme's request is in the engine now
        with globex as second:
            assert second.headers["x-request-id"] == label
            texts_b = [c.choices[0].text for c in second.parse()]
        texts_a += [c.choices[0].text for c in chunks_a]
        assert first.headers["x-request-id"] == label
    assert "".join(texts_a) == expected
    assert "".join(texts_b) == expected
    assert stack.in_flight("acme") == 0 and stack.in_flight("globex") == 0


def test_unsafe_label_is_replaced_and_missing_label_gets_a_fresh_id(stack: Stack) -> None:
    raw = stack.client().completions.with_raw_response.create(
        extra_headers={"X-Request-Id": "bad label\twith spaces"}, **greedy(max_tokens=2)
    )
    assert re.fullmatch(r"req-[0-9a-f]{32}", raw.headers["x-request-id"])
    plain = stack.client().completions.with_raw_response.create(**greedy(max_tokens=2))
    assert re.fullmatch(r"req-[0-9a-f]{32}", plain.headers["x-request-id"])


def test_log_records_of_a_request_carry_its_ids(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    # The filter `configure_logging` puts on the server's log handler, here on pytest's.
    caplog.handler.addFilter(RequestContextFilter())
    label = "trace-me-7"
    with caplog.at_level(logging.INFO, logger="router"):
        stack.client().completions.create(extra_headers={"X-Request-Id": label}, **greedy(max_tokens=3))
        stack.client().completions.create(**greedy(max_tokens=1))
    finished = [r for r in caplog.records if r.getMessage() == "request finished"]
    assert len(finished) == 2
    labelled, unlabelled = finished
    assert getattr(labelled, "client_request_id", None) == label
    server_id = getattr(labelled, "request_id", "")
    assert re.fullmatch(r"req-[0-9a-f]{32}", server_id)
    assert getattr(labelled, "completion_tokens", None) == 3
    # The next request's records carry its own ids, not the previous one's.
    assert getattr(unlabelled, "client_request_id", None) is None
    assert getattr(unlabelled, "request_id", server_id) != server_id


def test_configured_logging_writes_both_ids_into_each_line(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    try:
        configure_logging("INFO", json_lines=True)
        with request_log_context("req-0123", "client-label"):
            logging.getLogger("router.anything").info("inside", extra={"tenant": "acme"})
        logging.getLogger("router.anything").info("outside")
    finally:
        root.handlers[:], root.level = saved, level
    inside, outside = (json.loads(line) for line in capsys.readouterr().err.strip().splitlines()[-2:])
    assert inside["request_id"] == "req-0123" and inside["client_request_id"] == "client-label"
    assert inside["tenant"] == "acme"
    assert "request_id" not in outside and "client_request_id" not in outside


def test_engine_refuses_a_duplicate_request_id_and_keeps_the_first_stream(stack: Stack) -> None:
    ref = stack.inference.resolve("acme", "tiny-base")
    loaded = stack.inference.load(ref)
    engine = stack.inference.engine_for(loaded)

    async def main() -> list[int]:
        first = await engine.add_request(
            PROMPT, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True), "dup-1",
            chain=loaded.chain, tokenizer=loaded.tokenizer,
        )  # fmt: skip
        with pytest.raises(ValueError, match="already in use"):
            await engine.add_request(PROMPT, SamplingParams(max_tokens=2), "dup-1", chain=loaded.chain)
        tokens: list[int] = []
        async with asyncio.timeout(15):
            async for out in first:
                tokens = out.token_ids
        return tokens

    assert len(asyncio.run(main())) == MAX_TOKENS
