"""One mapping from errors to HTTP answers, in A1111's error body `{error, detail, body, errors}`.

Typed errors (sdserver.errors.SdServerError) carry their status code and the field at fault. Anything else is
a bug: it answers 500 with the class name only and is logged with its traceback on the server. Request
validation keeps FastAPI's `{"detail": [{loc, msg, type}]}` shape, which clients parse.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from sdserver.errors import QueueFull, SdServerError

log = logging.getLogger(__name__)

_DEFAULT_RETRY_AFTER_S = 5


class SettingsFrozen(SdServerError):
    """POST /options while the server runs with --freeze-settings."""

    status_code = 403


class NotEnabled(SdServerError):
    """A route that exists only with a flag (server-stop without --api-server-stop)."""

    status_code = 404


def error_body(error: str, message: str, *, field: str | None = None) -> dict[str, Any]:
    """A1111's error shape; `field` added when a request field is at fault."""
    body: dict[str, Any] = {"error": error, "detail": message, "body": "", "errors": message}
    if field is not None:
        body["field"] = field
    return body


def typed_error_response(exc: SdServerError) -> JSONResponse:
    headers = {}
    if isinstance(exc, QueueFull):
        headers["Retry-After"] = str(getattr(exc, "retry_after", _DEFAULT_RETRY_AFTER_S))
    return JSONResponse(
        error_body(type(exc).__name__, exc.message, field=exc.field), status_code=exc.status_code, headers=headers
    )


def unexpected_error_response(exc: BaseException) -> JSONResponse:
    # The message of an unexpected error may carry internals (paths, values); the log has it, the client the class.
    return JSONResponse(
        error_body(type(exc).__name__, "Internal server error; the server log has the details."), status_code=500
    )


def validation_error_response(exc: RequestValidationError) -> JSONResponse:
    # Keep loc/msg/type only: pydantic's `input` would echo whole request bodies (base64 images) back.
    detail = [
        {"loc": list(err.get("loc", ())), "msg": str(err.get("msg", "")), "type": str(err.get("type", ""))}
        for err in exc.errors()
    ]
    return JSONResponse({"detail": detail}, status_code=422)


async def _typed_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, SdServerError)
    if exc.status_code >= 500:
        log.warning("%s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc.message)
    return typed_error_response(exc)


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return validation_error_response(exc)


def install_error_handlers(app: FastAPI) -> None:
    """Typed errors and validation errors; unexpected ones are caught by middleware.UnexpectedErrors."""
    app.add_exception_handler(SdServerError, _typed_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
