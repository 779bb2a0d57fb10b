"""What the OpenAI routes refuse before field validation: parameters they do not implement, unknown
parameters, and lone surrogates in the text they use.

Unknown parameters are refused, as OpenAI's own API does ("Unrecognized request argument supplied"):
a client that sends a parameter expects it to change something, and a silent 200 that ignored it is
worse than a 400. The few OpenAI parameters that never change the output (`user`, `store`,
`metadata`, `service_tier`, …) are accepted and ignored. Parameters that change the output but are
not implemented here (tools, response formats, logit bias, best_of, audio, …) are refused unless they
hold their no-op value (`tools: []`, `tool_choice: "none"`, `response_format: {"type": "text"}`, …).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from router.errors import APIError

# Accepted and ignored: they never change what is generated.
IGNORED = frozenset({"store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier"})


def _absent(value: Any) -> bool:
    return value is None


def _empty(value: Any) -> bool:
    return value is None or value == [] or value == {}


def _one(value: Any) -> bool:
    return value is None or value == 1


# name -> the values that mean "not used", for parameters that change the output and are not implemented.
_COMMON: dict[str, Callable[[Any], bool]] = {"logit_bias": _empty, "best_of": _one}
CHAT_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    **_COMMON,
    "response_format": lambda v: v is None or v == {"type": "text"},
    "tools": _empty,
    "tool_choice": lambda v: v is None or v == "none",
    "functions": _empty,
    "function_call": lambda v: v is None or v == "none",
    "parallel_tool_calls": _absent,
    "audio": _absent,
    "modalities": lambda v: v is None or v == ["text"],
    "prediction": _absent,
    "reasoning_effort": _absent,
    "verbosity": _absent,
    "web_search_options": _absent,
}
COMPLETION_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    **_COMMON,
    "suffix": lambda v: v is None or v == "",
}
# Message fields the prompt would silently drop.
MESSAGE_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "tool_calls": _empty,
    "function_call": _absent,
    "tool_call_id": _absent,
    "audio": _absent,
}

_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_CHAT_ITEMS = 4096


def unsupported(param: str, message: str | None = None) -> APIError:
    return APIError(
        400,
        message or f"{param} is not supported by this server",
        param=param,
        code="unsupported_parameter",
    )


def _lone_surrogate(texts: list[Any]) -> int | None:
    """Index of the first string with a lone surrogate, or None. One join and one regex scan (C speed)
    in the common case; the per-item search only runs once a surrogate is known to be there."""
    strings = [t for t in texts if type(t) is str]
    if not _SURROGATE.search("".join(strings)):
        return None
    return next(i for i, t in enumerate(texts) if type(t) is str and _SURROGATE.search(t))


def _surrogate_error(param: str) -> APIError:
    return APIError(
        400,
        f"{param} contains a lone surrogate, which is not valid Unicode text",
        param=param,
        code="invalid_value",
    )


def check_text(data: dict[str, Any]) -> None:
    """A 400 naming the first string field that holds a lone surrogate.

    Lone surrogates cannot be encoded as UTF-8, so a tokenizer, a chat template or a JSON response
    meeting one fails. Only the fields that are used or echoed are scanned (ignored extras such as
    `metadata` never are), and never item by item in Python: a 4 MiB list of token ids costs nothing."""
    for name in ("model", "user", "suffix"):
        if type(data.get(name)) is str and _SURROGATE.search(data[name]):
            raise _surrogate_error(name)
    for name in ("prompt", "stop"):
        value = data.get(name)
        if type(value) is str:
            if _SURROGATE.search(value):
                raise _surrogate_error(name)
        elif type(value) is list and value and type(value[0]) is str:
            index = _lone_surrogate(value)
            if index is not None:
                raise _surrogate_error(f"{name}[{index}]")
    messages = data.get("messages")
    if type(messages) is not list:
        return
    texts = [text for message in messages for _, text in _message_texts(message)]
    if _lone_surrogate(texts) is None:
        return
    for i, message in enumerate(messages):
        for where, text in _message_texts(message):
            if _SURROGATE.search(text):
                raise _surrogate_error(f"messages[{i}].{where}")


def _message_texts(message: Any) -> list[tuple[str, str]]:
    """(where, text) for every string of one message that reaches the prompt."""
    if type(message) is not dict:
        return []
    out = [(key, message[key]) for key in ("role", "name", "content") if type(message.get(key)) is str]
    if type(message.get("content")) is list:
        out.extend(
            (f"content[{j}].text", part["text"])
            for j, part in enumerate(message["content"])
            if type(part) is dict and type(part.get("text")) is str
        )
    return out


def _printable(name: str) -> str:
    # A key is echoed in the error; one with a lone surrogate could not be encoded in the response.
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


def check_parameters(
    data: dict[str, Any], known: Iterable[str], unsupported_params: dict[str, Callable[[Any], bool]]
) -> None:
    """A 400 `unsupported_parameter` for a parameter that is not implemented (unless it holds its no-op
    value) or not known at all."""
    known_set = set(known)
    for name, value in data.items():
        if name in known_set or name in IGNORED:
            continue
        harmless = unsupported_params.get(name)
        if harmless is None:
            shown = _printable(name)
            raise unsupported(shown, f"Unrecognized request argument supplied: {shown}")
        if not harmless(value):
            raise unsupported(name)


def check_message_count(messages: Any) -> None:
    """A conversation has at most MAX_CHAT_ITEMS messages and content parts together: every one of them
    costs validation time on the event loop before any limit further down could apply."""
    if type(messages) is not list:
        return
    items = len(messages) + sum(
        len(m["content"]) for m in messages if type(m) is dict and type(m.get("content")) is list
    )
    if items > MAX_CHAT_ITEMS:
        raise APIError(
            400,
            f"messages holds {items} messages and content parts; at most {MAX_CHAT_ITEMS} are accepted",
            param="messages",
            code="invalid_value",
        )


def check_messages(messages: Any) -> None:
    """Message fields the prompt would drop (tool calls and their ids, audio) are refused."""
    if not isinstance(messages, list):
        return
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            continue
        for name, harmless in MESSAGE_UNSUPPORTED.items():
            if name in message and not harmless(message[name]):
                raise unsupported(f"messages[{i}].{name}")
