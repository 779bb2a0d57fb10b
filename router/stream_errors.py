"""A server fault in the middle of a streamed response becomes an SSE error event, not a cut connection.

Once the first chunk is sent the status line is 200 and cannot change. OpenAI's streams (and the
official clients) then carry an error as a `data: {"error": {...}}` event, which the `openai`
client raises as an `APIError`. Only the engine's step failure is turned into one here: it is a
server bug, already logged with its traceback and the request ids by the engine thread, so the
client gets a generic message and nothing internal.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing

from router.errors import error_body
from runtime.engine import StepFailedError

log = logging.getLogger(__name__)


def error_event(message: str, type_: str, code: str) -> str:
    return "data: " + json.dumps(error_body(message, type_, code=code)) + "\n\n"


async def with_error_event(body: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
    """`body`, ending with an error event (then `[DONE]`) if the engine step serving it failed."""
    async with aclosing(body) as chunks:
        try:
            async for chunk in chunks:
                yield chunk
        except StepFailedError:
            log.warning("streamed request failed inside an engine step")
            yield (
                error_event("internal server error", "server_error", "internal_error") + "data: [DONE]\n\n"
            ).encode()
