"""What the engine reports back for each request after each step."""

from __future__ import annotations

from typing import NamedTuple

from runtime.sampler import TokenLogprobs


class RequestOutput(NamedTuple):
    """A request's progress after one step: the new tokens and text, and the totals so far.

    `finish_reason` follows OpenAI: "stop", "length" or "abort"; None while running.
    `stop_reason` is the stop string or stop token id that ended it, if any.
    """

    request_id: str
    prompt_token_ids: list[int]
    new_token_ids: list[int]
    new_text: str
    token_ids: list[int]
    text: str
    new_logprobs: list[TokenLogprobs]
    finished: bool
    finish_reason: str | None
    stop_reason: int | str | None
    num_cached_tokens: int


class CompletionResult(NamedTuple):
    """The final result of one offline `LLM.generate` prompt."""

    request_id: str
    prompt: str | list[int]
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprobs]
