"""Request bodies of the OpenAI-compatible routes, validated strictly so bad input is a clear 4xx.

Every number has a range and every float must be finite (JSON bodies may carry `NaN` and `Infinity`,
which Python's parser accepts). Before field validation, `router/openai_screen.py` refuses unknown and
unimplemented parameters and lone surrogates with a 400 naming the parameter; it raises
`APIError`, which pydantic lets through unchanged (it wraps only ValueError and AssertionError).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from router.errors import APIError
from router.openai_screen import (
    CHAT_UNSUPPORTED,
    COMPLETION_UNSUPPORTED,
    check_message_count,
    check_messages,
    check_parameters,
    check_text,
)

TOKEN_ID_MAX = 2**31 - 1
COUNT_MAX = 1 << 20
MAX_STOP_CHARS = 4096
TokenId = Annotated[int, Field(ge=0, le=TOKEN_ID_MAX)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by completions and chat; vLLM's extras (top_k, min_p, …) included.

    Extras are ignored only after `_screen` has refused every extra that is not harmless."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)
    user: str | None = Field(default=None, max_length=1024)
    # vLLM extensions.
    top_k: int | None = Field(default=None, ge=-1, le=COUNT_MAX)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    repetition_penalty: float | None = Field(default=None, ge=0.01, le=10.0, allow_inf_nan=False)
    min_tokens: int | None = Field(default=None, ge=0, le=COUNT_MAX)
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = Field(default=None, max_length=256)

    @model_validator(mode="before")
    @classmethod
    def _screen(cls, data: Any) -> Any:
        if isinstance(data, dict):
            chat = "messages" in cls.model_fields
            if chat:
                check_message_count(data.get("messages"))
            check_text(data)
            check_parameters(data, cls.model_fields, CHAT_UNSUPPORTED if chat else COMPLETION_UNSUPPORTED)
            if chat:
                check_messages(data.get("messages"))
        return data

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4 or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop takes at most 4 non-empty strings of at most {MAX_STOP_CHARS} characters")
        return value

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


def _prompt_kind(value: Any) -> str:
    if isinstance(value, str):
        return "text"
    first = value[0] if isinstance(value, list) and value else None
    return "texts" if isinstance(first, str) else "batches" if isinstance(first, list) else "ids"


# The first item picks the one member that is validated: pydantic's smart union would try them all,
# and validating a 4 MiB list of token ids against every member held the event loop for 0.6 s.
PromptType = Annotated[
    Annotated[str, Tag("text")]
    | Annotated[list[str], Tag("texts")]
    | Annotated[list[TokenId], Tag("ids")]
    | Annotated[list[list[TokenId]], Tag("batches")],
    Discriminator(_prompt_kind),
]


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: PromptType
    max_tokens: int | None = Field(default=16, ge=1, le=COUNT_MAX)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be empty")
        if isinstance(value, list) and value and isinstance(value[0], list) and any(not p for p in value):
            raise ValueError("prompt token lists must not be empty")
        return value


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message of a conversation.

    Other message fields are ignored: clients echo back what earlier responses held (`refusal`,
    `annotations`, …), which changes nothing here. The fields whose loss would change the prompt
    (`tool_calls`, `tool_call_id`, `function_call`, `audio`) are refused first by `check_messages`."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, max_length=256)

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=COUNT_MAX)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=COUNT_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(
                400, "top_logprobs requires logprobs to be true", param="top_logprobs", code="invalid_value"
            )
        return self
