"""Accounting from served requests: the tokens bucket, the concurrency count, usage rows and /metrics
move by exactly what each response reports, with quotas in process and on a real Redis."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from blockzoo.tiny_models import TinyModelCache
from tests.router.live_stack import Stack, live_stack

PROMPTS = [[1, 12, 40, 77, 5, 300], [9, 8, 7, 6]]
MAX_TOKENS = 10
# Sampled with a third of the vocabulary as stop tokens, most choices stop well before max_tokens:
# what a request really uses then differs from the estimate its quota lease was taken with.
EARLY_STOP: dict[str, Any] = {"stop_token_ids": list(range(3, 170)), "min_tokens": 1}


@pytest.fixture(params=["in-process", "redis"])
def stack(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_factory: TinyModelCache,
) -> Iterator[Stack]:
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    with live_stack(tmp_path_factory.mktemp("accounting"), tiny_model_factory, redis_url) as s:
        yield s


class Snapshot:
    """Every account a request moves, read at one moment."""

    def __init__(self, stack: Stack) -> None:
        self.tokens = stack.tokens_taken("acme")
        self.prompt, self.completion, self.requests = stack.usage_rows("acme")
        counters = stack.counters("acme")
        self.metric_prompt = counters.get("blockzoo:prompt_tokens_total", 0.0)
        self.metric_completion = counters.get("blockzoo:generation_tokens_total", 0.0)
        self.metric_requests = counters.get("blockzoo:request_success_total", 0.0)


def assert_moved_by(stack: Stack, before: Snapshot, prompt: int, completion: int) -> None:
    after = Snapshot(stack)
    assert stack.in_flight("acme") == 0
    assert (after.prompt - before.prompt, after.completion - before.completion) == (prompt, completion)
    assert after.requests - before.requests == 1
    assert after.metric_prompt - before.metric_prompt == prompt
    assert after.metric_completion - before.metric_completion == completion
    assert after.metric_requests - before.metric_requests == 1
    # The bucket was charged the estimate and settled to what was used: nothing more, nothing less.
    assert after.tokens - before.tokens == pytest.approx(prompt + completion, abs=0.01)


def completions(stack: Stack, n: int, prompts: list[list[int]]) -> tuple[int, int, int]:
    resp = stack.client().completions.create(
        model="tiny-base", prompt=prompts, max_tokens=MAX_TOKENS, n=n, temperature=1.0, extra_body=EARLY_STOP
    )
    assert resp.usage is not None and len(resp.choices) == n * len(prompts)
    return resp.usage.prompt_tokens, resp.usage.completion_tokens, len(resp.choices)


def chat(stack: Stack, n: int) -> tuple[int, int, int]:
    resp = stack.client().chat.completions.create(
        model="tiny-base",
        messages=[{"role": "user", "content": "count the zoo"}],
        max_tokens=MAX_TOKENS,
        n=n,
        temperature=1.0,
        extra_body=EARLY_STOP,
    )
    assert resp.usage is not None and len(resp.choices) == n
    return resp.usage.prompt_tokens, resp.usage.completion_tokens, len(resp.choices)


def streamed_completions(stack: Stack, n: int, prompts: list[list[int]]) -> tuple[int, int, int]:
    stream = stack.client().completions.create(
        model="tiny-base",
        prompt=prompts,
        max_tokens=MAX_TOKENS,
        n=n,
        temperature=1.0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=EARLY_STOP,
    )
    usage, choices = None, set()
    for chunk in stream:
        # The lease is held while the response streams.
        assert stack.in_flight("acme") in (0, 1)
        choices |= {c.index for c in chunk.choices}
        if chunk.usage is not None:
            usage = chunk.usage
    assert usage is not None
    return usage.prompt_tokens, usage.completion_tokens, len(choices)


def streamed_chat(stack: Stack, n: int) -> tuple[int, int, int]:
    stream = stack.client().chat.completions.create(
        model="tiny-base",
        messages=[{"role": "user", "content": "count the zoo"}],
        max_tokens=MAX_TOKENS,
        n=n,
        temperature=1.0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=EARLY_STOP,
    )
    usage, choices = None, set()
    for chunk in stream:
        choices |= {c.index for c in chunk.choices}
        if chunk.usage is not None:
            usage = chunk.usage
    assert usage is not None
    return usage.prompt_tokens, usage.completion_tokens, len(choices)


CASES: list[tuple[str, Callable[[Stack], tuple[int, int, int]], int | None]] = [
    ("completion n=1", lambda s: completions(s, 1, PROMPTS[:1]), len(PROMPTS[0])),
    ("completion n=3", lambda s: completions(s, 3, PROMPTS[:1]), len(PROMPTS[0])),
    ("two prompts n=2", lambda s: completions(s, 2, PROMPTS), sum(map(len, PROMPTS))),
    ("chat n=1", lambda s: chat(s, 1), None),
    ("chat n=3", lambda s: chat(s, 3), None),
    ("streamed two prompts n=2", lambda s: streamed_completions(s, 2, PROMPTS), sum(map(len, PROMPTS))),
    ("streamed chat n=2", lambda s: streamed_chat(s, 2), None),
]


def test_accounts_move_by_what_each_response_reports(stack: Stack) -> None:
    chat_prompt = None
    estimated_over_used = 0
    for name, run, expected_prompt in CASES:
        before = Snapshot(stack)
        prompt, completion, choices = run(stack)
        # The response itself counts each distinct prompt once, however many choices it has.
        if expected_prompt is not None:
            assert prompt == expected_prompt, name
        elif chat_prompt is None:
            chat_prompt = prompt
        else:
            assert prompt == chat_prompt, name
        assert choices <= completion <= choices * MAX_TOKENS, name
        estimated_over_used += choices * MAX_TOKENS - completion
        assert_moved_by(stack, before, prompt, completion)
    # Early stops made the real usage differ from the leases' estimates, so a release that kept
    # the estimate would have shown above.
    assert estimated_over_used > 0
