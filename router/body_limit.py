"""A size limit on request bodies, enforced on the stream as it arrives (pure ASGI, so responses stream).

A declared Content-Length over the limit is answered 413 before a byte is read; without one (chunked
bodies) bytes are counted as they arrive and the request stops at the first chunk past the limit.
Multipart bodies are model uploads: router/uploads.py streams them to disk under its own, larger
limits, so here they get `multipart_bytes` instead.
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    """Raised from `receive` once the body passes the limit. An HTTPException, so FastAPI's body parsing
    lets it through (anything else becomes its generic 400) and the response below is the one sent."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is larger than the limit of {limit} bytes.")


def _error(limit: int) -> bytes:
    message = f"The request body is larger than the limit of {limit} bytes."
    return json.dumps(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": "request_too_large",
            }
        }
    ).encode()


class BodyLimitMiddleware:
    """413 (OpenAI error shape) for a body over `max_bytes`, or over `multipart_bytes` for multipart ones."""

    def __init__(self, app: ASGIApp, max_bytes: int, multipart_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.multipart_bytes = multipart_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        limit = self.multipart_bytes if content_type == b"multipart/form-data" else self.max_bytes
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await self._send_413(send, limit)
            return

        received = 0
        answered = False
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received, answered
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if not response_started and not answered:
                        answered = True
                        await self._send_413(send, limit)
                    raise BodyTooLarge(limit)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if answered:
                return  # the 413 went out already; whatever the app answers to BodyTooLarge is dropped
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            if not answered and not response_started:
                await self._send_413(send, limit)

    @staticmethod
    async def _send_413(send: Send, limit: int) -> None:
        body = _error(limit)
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
