"""Shaping engine outputs into OpenAI's JSON: params in, choices, logprobs, usage and SSE chunks out."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from router.openai_schemas import ChatCompletionRequest, CompletionRequest
from runtime.sampler import TokenLogprobs
from runtime.sampling_params import SamplingParams


def sampling_params(
    req: CompletionRequest | ChatCompletionRequest,
    max_tokens: int,
    logprobs: int | None,
    choice: int,
) -> SamplingParams:
    """OpenAI defaults (temperature 1); each of n choices gets its own seed so they differ yet reproduce."""
    return SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        min_p=req.min_p or 0.0,
        seed=None if req.seed is None else req.seed + choice,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0,
        max_tokens=max_tokens,
        min_tokens=min(req.min_tokens or 0, max_tokens),
        ignore_eos=req.ignore_eos,
        stop=tuple(req.stop_list),
        stop_token_ids=tuple(req.stop_token_ids or ()),
        logprobs=logprobs,
    )


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The conversation as plain dicts for the chat template (zoo/chat_template.py renders it)."""
    messages: list[dict[str, Any]] = []
    for m in req.messages:
        message: dict[str, Any] = {"role": m.role, "content": m.text}
        if m.name is not None:
            message["name"] = m.name
        messages.append(message)
    return messages


def _token_text(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    return str(tokenizer.decode([token_id]))


def completion_logprobs(
    tokenizer: PreTrainedTokenizerBase, items: list[TokenLogprobs], text_offset: int
) -> dict[str, Any]:
    """The legacy completions format: parallel lists plus one {token: logprob} dict per position."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    offset = text_offset
    for lp in items:
        text = _token_text(tokenizer, lp.token_id)
        tokens.append(text)
        token_logprobs.append(lp.logprob)
        top.append({_token_text(tokenizer, t): v for t, v in lp.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(tokenizer: PreTrainedTokenizerBase, items: list[TokenLogprobs]) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = _token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
            for lp in items
        ]
    }


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
