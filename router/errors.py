"""Errors in the OpenAI shape, `{"error": {"message", "type", "param", "code"}}`, for every route.

Domain errors map to 4xx with their own message. Anything unexpected becomes a 500 with a
generic message: the traceback goes to the log, never to the client.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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


def from_domain(exc: Exception) -> APIError:
    """The API error for a domain exception (the caller's fault), or a 500 for anything else."""
    if isinstance(exc, APIError):
        return exc
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
        return JSONResponse(error_body(str(detail), "invalid_request_error", code=str(status)), status)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        err = from_domain(exc)
        if err.status >= 500:
            log.exception("unhandled error", extra={"path": request.url.path})
        return _response(err)

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(BlockZooError, api_error)
    app.add_exception_handler(TenantError, api_error)
    app.add_exception_handler(SamplingParamsError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
