"""Bearer-token authentication around the node's one HTTP app (every route but /healthz).

:func:`resolve_auth` reads the tokens (``http.token_file`` and
``$RADBRIDGE_HTTP_TOKENS``, never the TOML) and decides whether the app is
protected; :class:`AuthMiddleware` (pure ASGI, wrapped around the whole app by
``dicom_node.http.create_app``) then lets a request through only with

- ``Authorization: Bearer <token>`` (API clients, scrapers, STOW-RS senders), or
- the session cookie set by ``POST /login`` (the browser viewer: OHIF cannot be
  handed a header, but its same-origin DICOMweb requests carry the cookie).

A token has scopes: ``read`` (GET, HEAD, OPTIONS) and ``write`` (every other
method: STOW-RS, and whatever the viewer's proxy forwards). Missing or unknown
credentials answer 401 with ``WWW-Authenticate: Bearer realm="radbridge"``; a
token without the scope answers 403. Bodies are JSON ``{"error", "detail"}``,
except a browser's page navigation, which gets the login form (still 401).
Only SHA-256 digests of tokens are kept, compared with ``hmac.compare_digest``;
tokens are never logged (a token is named by where it came from, e.g.
"token_file line 3").
"""

from __future__ import annotations

import hashlib
import hmac
import html
import ipaddress
import logging
import math
import os
import re
import secrets
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from starlette.datastructures import Headers
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from dicom_node.config import HttpSection
from dicom_node.errors import AuthError, Forbidden, InvalidCredentials, Unauthenticated
from radbridge_common.settings import ConfigError

logger = logging.getLogger(__name__)

TOKENS_ENV = "RADBRIDGE_HTTP_TOKENS"
SCOPES = ("read", "write")
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MIN_TOKEN_CHARS = 16  # e.g. `python -c "import secrets; print(secrets.token_urlsafe(32))"` gives 43
REALM = "radbridge"
OPEN_PATHS = frozenset({"/healthz"})
LOGIN_PATH = "/login"
LOGOUT_PATH = "/logout"
SESSION_COOKIE = "radbridge_session"
MAX_LOGIN_BODY_BYTES = 8 * 1024
MAX_SESSIONS = 10_000  # each needs a valid token; the oldest goes first beyond this
_TOKEN_CHARS = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII without space (";" separates entries)


@dataclass(frozen=True)
class Token:
    """A configured token: its SHA-256 digest, its scopes, and where it came from (for logs)."""

    digest: bytes
    scopes: frozenset[str]
    source: str


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


def parse_tokens(text: str, source: str) -> list[Token]:
    """Entries separated by newlines or ";": ``TOKEN`` (read and write) or ``TOKEN read|write|read,write``.

    Blank entries and ``#`` comments are skipped. Errors name the entry, never its token.
    """
    tokens = []
    for number, entry in enumerate(re.split(r"[\n;]", text), start=1):
        entry = entry.strip()
        if not entry or entry.startswith("#"):
            continue
        where = f"{source} entry {number}"
        parts = entry.split()
        if len(parts) > 2:
            raise ConfigError(f"{where}: expected 'TOKEN' or 'TOKEN SCOPES', found {len(parts)} fields.")
        secret = parts[0]
        if len(secret) < MIN_TOKEN_CHARS or not _TOKEN_CHARS.match(secret):
            raise ConfigError(
                f"{where}: a token must be at least {MIN_TOKEN_CHARS} printable ASCII characters"
                " without spaces or ';' (e.g. secrets.token_urlsafe(32))."
            )
        scopes = frozenset(s for s in (parts[1] if len(parts) == 2 else ",".join(SCOPES)).split(",") if s)
        unknown = sorted(scopes - set(SCOPES))
        if unknown or not scopes:
            raise ConfigError(f"{where}: unknown scope(s) {unknown}; known: {', '.join(SCOPES)}.")
        tokens.append(Token(_digest(secret), scopes, where))
    return tokens


