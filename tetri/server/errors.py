"""OpenAI-shaped errors and the two middlewares every route passes through.

Every non-2xx answer carries `{"error": {"message", "type", "param", "code"}}`. Handlers raise
`ApiError`; aiohttp's own `HTTPException`s (404 route, 405 method, 413 body) and engine
`EngineError`s are translated here, and anything else becomes a logged 500 with a body.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web

from tetri.server.engine_api import EngineError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}
_CODES = {401: "invalid_api_key", 405: "method_not_allowed", 413: "request_too_large", 429: "rate_limit_exceeded"}


class ApiError(Exception):
    """An error answered to the client as an OpenAI error body with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code if code is not None else _CODES.get(status)
        self.headers = headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> web.Response:
        return web.Response(
            status=self.status,
            body=msgspec.json.encode(self.body()),
            content_type="application/json",
            headers=self.headers,
        )


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def from_engine_error(exc: EngineError) -> ApiError:
    """Overloaded -> 429 with Retry-After, Unavailable -> 503, anything else -> its status."""
    status = getattr(exc, "status", 500)
    message = str(exc) or type(exc).__name__
    headers = {}
    if status == 429:
        retry_after = getattr(exc, "retry_after_s", None) or 1
        headers["Retry-After"] = str(max(1, int(round(retry_after))))
    return ApiError(status, message, headers=headers)


def _from_http_exception(exc: web.HTTPException) -> ApiError:
    messages = {
        404: "The requested route was not found.",
        405: "Method not allowed.",
        413: "Request body too large.",
    }
    message = messages.get(exc.status, exc.reason or "error")
    if exc.status == 413 and exc.text:
        message = f"Request body too large: {exc.text}"
    headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
    return ApiError(exc.status, message, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into an OpenAI error body; never let a traceback reach the client."""
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except EngineError as exc:
        return from_engine_error(exc).response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _from_http_exception(exc).response()
    except Exception:  # noqa: BLE001 - the one place that answers unexpected failures
        log.exception("unhandled error in %s %s", request.method, request.path)
        return ApiError(500, "Internal server error.").response()


def auth_middleware(api_key: str | None, open_paths: frozenset[str] = frozenset({"/health"})):
    """Bearer-token check (constant time) on every route but `open_paths`; None: no check."""
    expected = f"Bearer {api_key}".encode() if api_key else None

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected is not None and request.path not in open_paths:
            given = request.headers.get("Authorization", "").encode("utf-8", "replace")
            if not hmac.compare_digest(given, expected):
                raise ApiError(401, "Invalid or missing API key.")
        return await handler(request)

    return middleware
