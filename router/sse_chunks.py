"""SSE framing of one streamed response: every chunk shares an envelope that is serialized once.

`id`, `object`, `created` and `model` never change within a response, so only the choice is
serialized per token. A batch of events (several steps' outputs that arrived together) becomes one
string, so that it reaches the socket in one write.
"""

from __future__ import annotations

import json
from typing import Any

_COMPACT = (",", ":")


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=_COMPACT)


class ChunkFramer:
    """Builds the `data: {...}\\n\\n` events of one streamed completion or chat completion."""

    def __init__(self, rid: str, created: int, model: str, obj: str, include_usage: bool) -> None:
        envelope = _dumps({"id": rid, "object": obj, "created": created, "model": model})
        self._prefix = "data: " + envelope[:-1] + ',"choices":['
        # With include_usage every chunk carries "usage": null, as OpenAI's do.
        self._suffix = "]" + (',"usage":null' if include_usage else "") + "}\n\n"
        self._usage_prefix = "data: " + envelope[:-1] + ',"choices":[],"usage":'

    def chunk(self, choice: dict[str, Any]) -> str:
        return self._prefix + _dumps(choice) + self._suffix

    def usage(self, usage: dict[str, Any]) -> str:
        return self._usage_prefix + _dumps(usage) + "}\n\n"

    @staticmethod
    def done() -> str:
        return "data: [DONE]\n\n"
