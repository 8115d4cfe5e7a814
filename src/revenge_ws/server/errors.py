"""Plain-HTTP refusals in the contract's shape ``{"error": {"code", "message"}}``."""

from __future__ import annotations

from aiohttp import web

from ..codes import ErrorCode
from ..exceptions import BrokerUnavailable, StoreUnavailable
from ..protocol import encode

__all__ = ["STATUS", "UNAVAILABLE_ERRORS", "error_response", "unavailable_response"]

#: Failures of a dependency (broker, store, a timeout on either): the request may be
#: repeated, so they are answered 503 ``UNAVAILABLE``, never 500.
UNAVAILABLE_ERRORS = (BrokerUnavailable, StoreUnavailable, TimeoutError)

STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_JSON: 400,
    ErrorCode.INVALID_MESSAGE: 400,
    ErrorCode.UNKNOWN_TYPE: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.TOKEN_EXPIRED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.CONFLICT: 409,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.INTERNAL: 500,
    ErrorCode.UNAVAILABLE: 503,
}


def error_response(
    code: ErrorCode, message: str, *, retry_after: float | None = None
) -> web.Response:
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after else None
    return web.Response(
        status=STATUS[code],
        body=encode({"error": {"code": code.value, "message": message}}),
        content_type="application/json",
        headers=headers,
    )


def unavailable_response() -> web.Response:
    """The answer to one of :data:`UNAVAILABLE_ERRORS`: 503, retry in a second."""
    return error_response(ErrorCode.UNAVAILABLE, "temporarily unavailable", retry_after=1)
