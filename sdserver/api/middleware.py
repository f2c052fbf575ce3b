"""Pure-ASGI middleware: auth, body-size limit, process time, request log, and the last-resort error catch.

Order, outermost first (see `install_middleware`): request log, X-Process-Time, CORS, GZip, auth, body limit,
unexpected errors. CORS sits outside auth so a browser's preflight (which never carries credentials) is answered.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from http.cookies import SimpleCookie
from typing import Any, Awaitable, Callable, MutableMapping

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.gzip import GZipMiddleware

from sdserver.api.auth import OPEN_PATHS, TOKEN_COOKIE, Authenticator, AuthResult
from sdserver.api.errors import error_body, unexpected_error_response
from sdserver.settings import Settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger(__name__)
api_log = logging.getLogger("sdserver.api")

GZIP_MINIMUM_BYTES = 1000  # as A1111


def route_path(scope: Scope) -> str:
    """The path as routes see it: without the --subpath root when the proxy did not strip it."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def _send_json(send: Send, status: int, body: Any, headers: list[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps(body).encode("utf-8")
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class BasicAuthMiddleware:
    """401 with WWW-Authenticate on every route but OPEN_PATHS when credentials are configured."""

    def __init__(self, app: ASGIApp, authenticator: Authenticator) -> None:
        self.app = app
        self.authenticator = authenticator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.authenticator.enabled or route_path(scope) in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        token = None
        cookie_header = _header(scope, b"cookie")
        if cookie_header:
            cookie = SimpleCookie()
            try:
                cookie.load(cookie_header)
            except Exception:  # a malformed cookie header is simply no token
                cookie = SimpleCookie()
            if TOKEN_COOKIE in cookie:
                token = cookie[TOKEN_COOKIE].value
        result = self.authenticator.check(_header(scope, b"authorization"), token)
        if result is AuthResult.OK:
            await self.app(scope, receive, send)
            return
        await _send_json(
            send,
            401,
            error_body("HTTPException", result.value),
            [(b"www-authenticate", b'Basic realm="sdserver"')],
        )


class _BodyTooLarge(HTTPException):
    """Raised from `receive`; an HTTPException so FastAPI's body reader lets it through as a 413."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, _too_large_message(max_bytes))


def _too_large_message(max_bytes: int) -> str:
    return f"Request body larger than {max_bytes} bytes (the limit is --max-body-bytes)."


class BodyLimitMiddleware:
    """413 for request bodies over the limit, by Content-Length or by counting a chunked body."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        await _send_json(send, 413, error_body("RequestTooLarge", _too_large_message(self.max_bytes)))


class UnexpectedErrors:
    """Turns an exception no handler claimed into a 500 with the class name; the traceback goes to the log."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            log.exception("unhandled error in %s %s", scope.get("method"), route_path(scope))
            if not started:
                response = unexpected_error_response(exc)
                await response(scope, receive, send)


class ProcessTimeMiddleware:
    """`X-Process-Time: <seconds>` on every response, as A1111."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                elapsed = f"{time.perf_counter() - started:.4f}".encode()
                message["headers"] = [*message.get("headers", []), (b"x-process-time", elapsed)]
            await send(message)

        await self.app(scope, receive, timed_send)


def api_log_line(scope: Scope, status: int, seconds: float, now: datetime.datetime) -> str:
    """A1111's --api-log line. Path only: no query string, body, image or header can leak into it."""
    client = scope.get("client") or ("-", 0)
    return (
        f"API {now} {status} {scope.get('scheme', 'http')}/{scope.get('http_version', '1.1')} "
        f"{scope.get('method', '-')} {route_path(scope)} {client[0]} {seconds:.4f}"
    )


class ApiLogMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def status_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, status_send)
        finally:
            api_log.info(api_log_line(scope, status, time.perf_counter() - started, datetime.datetime.now()))


def install_middleware(app: FastAPI, settings: Settings, authenticator: Authenticator) -> None:
    # add_middleware wraps: the last added is the outermost.
    app.add_middleware(UnexpectedErrors)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.limits.max_body_bytes)
    app.add_middleware(BasicAuthMiddleware, authenticator=authenticator)
    app.add_middleware(GZipMiddleware, minimum_size=GZIP_MINIMUM_BYTES)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(settings.cors_allow_origins),
        allow_origin_regex=settings.cors_allow_origins_regex,
        allow_methods=["*"],
        allow_headers=["*"],
        allow_credentials=True,
    )
    app.add_middleware(ProcessTimeMiddleware)
    if settings.api_log:
        app.add_middleware(ApiLogMiddleware)
