"""Request identity: the server names every request itself; a client's `X-Request-Id` is a label.

Engine request ids derive from the server's id, which is fresh for each HTTP request, so no client can
name (and so replace or abort) another request, whoever sends it. The client's label, when it is safe
to echo and log, is echoed back in `X-Request-Id` and logged next to the server's id; without one, the
server's id is echoed.
"""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from blockzoo.logging_setup import request_log_context

_SAFE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


def client_label(scope: Scope) -> str | None:
    """The client's `X-Request-Id` if it is safe to echo and log, else None."""
    sent = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
    return sent if _SAFE.match(sent) else None


class RequestIdMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware) so streaming responses pass through untouched.

    Sets `request.state.request_id` (the server's id) and `request.state.client_request_id` (the
    client's label or None), and puts both into every log record of the request.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        label = client_label(scope)
        request_id = new_request_id()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["client_request_id"] = label
        echoed = (label or request_id).encode("latin-1")

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", echoed))
                message["headers"] = headers
            await send(message)

        with request_log_context(request_id, label):
            await self.app(scope, receive, send_with_id)
