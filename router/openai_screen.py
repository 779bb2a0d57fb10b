"""What the OpenAI routes refuse before field validation: parameters they do not implement, unknown
parameters, lone surrogates and absurd nesting anywhere in the body.

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

MAX_DEPTH = 32
_SURROGATE = re.compile("[\ud800-\udfff]")


def unsupported(param: str, message: str | None = None) -> APIError:
    return APIError(
        400,
        message or f"{param} is not supported by this server",
        param=param,
        code="unsupported_parameter",
    )


def _path(parts: Iterable[str | int]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def check_text_and_depth(data: Any) -> None:
    """A 400 naming the first string (or key) with a lone surrogate, or a value nested too deeply.

    Lone surrogates cannot be encoded as UTF-8, so a tokenizer or a JSON response meeting one fails.
    Iterative, so any depth the JSON parser accepted is walked without recursion."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(data, ())]
    while stack:
        value, where = stack.pop()
        if len(where) > MAX_DEPTH:
            raise APIError(
                400, f"the request nests values deeper than {MAX_DEPTH} levels", param=_path(where[:1]) or None,
                code="invalid_value",
            )  # fmt: skip
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise APIError(
                    400,
                    f"{_path(where) or 'the body'} contains a lone surrogate, which is not valid Unicode text",
                    param=_path(where) or None,
                    code="invalid_value",
                )
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str) and _SURROGATE.search(key):
                    raise APIError(
                        400,
                        "a key contains a lone surrogate",
                        param=_path(where) or None,
                        code="invalid_value",
                    )
                stack.append((item, (*where, str(key))))
        elif isinstance(value, list):
            stack.extend((item, (*where, i)) for i, item in enumerate(value))


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
            raise unsupported(name, f"Unrecognized request argument supplied: {name}")
        if not harmless(value):
            raise unsupported(name)


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
