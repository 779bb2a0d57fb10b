"""Graceful drain on SIGTERM: in-flight requests finish, new ones get 503, then the process exits.

uvicorn's own shutdown closes the listening socket at once (new clients get "connection refused"
rather than an answer) and cancels whatever is still running after `timeout_graceful_shutdown`.
Here the first SIGTERM or SIGINT only starts a drain instead:

- `DrainMiddleware` answers every new request with 503, `Retry-After` and `Connection: close`, so a
  client or load balancer retries elsewhere, while the socket stays open; the probes still answer
  (`/health` says "draining", `/ready` is 503);
- requests already running, streams included, go on, and their responses close their connection;
- once none is left, or after `drain_timeout_s`, `DrainingServer` lets uvicorn shut down as usual
  (what still runs then is cancelled after a short grace), and the process exits with status 0.

A second signal during the drain stops at once, as uvicorn does.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

PROBES = frozenset({"/health", "/ready", "/metrics"})
# After the drain, what is left is cancelled after this much more (uvicorn's graceful shutdown).
CANCEL_GRACE_S = 1
RETRY_AFTER_S = 5


class Drain:
    """The drain state one server shares with its middleware: in-flight requests and whether draining."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self.started_at: float | None = None

    def begin(self) -> None:
        if not self.draining:
            self.draining = True
            self.started_at = time.monotonic()


_BODY = json.dumps(
    {
        "error": {
            "message": "the server is shutting down and takes no new requests; retry on another instance",
            "type": "server_error",
            "param": None,
            "code": "shutting_down",
        }
    }
).encode()


class DrainMiddleware:
    """Counts in-flight HTTP requests; while draining, refuses new ones with 503 (probes excepted)."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in PROBES:
            await self.app(scope, receive, send)
            return
        drain = self.drain
        if drain.draining:
            await _refuse(send)
            return

        async def send_closing(message: Message) -> None:
            # A response that starts during the drain also ends its connection.
            if message["type"] == "http.response.start" and drain.draining:
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        drain.in_flight += 1
        try:
            await self.app(scope, receive, send_closing)
        finally:
            drain.in_flight -= 1


async def _refuse(send: Send) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(_BODY)).encode()),
                (b"retry-after", str(RETRY_AFTER_S).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": _BODY})


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with the first SIGTERM/SIGINT starting a drain of at most `timeout_s`."""

    def __init__(self, config: uvicorn.Config, drain: Drain, timeout_s: float) -> None:
        config.timeout_graceful_shutdown = CANCEL_GRACE_S
        super().__init__(config)
        self.drain = drain
        self.timeout_s = timeout_s

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain.draining or self.should_exit:
            # A second signal: stop now, the way uvicorn does.
            super().handle_exit(sig, frame)
            return
        log.info(
            "draining: new requests get 503",
            extra={"signal": signal.Signals(sig).name, "in_flight": self.drain.in_flight,
                   "timeout_s": self.timeout_s},
        )  # fmt: skip
        # Not recorded in `_captured_signals`: a finished drain is a clean exit, not death by signal.
        self.drain.begin()

    async def on_tick(self, counter: int) -> bool:
        drain = self.drain
        if drain.draining and not self.should_exit and drain.started_at is not None:
            elapsed = time.monotonic() - drain.started_at
            if drain.in_flight == 0 or elapsed >= self.timeout_s:
                if drain.in_flight:
                    log.warning(
                        "drain timeout: cancelling what still runs",
                        extra={"in_flight": drain.in_flight, "timeout_s": self.timeout_s},
                    )
                self.should_exit = True
        return await super().on_tick(counter)
