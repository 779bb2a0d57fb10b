"""A client that goes away, streaming or not, is aborted in the engine at once, frees its KV pages and
quota lease, is charged for what was generated, and leaves no traceback in the logs."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from blockzoo.tiny_models import TinyModelCache
from tests.router.live_stack import Stack, live_stack, wait_for

PROMPT = [1, 12, 40, 77, 5, 300]
# Far more than the tiny model generates in the test's lifetime: only an abort ends these requests.
MAX_TOKENS = 2000


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_factory: TinyModelCache) -> Iterator[Stack]:
    with live_stack(tmp_path_factory.mktemp("disconnect"), tiny_model_factory) as s:
        yield s


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def problems() -> Iterator[list[logging.LogRecord]]:
    """Warnings and errors from anywhere in the server, uvicorn's own loggers (which do not
    propagate to the root) included."""
    handler = _Collect()
    loggers = [logging.getLogger(), logging.getLogger("uvicorn"), logging.getLogger("uvicorn.error")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield handler.records
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


@pytest.fixture
def generated_at_abort(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Engine request id -> tokens it had generated when the engine aborted it (a spy on the real
    engine's abort, run on its own thread)."""
    engine = stack.inference.engine_for(stack.inference.load(stack.inference.resolve("acme", "tiny-base")))
    real_abort = engine.engine.abort
    seen: dict[str, int] = {}

    def abort(request_id: str) -> bool:
        request = engine.engine.scheduler.get_request(request_id)
        if request is not None:
            seen[request_id] = request.num_output_tokens
        return real_abort(request_id)

    monkeypatch.setattr(engine.engine, "abort", abort)
    return seen


def settled(stack: Stack, tenant: str = "acme") -> bool:
    return stack.engine_idle() and stack.in_flight(tenant) == 0


def assert_charged_as_generated(
    stack: Stack, before: tuple[int, int, int], seen: int, generated: dict[str, int], n: int
) -> None:
    """Usage, metrics and the tokens bucket agree on one request's tokens, and those are exactly
    what the engine had generated for its n choices when it aborted them."""
    prompt, completion, requests = (a - b for a, b in zip(stack.usage_rows("acme"), before, strict=True))
    assert requests == 1
    assert len(generated) == n, generated
    assert completion == sum(generated.values())
    assert 0 < completion < MAX_TOKENS and completion >= seen
    counters = stack.counters("acme")
    assert counters["blockzoo:generation_tokens_total"] == stack.usage_rows("acme")[1]
    assert counters["blockzoo:prompt_tokens_total"] == stack.usage_rows("acme")[0]
    assert abs(stack.tokens_taken("acme") - sum(stack.usage_rows("acme")[:2])) < 0.01
    assert prompt == len(PROMPT)


def body(n: int, stream: bool) -> dict[str, Any]:
    return {
        "model": "tiny-base",
        "prompt": PROMPT,
        "max_tokens": MAX_TOKENS,
        "n": n,
        "temperature": 0.7,
        "ignore_eos": True,
        "stream": stream,
    }


@pytest.mark.parametrize("n", [1, 2])
def test_dropped_stream_is_aborted_freed_and_charged_for_what_ran(
    stack: Stack,
    problems: list[logging.LogRecord],
    generated_at_abort: dict[str, int],
    caplog: pytest.LogCaptureFixture,
    n: int,
) -> None:
    caplog.set_level(logging.INFO, logger="router.admission")
    assert wait_for(lambda: settled(stack), 5)
    before = stack.usage_rows("acme")
    client = stack.client(timeout=30)
    stream = client.completions.create(
        model="tiny-base",
        prompt=PROMPT,
        max_tokens=MAX_TOKENS,
        n=n,
        temperature=0.7,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    seen = 0
    for chunk in stream:
        seen += sum(1 for c in chunk.choices if c.text)
        if seen >= 5:
            break
    assert stack.inference.stats().num_running == n
    stream.close()
    client.close()
    dropped = time.monotonic()
    assert wait_for(lambda: settled(stack), 1.0), stack.inference.stats()
    assert time.monotonic() - dropped <= 1.0
    # The freed slot stays freed: the abort did not race a late release or a double one.
    time.sleep(0.2)
    assert settled(stack)
    assert_charged_as_generated(stack, before, seen, generated_at_abort, n)
    assert not problems, [r.getMessage() for r in problems]
    finished = [r for r in caplog.records if r.getMessage() == "request finished"]
    assert [(getattr(r, "client_gone", None), getattr(r, "finish_reason", None)) for r in finished] == [
        (True, "abort")
    ]


def test_dropped_chat_stream_is_aborted(stack: Stack, problems: list[logging.LogRecord]) -> None:
    assert wait_for(lambda: settled(stack), 5)
    before = stack.usage_rows("acme")
    client = stack.client(timeout=30)
    stream = client.chat.completions.create(
        model="tiny-base",
        messages=[{"role": "user", "content": "tell me everything"}],
        max_tokens=MAX_TOKENS,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for i, _ in enumerate(stream):
        if i == 4:
            break
    stream.close()
    client.close()
    assert wait_for(lambda: settled(stack), 1.0), stack.inference.stats()
    after = stack.usage_rows("acme")
    assert after[2] == before[2] + 1 and 0 < after[1] - before[1] < MAX_TOKENS
    assert not problems, [r.getMessage() for r in problems]


@pytest.mark.parametrize("n", [1, 2])
def test_non_streaming_client_that_times_out_is_aborted_without_a_traceback(
    stack: Stack, problems: list[logging.LogRecord], generated_at_abort: dict[str, int], n: int
) -> None:
    assert wait_for(lambda: settled(stack), 5)
    before = stack.usage_rows("acme")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            stack.url + "/v1/completions",
            json=body(n, False),
            headers={"Authorization": f"Bearer {stack.keys['acme']}"},
            timeout=httpx.Timeout(10, read=0.5),
        )
    gone = time.monotonic()
    assert wait_for(lambda: settled(stack), 1.0), stack.inference.stats()
    assert time.monotonic() - gone <= 1.0
    assert_charged_as_generated(stack, before, 0, generated_at_abort, n)
    assert not problems, [r.getMessage() for r in problems]
