"""Graceful drain on SIGTERM: in-flight requests finish, new ones get 503, then the process exits.

uvicorn's own shutdown closes the listening socket at once (new clients get "connection refused"
rather than an answer) and cancels whatever is still running after `timeout_graceful_shutdown`.
Here the first SIGTERM or SIGINT only starts a drain instead:

- `DrainMiddleware` answers every new request with 503, `Retry-After` and `Connection: close`, so a
  client or load balancer retries elsewhere, while the socket stays open; the probes still answer
  (`/health` says "draining", `/ready` is 503);
- requests already running, streams included, go on, and their responses close their connection;
- once none is left, uvicorn shuts down as usual and the process exits with status 0;
- at `drain_timeout_s` what still runs is cut: its handler is cancelled (which aborts its engine
  request and settles its quota and usage), and its response ends cleanly: a stream with an SSE
  error event `shutting_down` and `[DONE]`, a response not yet started with the same 503.

A second signal during the drain stops at once, as uvicorn does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import time
from collections.abc import Callable
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

PROBES = frozenset({"/health", "/ready", "/metrics"})
# After the drain timeout, cut requests get this long to end their responses (uvicorn's graceful
# shutdown then cancels whatever still did not).
CANCEL_GRACE_S = 1
RETRY_AFTER_S = 5


class Drain:
    """The drain state one server shares with its middleware: in-flight requests and whether draining."""

    def __init__(self) -> None:
        self.draining = False
        self.expired = False
        self.in_flight = 0
        self.started_at: float | None = None
        self._cutters: dict[int, Callable[[], None]] = {}
        self._next = 0

    def begin(self) -> None:
        if not self.draining:
            self.draining = True
            self.started_at = time.monotonic()

    def track(self, cut: Callable[[], None]) -> int:
        """Register an in-flight request's way to cut it short; returns the handle for `untrack`."""
        self._next += 1
        self._cutters[self._next] = cut
        return self._next

    def untrack(self, handle: int) -> None:
        self._cutters.pop(handle, None)

    def expire(self) -> int:
        """The drain timeout: cut every request still in flight; returns how many."""
        self.expired = True
        cutters = list(self._cutters.values())
        for cut in cutters:
            cut()
        return len(cutters)


def _error(message: str) -> bytes:
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": "shutting_down"}}
    return json.dumps(body).encode()


_BODY = _error("the server is shutting down and takes no new requests; retry on another instance")
_CUT_EVENT = (
    b"data: "
    + _error("the server shut down before this response finished; retry on another instance")
    + b"\n\ndata: [DONE]\n\n"
)


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

        sent = _Sent()

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent.started = True
                headers = list(message.get("headers", []))
                sent.event_stream = any(
                    k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers
                )
                if drain.draining:
                    # A response that starts during the drain also ends its connection.
                    headers = [(k, v) for k, v in headers if k.lower() != b"connection"]
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                sent.finished = True
            await send(message)

        # The handler runs in a task of its own, so that the drain timeout can cancel it alone.
        handler = asyncio.ensure_future(self.app(scope, receive, send_closing))

        def cut() -> None:
            sent.cut = True
            handler.cancel()

        drain.in_flight += 1
        handle = drain.track(cut)
        try:
            await handler
        except asyncio.CancelledError:
            current = asyncio.current_task()
            # Only the drain's own cut is answered here; a cancellation of this request itself goes on.
            if not sent.cut or (current is not None and current.cancelling()):
                raise
            await _end_cut(send, sent)
        finally:
            drain.untrack(handle)
            drain.in_flight -= 1


class _Sent:
    """What a response has sent so far, and whether the drain cut it."""

    def __init__(self) -> None:
        self.started = False
        self.event_stream = False
        self.finished = False
        self.cut = False


async def _end_cut(send: Send, sent: _Sent) -> None:
    """End a response the drain timeout cut: the stream says why; one not begun gets the 503."""
    if sent.finished:
        return
    if not sent.started:
        await _refuse(send)
    elif sent.event_stream:
        await send({"type": "http.response.body", "body": _CUT_EVENT, "more_body": False})
    else:
        await send({"type": "http.response.body", "body": b"", "more_body": False})


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


class EarlySignals:
    """Remembers a SIGINT/SIGTERM that arrives while the server is still being built.

    Building the engine and the demo zoo takes seconds to minutes before uvicorn installs its own
    handlers. A signal in that window used to be lost: asyncio's runner turned it into a cancelled
    startup that uvicorn went on from, and the server then ran as if never asked to stop. Installed
    first thing, this handler records the signal and the server drains at once when it starts.
    """

    def __init__(self) -> None:
        self.received: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._record)

    def _record(self, sig: int, frame: FrameType | None) -> None:
        if self.received is None:
            print(f"{signal.Signals(sig).name}: stopping as soon as startup finishes", flush=True)
        self.received = sig


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with the first SIGTERM/SIGINT starting a drain of at most `timeout_s`."""

    def __init__(
        self, config: uvicorn.Config, drain: Drain, timeout_s: float, early: EarlySignals | None = None
    ) -> None:
        config.timeout_graceful_shutdown = CANCEL_GRACE_S
        super().__init__(config)
        self.drain = drain
        self.timeout_s = timeout_s
        self.early = early
        self._signal: str | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.early is not None and self.early.received is not None:
            self.handle_exit(self.early.received, None)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain.draining or self.should_exit:
            # A second signal: stop now, the way uvicorn does.
            super().handle_exit(sig, frame)
            return
        # Not recorded in `_captured_signals`: a finished drain is a clean exit, not death by signal.
        # Logged from on_tick: a signal handler runs inside whichever request's context was current.
        self._signal = signal.Signals(sig).name
        self.drain.begin()

    async def on_tick(self, counter: int) -> bool:
        drain = self.drain
        if drain.draining and not self.should_exit and drain.started_at is not None:
            if self._signal is not None:
                log.info(
                    "draining: new requests get 503",
                    extra={"signal": self._signal, "in_flight": drain.in_flight, "timeout_s": self.timeout_s},
                )
                self._signal = None
            elapsed = time.monotonic() - drain.started_at
            if drain.in_flight and elapsed >= self.timeout_s and not drain.expired:
                log.warning(
                    "drain timeout: ending what still runs",
                    extra={"in_flight": drain.expire(), "timeout_s": self.timeout_s},
                )
            if drain.in_flight == 0 or elapsed >= self.timeout_s + CANCEL_GRACE_S:
                self.should_exit = True
        return await super().on_tick(counter)
