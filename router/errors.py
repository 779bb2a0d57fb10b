"""Errors in the OpenAI shape, `{"error": {"message", "type", "param", "code"}}`, for every route.

Domain errors map to 4xx with their own message. Anything unexpected becomes a 500 with a
generic message: the traceback goes to the log, never to the client.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime.engine import StepFailedError
from runtime.errors import BlockZooError, ModelLoadError, RequestError
from runtime.sampling_params import SamplingParamsError
from zoo.catalog.tenants import TenantError, TenantExists, TenantHasModels, TenantNotFound
from zoo.errors import DuplicateNameError, NotFoundError

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error the API reports as is."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, object]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _response(err: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(err.message, err.type, err.param, err.code), err.status, headers=err.headers
    )


# How long a client is told to wait before retrying while the catalog database is unreachable.
DATABASE_RETRY_AFTER_S = 5


def is_database_unavailable(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) says the catalog database could not be reached or was lost
    mid-query, rather than that a query was wrong."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, sa_exc.DBAPIError) and seen.connection_invalidated:
            return True
        if isinstance(seen, sa_exc.OperationalError | sa_exc.InterfaceError | sa_exc.TimeoutError):
            return True
        seen = seen.__cause__
    return False


def database_unavailable() -> APIError:
    return APIError(
        503,
        "the catalog database is unavailable, so this request cannot be served now; inference on models"
        " already in use goes on, and changes are refused until the database is back. Try again later.",
        "server_error",
        code="database_unavailable",
        headers={"retry-after": str(DATABASE_RETRY_AFTER_S)},
    )


def from_domain(exc: Exception) -> APIError:
    """The API error for a domain exception (the caller's fault), a 503 when the catalog database is
    unreachable, or a 500 for anything else."""
    if isinstance(exc, APIError):
        return exc
    if is_database_unavailable(exc):
        return database_unavailable()
    if isinstance(exc, NotFoundError | TenantNotFound):
        return APIError(404, str(exc), code="not_found")
    if isinstance(exc, DuplicateNameError | TenantExists | TenantHasModels):
        return APIError(409, str(exc), code="conflict")
    if isinstance(exc, SamplingParamsError):
        return APIError(400, str(exc), param=exc.param, code="invalid_value")
    if isinstance(exc, RequestError):
        return APIError(400, str(exc), code="invalid_request")
    if isinstance(exc, ModelLoadError | BlockZooError | TenantError):
        return APIError(400, str(exc), code="invalid_input")
    return APIError(500, "internal server error", type_="server_error", code="internal_error")


# Starlette's own refusals (a body that is not JSON, an unknown route) get a word, not a number.
_HTTP_CODES = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        return _response(from_domain(exc))

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        errors = exc.errors() if isinstance(exc, RequestValidationError) else []
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        message = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: {e.get('msg')}" for e in errors[:5]
        )
        return JSONResponse(
            error_body(
                message or "invalid request", "invalid_request_error", ".".join(loc) or None, "invalid_body"
            ),
            422,
        )

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        status = exc.status_code if isinstance(exc, StarletteHTTPException) else 500
        detail = exc.detail if isinstance(exc, StarletteHTTPException) else "error"
        code = _HTTP_CODES.get(status, str(status))
        return JSONResponse(error_body(str(detail), "invalid_request_error", code=code), status)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        err = from_domain(exc)
        if err.status >= 500:
            log.exception("unhandled error", extra={"path": request.url.path})
        return _response(err)

    async def database_error(request: Request, exc: Exception) -> JSONResponse:
        # Handled here rather than by the catch-all, which Starlette re-raises into the server's log.
        err = from_domain(exc)
        if err.code == "database_unavailable":
            # An outage, not a bug: one line per refused request, without the traceback.
            log.warning(
                "catalog database unavailable", extra={"path": request.url.path, "error": type(exc).__name__}
            )
        elif err.status >= 500:
            log.exception("unhandled error", extra={"path": request.url.path})
        return _response(err)

    async def step_failed(request: Request, _: Exception) -> JSONResponse:
        # A server bug inside an engine step; the engine thread logged its traceback with the
        # request ids. Answered here rather than by the catch-all, which Starlette re-raises into
        # uvicorn, which then drops the connection (a reset instead of this 500, now and then).
        log.error("request failed inside an engine step", extra={"path": request.url.path})
        return _response(APIError(500, "internal server error", type_="server_error", code="internal_error"))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StepFailedError, step_failed)
    app.add_exception_handler(sa_exc.SQLAlchemyError, database_error)
    app.add_exception_handler(BlockZooError, api_error)
    app.add_exception_handler(TenantError, api_error)
    app.add_exception_handler(SamplingParamsError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
