"""HTTP Basic auth for every route (--api-auth / --api-auth-file), and A1111's /login and /login_check.

Credentials are compared in constant time, user and password both, against every configured pair, so the
answer's timing says nothing about which part was wrong. A successful POST /login also sets an
`access-token` cookie (as A1111's Gradio login does), which the middleware accepts in place of Basic auth.
"""

from __future__ import annotations

import base64
import binascii
import collections
import enum
import secrets
import threading
from typing import Sequence
from urllib.parse import parse_qs

from sdserver.settings import Credential

OPEN_PATHS = frozenset({"/sdserver/v1/health", "/login"})
TOKEN_COOKIE = "access-token"
_MAX_TOKENS = 1024  # browser sessions remembered; the oldest is forgotten first


class AuthResult(enum.Enum):
    OK = "ok"
    MISSING = "Not authenticated"
    WRONG = "Incorrect username or password"


def parse_basic(header: str | None) -> tuple[str, str] | None:
    """(user, password) from an `Authorization: Basic ...` header; None when absent or not Basic."""
    if not header:
        return None
    scheme, _, param = header.strip().partition(" ")
    if scheme.lower() != "basic" or not param:
        return None
    try:
        decoded = base64.b64decode(param.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return ("", "")  # present but unreadable: wrong credentials, not missing ones
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else ("", "")


def credentials_match(credentials: Sequence[Credential], user: str, password: str) -> bool:
    """Constant-time over the whole credential list (no early exit on the first match)."""
    given_user, given_password = user.encode("utf-8"), password.encode("utf-8")
    matched = False
    for cred in credentials:
        user_ok = secrets.compare_digest(cred.username.encode("utf-8"), given_user)
        password_ok = secrets.compare_digest(cred.password.encode("utf-8"), given_password)
        matched |= user_ok & password_ok
    return matched


class LoginTokens:
    """Session tokens handed out by POST /login; bounded, thread-safe."""

    def __init__(self, limit: int = _MAX_TOKENS) -> None:
        self._tokens: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._limit = limit

    def issue(self, user: str) -> str:
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._tokens[token] = user
            while len(self._tokens) > self._limit:
                self._tokens.popitem(last=False)
        return token

    def valid(self, token: str | None) -> bool:
        if not token:
            return False
        with self._lock:
            return token in self._tokens


class Authenticator:
    def __init__(self, credentials: Sequence[Credential], tokens: LoginTokens) -> None:
        self.credentials = tuple(credentials)
        self.tokens = tokens

    @property
    def enabled(self) -> bool:
        return bool(self.credentials)

    def check(self, authorization: str | None, token: str | None = None) -> AuthResult:
        if not self.enabled:
            return AuthResult.OK
        pair = parse_basic(authorization)
        if pair is not None:
            return AuthResult.OK if credentials_match(self.credentials, *pair) else AuthResult.WRONG
        if token is not None:
            return AuthResult.OK if self.tokens.valid(token) else AuthResult.WRONG
        return AuthResult.MISSING


def parse_login_form(body: bytes) -> tuple[str, str]:
    """username/password from an application/x-www-form-urlencoded body (OAuth2 password form, as Gradio)."""
    fields = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)
    return (fields.get("username", [""])[0].strip(), fields.get("password", [""])[0])
