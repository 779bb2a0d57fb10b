"""Structured logging: key=value text for people, JSON lines for machines (BLOCKZOO_LOG_JSON).

Every record logged while a request is served carries that request's ids: the router's middleware
sets them in a context variable (`request_log_context`), which asyncio tasks and worker threads
started by the request inherit, and `RequestContextFilter` on the handler copies them onto each
record. Code therefore never has to pass the ids along by hand.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, NamedTuple

# Attributes every LogRecord has; anything else was passed through `extra=` and is a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class RequestIds(NamedTuple):
    """The ids of the request being served: the server's own, and the client's label if it sent one."""

    request_id: str
    client_request_id: str | None


_current_request: ContextVar[RequestIds | None] = ContextVar("blockzoo_request", default=None)


@contextmanager
def request_log_context(request_id: str, client_request_id: str | None) -> Iterator[None]:
    """Within this block (and the tasks and threads it starts), log records carry these ids."""
    token = _current_request.set(RequestIds(request_id, client_request_id))
    try:
        yield
    finally:
        _current_request.reset(token)


class RequestContextFilter(logging.Filter):
    """Adds `request_id` (and `client_request_id`, when the client sent one) to records logged
    while a request is served; ids a caller passed with `extra=` win."""

    def filter(self, record: logging.LogRecord) -> bool:
        ids = _current_request.get()
        if ids is not None:
            if not hasattr(record, "request_id"):
                record.request_id = ids.request_id
            if ids.client_request_id is not None and not hasattr(record, "client_request_id"):
                record.client_request_id = ids.client_request_id
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, plus the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


class KeyValueFormatter(logging.Formatter):
    """`time level logger: message key=value ...`, readable and still greppable."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = f"{stamp} {record.levelname.lower():7s} {record.name}: {record.getMessage()}"
        if extra:
            line = f"{line} {extra}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


def configure_logging(level: str = "INFO", json_lines: bool = False) -> None:
    """Send logs to stderr (stdout stays clean for command output such as `blockzoo generate`)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else KeyValueFormatter())
    # On the handler, not a logger: a logger's filters skip records propagated from its children.
    handler.addFilter(RequestContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Alembic announces its dialect on every catalog open; that is noise at INFO.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, root.level))