def load_tokens(http: HttpSection, environ: Mapping[str, str] | None = None) -> list[Token]:
    """Tokens from ``http.token_file`` and ``$RADBRIDGE_HTTP_TOKENS``; a listed token twice is an error."""
    environ = os.environ if environ is None else environ
    tokens: list[Token] = []
    if http.token_file is not None:
        path = Path(http.token_file)
        try:
            text = path.read_text(encoding="utf-8")
            mode = path.stat().st_mode
        except OSError as exc:
            raise ConfigError(f"http.token_file {path} cannot be read: {exc.strerror or exc}.") from exc
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning(
                "token file readable by others",
                extra={"event": "http.auth.file_mode", "path": str(path), "mode": oct(mode & 0o777)},
            )
        tokens += parse_tokens(text, f"http.token_file {path.name}")
    tokens += parse_tokens(environ.get(TOKENS_ENV, ""), TOKENS_ENV)
    seen: dict[bytes, str] = {}
    for token in tokens:
        if token.digest in seen:
            raise ConfigError(f"{token.source} repeats the token of {seen[token.digest]}.")
        seen[token.digest] = token.source
    return tokens


def read_bearer_token(token_file: Path | None, token_env: str, what: str) -> str:
    """Our own token for a peer ("" when none is configured): the first entry of ``token_file``
    (blank lines and ``#`` comments skipped), or the variable named ``token_env``.

    ``what`` names the setting in the ConfigError raised for a missing file or variable.
    """
    if token_file is not None:
        try:
            lines = Path(token_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"The token file of {what} cannot be read ({exc.strerror or exc}).") from exc
        token = next((line.strip() for line in lines if line.strip() and not line.startswith("#")), "")
        if not token:
            raise ConfigError(f"The token file of {what} is empty.")
        return token
    if token_env:
        token = os.environ.get(token_env, "").strip()
        if not token:
            raise ConfigError(f"{what}: the environment variable {token_env} is not set.")
        return token
    return ""


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the port on this machine ("", 0.0.0.0 and names other than
    localhost count as exposed)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_auth(http: HttpSection, host: str, environ: Mapping[str, str] | None = None) -> TokenAuth | None:
    """The authenticator for an app bound to ``host``, or None for an open one.

    "auto" protects the app whenever a token is configured, leaves it open on a
    loopback host otherwise, and refuses to start an open app on any other host:
    an exposed node is never open by accident. "none" is open anywhere (said in
    the log); "token" needs at least one token.
    """
    tokens = load_tokens(http, environ)
    if http.auth == "none":
        if tokens:
            logger.warning(
                "http.auth = none: the configured tokens are ignored", extra={"event": "http.auth"}
            )
        if not is_loopback(host):
            logger.warning(
                "HTTP front open without authentication", extra={"event": "http.auth.open", "host": host}
            )
        return None
    if tokens:
        return TokenAuth(tokens, http.session_ttl_s)
    if http.auth == "token":
        raise ConfigError(
            "http.auth = 'token' but no token is configured: list tokens in the file named by"
            f" http.token_file or in ${TOKENS_ENV}."
        )
    if not is_loopback(host):
        raise ConfigError(
            f"The HTTP front would listen on {host or 'every address'} without authentication. Give it"
            f" tokens (http.token_file or ${TOKENS_ENV}), or set http.auth = 'none' to serve it openly"
            " on purpose."
        )
    return None


@dataclass
class _Session:
    token: Token
    expires: float


