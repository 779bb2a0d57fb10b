"""Turning OpenAI prompts and conversations into token ids: off the event loop, within bounds.

Chat templates and tokenizers are CPU-bound and can hold the interpreter for seconds on hostile input,
so both run on a small dedicated thread pool (`prompt_workers`), never on the event loop and never on
the pool that serves catalog calls. Before any of that work, text that cannot fit the model's context
is refused by its length alone: no token covers more characters than the longest entry of the
vocabulary, times the most characters Unicode normalization folds into one (4, a canonical
decomposition's longest), so a prompt longer than `max_model_len` times that bound needs more tokens
than the context holds. A tokenizer whose normalizer deletes characters outright could fit more; such
tokenizers are rare and the refusal then errs towards safety.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi import Request
from transformers import PreTrainedTokenizerBase

from blockzoo.settings import Settings
from router.errors import APIError
from zoo.chat_template import ChatTemplateError, ChatTemplates, template_of
from zoo.template_sandbox import RenderLimits

T = TypeVar("T")
NORMALIZATION_FOLD = 4


def too_long(limit: int, what: str, param: str) -> APIError:
    return APIError(
        400,
        f"This model's maximum context length is {limit} tokens, but the {what} is longer than any "
        f"{limit}-token text can be.",
        param=param,
        code="context_length_exceeded",
    )


def template_error(exc: ChatTemplateError) -> APIError:
    code = "chat_template_error" if exc.kind == "raised" else "invalid_chat_template"
    message = exc.message[:1].upper() + exc.message[1:]
    return APIError(400, message, param="messages", code=code)


class PromptBuilder:
    """Renders chat templates and tokenizes prompts on its own bounded thread pool."""

    def __init__(self, settings: Settings) -> None:
        limit = settings.chat_template_max_chars
        self.templates = ChatTemplates(
            RenderLimits(
                timeout_s=settings.chat_template_timeout_s, max_output_chars=limit, max_value_chars=limit
            )
        )
        self._executor = ThreadPoolExecutor(
            max_workers=settings.prompt_workers, thread_name_prefix="bz-prompt"
        )
        self._token_chars: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, int] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        # One tenant may hold all but one of the workers, so a tenant sending template bombs (each up
        # to the render time limit) cannot queue every other tenant's prompts behind its own.
        self._per_tenant = max(1, settings.prompt_workers - 1)
        self._tenant_slots: dict[str, tuple[asyncio.Semaphore, int]] = {}

    async def _run(self, tenant: str, fn: Callable[..., T], *args: Any) -> T:
        slot, users = self._tenant_slots.get(tenant) or (asyncio.Semaphore(self._per_tenant), 0)
        self._tenant_slots[tenant] = (slot, users + 1)
        try:
            async with slot:
                return await asyncio.get_running_loop().run_in_executor(
                    self._executor, functools.partial(fn, *args)
                )
        finally:
            slot, users = self._tenant_slots[tenant]
            if users == 1:  # nobody else waits on it: the table holds only active tenants
                del self._tenant_slots[tenant]
            else:
                self._tenant_slots[tenant] = (slot, users - 1)

    def _max_chars(self, tokenizer: PreTrainedTokenizerBase, max_model_len: int) -> int:
        with self._lock:
            per_token = self._token_chars.get(tokenizer)
        if per_token is None:
            vocab = tokenizer.get_vocab()
            per_token = max((len(t) for t in vocab), default=1) * NORMALIZATION_FOLD
            with self._lock:
                self._token_chars[tokenizer] = per_token
        return max_model_len * per_token

    def _encode_texts(
        self, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_model_len: int
    ) -> list[list[int]]:
        limit = self._max_chars(tokenizer, max_model_len)
        for text in texts:
            if len(text) > limit:
                raise too_long(max_model_len, "prompt", "prompt")
        return [list(tokenizer.encode(text)) for text in texts]

    async def encode_prompts(
        self, tenant: str, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_model_len: int
    ) -> list[list[int]]:
        """Token ids of each completion prompt (special tokens added as the tokenizer does)."""
        return await self._run(tenant, self._encode_texts, tokenizer, texts, max_model_len)

    def _chat_ids(
        self, tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, Any]], max_model_len: int
    ) -> list[int]:
        limit = min(self._max_chars(tokenizer, max_model_len), self.templates.limits.max_output_chars)
        if sum(len(str(m.get("content") or "")) for m in messages) > limit:
            raise too_long(max_model_len, "conversation", "messages")
        try:
            text = self.templates.render(template_of(tokenizer), messages, tokenizer.special_tokens_map)
        except ChatTemplateError as exc:
            raise template_error(exc) from None
        if len(text) > self._max_chars(tokenizer, max_model_len):
            raise too_long(max_model_len, "conversation", "messages")
        return list(tokenizer.encode(text, add_special_tokens=False))

    async def chat_ids(
        self,
        tenant: str,
        tokenizer: PreTrainedTokenizerBase,
        messages: Sequence[Mapping[str, Any]],
        max_model_len: int,
    ) -> list[int]:
        """The conversation rendered through the tokenizer's chat template (bounded), then tokenized."""
        return await self._run(tenant, self._chat_ids, tokenizer, messages, max_model_len)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def get_prompts(request: Request) -> PromptBuilder:
    builder: PromptBuilder = request.app.state.prompts
    return builder
