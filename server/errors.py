"""One error shape for every failure: `{"error": {"code", "message"}}`, never a stack trace."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from .requestlog import REQUEST_ID

logger = logging.getLogger(__name__)


class StartupError(Exception):
    """The service cannot start or keep running: bad settings, or the model does not exist or did not load."""


HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    503: "unavailable",
    504: "timeout",
}


class ApiError(Exception):
    """An error the client caused or can retry; `status` is the HTTP status."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.code, self.message, self.headers)


def model_error() -> ApiError:
    """500: the model raised on this request (logged where it did); other requests are unharmed."""
    return ApiError(500, "model_error", "the model failed on this request; see the server log")


def client_gone() -> ApiError:
    """499: the client disconnected before its answer (sent into the void; the metrics and the log count it)."""
    return ApiError(499, "client_closed_request", "the client disconnected")


def invalid(field: str, message: str) -> ApiError:
    """A 422 naming the offending field."""
    return ApiError(422, "invalid_request", f"{field}: {message}")


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _field(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def _msg(error: Any) -> str:
    return str(error.get("msg", "invalid")).removeprefix("Value error, ")


def validation_message(errors: Sequence[Any]) -> str:
    """`field: problem; field: problem` from pydantic errors."""
    return "; ".join(f"{_field(e.get('loc', ()))}: {_msg(e)}" for e in errors[:10])


def from_validation(exc: ValidationError) -> ApiError:
    return ApiError(422, "invalid_request", validation_message(exc.errors(include_url=False)))


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    code, message = HTTP_CODES.get(exc.status_code, "error"), str(exc.detail)
    path = request.url.path
    if exc.status_code == 404 and path.endswith("/") and path.rstrip("/") in request.app.state.paths:
        message = f"{message}: the path is {path.rstrip('/')}, without the trailing slash"
    if exc.status_code == 405 and exc.headers and "Allow" in exc.headers:
        message = f"{message}: {path} takes {exc.headers['Allow']}"
    return error_response(exc.status_code, code, message, getattr(exc, "headers", None))


async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(422, "invalid_request", validation_message(exc.errors()))


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    # answered outside the middleware, so the request ID header is added here
    return error_response(500, "internal_error", "internal server error", {"X-Request-ID": REQUEST_ID.get()})


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(Exception, _unhandled)