class TokenAuth:
    """The configured tokens (as digests) and the browser sessions opened with them."""

    def __init__(self, tokens: list[Token], session_ttl_s: float) -> None:
        if not tokens:
            raise ValueError("TokenAuth needs at least one token.")
        self.tokens = list(tokens)
        self.session_ttl_s = session_ttl_s
        self._sessions: dict[bytes, _Session] = {}  # keyed by the digest of the cookie value

    def check_token(self, secret: str) -> Token | None:
        """The token ``secret`` is, compared in constant time against every configured digest."""
        presented = _digest(secret)
        found = None
        for token in self.tokens:
            if hmac.compare_digest(token.digest, presented):
                found = token
        return found

    def open_session(self, token: Token) -> str:
        """A new random cookie value for ``token``, valid for ``session_ttl_s``."""
        now = time.monotonic()
        for key in [k for k, s in self._sessions.items() if s.expires <= now]:
            del self._sessions[key]
        while len(self._sessions) >= MAX_SESSIONS:
            del self._sessions[next(iter(self._sessions))]
        value = secrets.token_urlsafe(32)
        self._sessions[_digest(value)] = _Session(token, now + self.session_ttl_s)
        return value

    def check_session(self, value: str) -> Token | None:
        session = self._sessions.get(_digest(value))
        if session is None:
            return None
        if session.expires <= time.monotonic():
            self._sessions.pop(_digest(value), None)
            return None
        return session.token

    def close_session(self, value: str) -> None:
        self._sessions.pop(_digest(value), None)

    def authenticate(self, headers: Headers) -> Token:
        """The token behind a request's Authorization header or session cookie; raises AuthError."""
        authorization = headers.get("authorization")
        if authorization is not None:
            scheme, _, secret = authorization.partition(" ")
            if scheme.lower() != "bearer" or not secret.strip():
                raise InvalidCredentials("The Authorization header must be 'Bearer <token>'.")
            token = self.check_token(secret.strip())
            if token is None:
                raise InvalidCredentials("The bearer token is not valid for this node.")
            return token
        cookie = _cookie(headers, SESSION_COOKIE)
        if cookie:
            token = self.check_session(cookie)
            if token is None:
                raise InvalidCredentials(
                    f"The session has expired or is unknown: log in again at {LOGIN_PATH}."
                )
            return token
        raise Unauthenticated(
            f"This endpoint needs 'Authorization: Bearer <token>' (or a browser session from {LOGIN_PATH})."
        )


def _cookie(headers: Headers, name: str) -> str:
    for header in headers.getlist("cookie"):
        for pair in header.split(";"):
            key, _, value = pair.strip().partition("=")
            if key == name:
                return value
    return ""


def required_scope(method: str) -> str:
    return "read" if method.upper() in READ_METHODS else "write"


def _wants_html(scope: Scope) -> bool:
    """A browser's page navigation (GET asking for HTML): it gets the login form, not JSON."""
    accept = Headers(scope=scope).get("accept", "")
    return scope["method"] == "GET" and "text/html" in accept


def _safe_next(value: str) -> str:
    """A local path to go back to after login (never another origin; browsers drop tabs and
    newlines from URLs, so "/\t/host" would become "//host")."""
    unsafe = "\\" in value or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value)
    if not value.startswith("/") or value.startswith("//") or unsafe or value == LOGIN_PATH:
        return "/"
    return value


def _login_page(next_path: str, message: str = "") -> str:
    note = f'<p role="alert">{html.escape(message)}</p>' if message else ""
    return (
        "<!doctype html><html><head><meta charset=utf-8><title>RadBridge: log in</title></head><body>"
        "<h1>RadBridge</h1>"
        f"{note}<form method=post action={LOGIN_PATH}>"
        "<label>Access token <input type=password name=token autocomplete=off required autofocus></label>"
        f'<input type=hidden name=next value="{html.escape(next_path, quote=True)}">'
        "<button type=submit>Log in</button></form></body></html>"
    )


def _www_authenticate(exc: AuthError, scope_needed: str = "") -> str:
    value = f'Bearer realm="{REALM}"'
    if exc.bearer_error:
        value += f', error="{exc.bearer_error}"'
    if scope_needed:
        value += f', scope="{scope_needed}"'
    return value


def error_response(exc: AuthError, scope: Scope, scope_needed: str = "") -> Response:
    """The one translation of an AuthError into HTTP: status, WWW-Authenticate, JSON (or the login form)."""
    headers = {"WWW-Authenticate": _www_authenticate(exc, scope_needed), "Cache-Control": "no-store"}
    if isinstance(exc, Forbidden):
        error = "forbidden"
    elif isinstance(exc, InvalidCredentials):
        error = "invalid credentials"
    else:
        error = "authentication required"
    if exc.http_status == 401 and _wants_html(scope):
        path = scope.get("path", "/")
        query = scope.get("query_string", b"").decode("latin-1")
        page = _login_page(_safe_next(path + ("?" + query if query else "")))
        return HTMLResponse(page, status_code=401, headers=headers)
    return JSONResponse({"error": error, "detail": str(exc)}, status_code=exc.http_status, headers=headers)


