"""Ending a served request, however it ends: the engine requests aborted and the tokens accounted once.

Why the cleanup cannot live in the SSE generator's `finally`: Starlette's StreamingResponse (under an
ASGI spec before 2.4, as uvicorn's HTTP servers announce) runs `stream_response` and
`listen_for_disconnect` in one anyio task group. When the client goes away, `listen_for_disconnect`
cancels that group's scope, and every await in code that unwinds inside it is cancelled again at
once. An abort that awaited the engine thread was therefore cancelled itself: `asyncio.wrap_future`
passed the cancellation on to the command's future, and the engine thread skipped the cancelled
command, so the request ran on to `max_tokens` (the stream's own second abort was then a no-op, as
it was marked aborted already). If the cancellation landed in `send` instead, the generator stayed
suspended at its `yield` until the garbage collector finalized it. And the accounting awaited in
that `finally` was cut off after the (shielded) lease release, so usage and metrics were never
written.

So aborting is synchronous (queued for the engine thread, nothing awaited), the response itself does
the cleanup after the body ends however it ends, and accounting runs shielded (`Admission.finish`).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

import anyio
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope, Send

from router.admission import Admission
from router.generation import ChoiceResult, Generation

# nginx's "client closed request": logged nowhere as an error, and the client never sees it.
CLIENT_CLOSED_REQUEST = 499


class GenerationStream(StreamingResponse):
    """The SSE response of a generation. After the body ends (completed, client gone, error, or
    never started), it aborts the choices still running and accounts for the request, exactly once."""

    def __init__(self, body: AsyncGenerator[bytes, None], gen: Generation, admission: Admission) -> None:
        super().__init__(body, media_type="text/event-stream", headers=admission.headers)
        self._body = body
        self._gen = gen
        self._admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        disconnected = False

        async def noting_receive() -> Message:
            nonlocal disconnected
            message = await receive()
            disconnected = disconnected or message["type"] == "http.disconnect"
            return message

        try:
            await super().__call__(scope, noting_receive, send)
        except ClientDisconnect:
            # ASGI 2.4 servers report a gone client as a failed send rather than a disconnect.
            disconnected = True
        finally:
            gen = self._gen
            gen.client_gone = disconnected and any(r.finish_reason is None for r in gen.results)
            gen.abort()
            with anyio.CancelScope(shield=True):
                # A generator left suspended at a `yield` (cancelled while sending) ends here, not
                # whenever the garbage collector finds it.
                await self._body.aclose()
            await self._admission.finish(gen)


async def collect(gen: Generation, request: Request, admission: Admission) -> list[ChoiceResult] | None:
    """Run a non-streaming generation to its end and account for it; None if the client went away
    (its choices were aborted and it is charged for what they generated)."""
    try:
        if not await gen.collect(request):
            return None
        return gen.results
    finally:
        gen.abort()
        await admission.finish(gen)


def client_gone() -> Response:
    """What to return for a client that is no longer there to read it."""
    return Response(status_code=CLIENT_CLOSED_REQUEST)
