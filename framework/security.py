"""What stands between a client and the server: the API key check, JSON errors, redaction in /info.

* ``ApiKeyMiddleware``: a pure ASGI middleware, outermost on the app, so one check covers every path
  (inference routes, ``/info``, ``/metrics``, anything FastAPI or a later change adds) except
  ``server.public_paths``. The key is compared in constant time.
* ``install_error_handlers``: Starlette/FastAPI's own errors (404, 405, a validation error, a bug in a
  route) answer the documented ``{"error": ..., "detail": ...}`` instead of ``{"detail": ...}``.
* On ``/v1/`` paths (the OpenAI-compatible routes) both answer OpenAI's error object instead,
  ``{"error": {"message", "type", "param", "code"}}``, which the official clients parse into their
  exceptions (``openai.AuthenticationError``, ``NotFoundError``...).
* ``redact``: a copy of a config (or any JSON-like data) with the values of secret-looking keys hidden.
"""

from __future__ import annotations

import hmac
import logging
import re
from typing import Any

import orjson

from framework.openai_generation import error_body

log = logging.getLogger("hydraserve.security")

REDACTED = "***"
# A key names a secret when its last word (split at _, -, ., spaces and camelCase) is one of these: the
# noun a name ends on is what it holds (access_token, X-API-Key), while token_agreement or key_file hold
# a measurement or a path (hiding those hid the quality gate's figures in /info).
SECRET_WORDS = frozenset({"headers", "header", "key", "apikey", "token", "secret", "password", "passwd",
                          "authorization", "auth", "credential", "credentials", "cookie"})
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
_URL_PASSWORD = re.compile(r"(://[^/@:\s]*:)[^/@\s]+@")  # http://user:password@host


def names_secret(key: Any) -> bool:
    """True for ``authorization``, ``api_key``, ``X-API-Key``, ``accessToken``, ``headers``...; false for
    ``token_agreement`` (the secret word is not the last), and for a key ending in ``_env``: it names the
    environment variable holding a secret (``api_key_env``)."""
    if not isinstance(key, str) or key.lower().endswith("_env"):
        return False
    words = _WORD.findall(key)
    return bool(words) and words[-1].lower() in SECRET_WORDS


def redact(value: Any, hide: bool = False) -> Any:
    """A copy of ``value`` where everything under a secret-naming key is ``"***"`` (dict keys stay, so
    a reader sees which headers are set; ``None`` stays, an unset secret is no secret). Passwords in
    URLs (``scheme://user:password@host``) are hidden too."""
    if isinstance(value, dict):
        return {k: redact(v, hide or names_secret(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, hide) for v in value]
    if value is None:
        return None
    if hide:
        return REDACTED
    if isinstance(value, str) and "@" in value:
        return _URL_PASSWORD.sub(r"\1" + REDACTED + "@", value)
    return value


# --------------------------------------------------------------------------------------- API key

UNAUTHORIZED = orjson.dumps({"error": "missing or invalid API key",
                             "detail": "send it in the X-API-Key header (or Authorization: Bearer)"})
OPENAI_PREFIX = "/v1/"
# OpenAI's own 401 bodies: type authentication_error, code invalid_api_key. The key given is not echoed.
OPENAI_MISSING_KEY = orjson.dumps(error_body(
    401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>' (the openai client's "
    "api_key) or in the X-API-Key header.", code="invalid_api_key"))
OPENAI_WRONG_KEY = orjson.dumps(error_body(
    401, "Incorrect API key provided. Use this server's API key (not an OpenAI key), sent as "
    "'Authorization: Bearer <key>' or in the X-API-Key header.", code="invalid_api_key"))


def is_openai_path(path: str) -> bool:
    """The OpenAI-compatible routes live under ``/v1/``; their errors use OpenAI's error object."""
    return path.startswith(OPENAI_PREFIX)


def presented_key(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The key a request carries: ``X-API-Key``, else ``Authorization: Bearer <key>``."""
    bearer = None
    for name, value in headers:
        if name == b"x-api-key":
            return value
        if name == b"authorization" and bearer is None and value[:7].lower() == b"bearer ":
            bearer = value[7:].strip()
    return bearer


class ApiKeyMiddleware:
    """Every HTTP (and websocket) request needs the key except those to ``public_paths`` (exact paths).
    ``key=None`` (no key set) lets everything through."""

    def __init__(self, app, key: str | None, public_paths: tuple[str, ...] = ("/health",)):
        self.app = app
        self.key = key.encode() if key else None
        self.public = frozenset(public_paths)

    async def __call__(self, scope, receive, send):
        if self.key is None or scope["type"] not in ("http", "websocket") or scope["path"] in self.public:
            return await self.app(scope, receive, send)
        given = presented_key(scope["headers"])
        # compare_digest: the time taken does not depend on how many leading bytes match.
        if given is not None and hmac.compare_digest(given, self.key):
            return await self.app(scope, receive, send)
        from framework import metrics

        metrics.rejected("unauthorized")
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = UNAUTHORIZED
        if is_openai_path(scope["path"]):
            body = OPENAI_MISSING_KEY if given is None else OPENAI_WRONG_KEY
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b'Bearer realm="hydraserve"')]})
        await send({"type": "http.response.body", "body": body})


# ----------------------------------------------------------------------------------- error bodies


def install_error_handlers(app) -> None:
    """Errors raised by Starlette/FastAPI themselves answer ``{"error": ..., "detail": ...}``, or OpenAI's
    error object on ``/v1/`` paths."""
    from fastapi.encoders import jsonable_encoder
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    from framework.http import error_response, json_response

    def openai_error(status: int, message: str, param: str | None = None, headers: dict | None = None):
        return json_response(error_body(status, message, param), status, headers)

    async def http_error(request, exc: HTTPException):
        method, path = request.method, request.url.path
        if is_openai_path(path):
            if exc.status_code == 404:
                message = f"no endpoint at {method} {path}; the OpenAI-compatible routes are under /v1/"
            elif exc.status_code == 405:
                allowed = (exc.headers or {}).get("Allow", "")
                message = f"{method} is not allowed on {path}" + (f"; use {allowed}" if allowed else "")
            else:
                message = str(exc.detail)
            return openai_error(exc.status_code, message, headers=exc.headers)
        if exc.status_code == 404:
            error, detail = f"no endpoint at {path}", "see the endpoints in the README (POST /predict, GET /health...)"
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            error, detail = f"{method} is not allowed on {path}", f"use {allowed}" if allowed else None
        else:
            error, detail = str(exc.detail), None
        return error_response(exc.status_code, error, detail, headers=exc.headers)

    async def validation_error(request, exc: RequestValidationError):
        errors = jsonable_encoder(exc.errors())
        if is_openai_path(request.url.path):
            first = errors[0] if errors else {}
            param = ".".join(str(p) for p in first.get("loc", ())) or None
            message = f"request is not valid: {param}: {first.get('msg', '')}" if param else "request is not valid"
            return openai_error(422, message, param)
        return error_response(422, "request is not valid", errors)

    async def server_error(request, exc: Exception):  # Starlette logs the traceback after this answer
        if is_openai_path(request.url.path):
            return openai_error(500, "internal server error; see the server log")
        return error_response(500, "internal server error", "see the server log")

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, server_error)