class AuthMiddleware:
    """Pure ASGI: every HTTP request but /healthz and the login page must carry a token with the scope."""

    def __init__(self, app: ASGIApp, auth: TokenAuth) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if scope["path"] in (LOGIN_PATH, LOGOUT_PATH):
            if scope["path"] == LOGIN_PATH:
                response = await self._login(scope, receive)
            else:
                response = self._logout(scope)
            await response(scope, receive, send)
            return
        needed = required_scope(scope["method"])
        try:
            token = self.auth.authenticate(Headers(scope=scope))
            if needed not in token.scopes:
                raise Forbidden(
                    f"This token may only {' and '.join(sorted(token.scopes))}; {scope['method']} needs {needed}."
                )
        except AuthError as exc:
            _log_refusal(scope, exc)
            await error_response(exc, scope, needed if isinstance(exc, Forbidden) else "")(
                scope, receive, send
            )
            return
        scope.setdefault("state", {})["token_source"] = token.source
        await self.app(scope, receive, send)

    async def _login(self, scope: Scope, receive: Receive) -> Response:
        if scope["method"] in ("GET", "HEAD"):
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            return HTMLResponse(
                _login_page(_safe_next(query.get("next", ["/"])[0])), headers={"Cache-Control": "no-store"}
            )
        if scope["method"] != "POST":
            return JSONResponse(
                {"error": "method not allowed", "detail": f"{LOGIN_PATH} takes GET (the form) or POST."},
                status_code=405,
                headers={"Allow": "GET, HEAD, POST"},
            )
        body = await _read_body(receive, MAX_LOGIN_BODY_BYTES)
        if body is None:
            return JSONResponse(
                {
                    "error": "request too large",
                    "detail": f"A login form is at most {MAX_LOGIN_BODY_BYTES} bytes.",
                },
                status_code=413,
            )
        form = parse_qs(body.decode("utf-8", "replace"))
        next_path = _safe_next(form.get("next", ["/"])[0])
        token = self.auth.check_token(form.get("token", [""])[0].strip())
        if token is None:
            _log_refusal(scope, InvalidCredentials("login"))
            page = _login_page(next_path, "That token is not valid for this node.")
            return HTMLResponse(
                page,
                status_code=401,
                headers={"WWW-Authenticate": f'Bearer realm="{REALM}"', "Cache-Control": "no-store"},
            )
        response = RedirectResponse(next_path, status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            self.auth.open_session(token),
            max_age=math.ceil(self.auth.session_ttl_s),  # the server expires it, too
            path="/",
            httponly=True,
            samesite="strict",
            secure=scope.get("scheme") == "https",
        )
        logger.info("browser login", extra={"event": "http.login", "token": token.source})
        return response

    def _logout(self, scope: Scope) -> Response:
        if scope["method"] != "POST":  # a link elsewhere cannot log anyone out
            return JSONResponse(
                {"error": "method not allowed", "detail": f"{LOGOUT_PATH} takes POST."},
                status_code=405,
                headers={"Allow": "POST"},
            )
        cookie = _cookie(Headers(scope=scope), SESSION_COOKIE)
        if cookie:
            self.auth.close_session(cookie)
        response = RedirectResponse(f"{LOGIN_PATH}", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return response


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body, or None once it passes ``limit`` bytes."""
    body = b""
    more = True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        body += message.get("body", b"")
        if len(body) > limit:
            return None
        more = message.get("more_body", False)
    return body


def _log_refusal(scope: Scope, exc: AuthError) -> None:
    """Who was refused and why: method, client address, reason; never the token, path or query
    (they may carry study UIDs)."""
    client: Any = scope.get("client")
    logger.info(
        "http request refused",
        extra={
            "event": "http.auth.refused",
            "status": exc.http_status,
            "reason": type(exc).__name__,
            "method": scope.get("method", ""),
            "client": client[0] if client else "",
        },
    )
