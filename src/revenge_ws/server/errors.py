"""Plain-HTTP refusals in the contract's shape ``{"error": {"code", "message"}}``."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from ..codes import ErrorCode
from ..exceptions import BrokerUnavailable, StoreUnavailable
from ..protocol import encode

__all__ = [
    "STATUS",
    "UNAVAILABLE",
    "UNAVAILABLE_ERRORS",
    "Refusal",
    "error_response",
    "unavailable_response",
]

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
    ErrorCode.REJECTED: 422,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.INTERNAL: 500,
    ErrorCode.UNAVAILABLE: 503,
}


@dataclass(frozen=True, slots=True)
class Refusal:
    """An error answered over plain HTTP: the contract's JSON body, and ``Retry-After``
    when the request may be repeated. Rendered by aiohttp (:meth:`response`) or by the
    direct WebSocket engine (:attr:`status`, :meth:`body`, :meth:`headers`).

    ``window`` (refused handshakes, contract v1.1 §12) advises the seconds over which
    clients should spread their next attempt after ``retry_after``: header
    ``Reconnect-Window`` and ``error.window`` in the body (with ``error.retry_after``).
    """

    code: ErrorCode
    message: str
    retry_after: float | None = None
    window: float | None = None

    @property
    def status(self) -> int:
        return STATUS[self.code]

    @property
    def _retry_seconds(self) -> int | None:
        return max(1, round(self.retry_after)) if self.retry_after else None

    def body(self) -> bytes:
        error: dict[str, object] = {"code": self.code.value, "message": self.message}
        if self.window is not None:
            error["retry_after"] = self._retry_seconds
            error["window"] = self.window
        return encode({"error": error})

    def headers(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        if self._retry_seconds is not None:
            out.append(("Retry-After", str(self._retry_seconds)))
        if self.window is not None:
            out.append(("Reconnect-Window", f"{self.window:g}"))
        return out

    def response(self) -> web.Response:
        return web.Response(
            status=self.status,
            body=self.body(),
            content_type="application/json",
            headers=dict(self.headers()) or None,
        )


#: The answer to one of :data:`UNAVAILABLE_ERRORS`: 503, retry in a second.
UNAVAILABLE = Refusal(ErrorCode.UNAVAILABLE, "temporarily unavailable", 1)


def error_response(
    code: ErrorCode, message: str, *, retry_after: float | None = None
) -> web.Response:
    return Refusal(code, message, retry_after).response()


def unavailable_response() -> web.Response:
    return UNAVAILABLE.response()
