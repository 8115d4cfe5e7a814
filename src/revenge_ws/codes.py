"""Error and close codes of the wire contract (``revenge.v1`` §2 and §4)."""

from __future__ import annotations

from enum import IntEnum, StrEnum

__all__ = ["CloseCode", "ErrorCode", "should_reconnect"]


class ErrorCode(StrEnum):
    """The ``code`` of an ``error`` envelope or of a refused HTTP call."""

    INVALID_JSON = "INVALID_JSON"
    INVALID_MESSAGE = "INVALID_MESSAGE"
    UNKNOWN_TYPE = "UNKNOWN_TYPE"
    UNAUTHORIZED = "UNAUTHORIZED"
    FORBIDDEN = "FORBIDDEN"
    NOT_FOUND = "NOT_FOUND"
    CONFLICT = "CONFLICT"
    RATE_LIMITED = "RATE_LIMITED"
    TOO_LARGE = "TOO_LARGE"
    TOKEN_EXPIRED = "TOKEN_EXPIRED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"
    #: A device refused a remote command, or does not support it (contract v1.1 §13).
    REJECTED = "REJECTED"
    #: A remote command got no result in time (contract v1.1 §13).
    TIMEOUT = "TIMEOUT"


class CloseCode(IntEnum):
    """WebSocket close codes the hub sends, and what a client should do about them."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003  # binary frame
    INVALID_PAYLOAD = 1007  # text that is not UTF-8
    POLICY = 1008
    TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TOKEN_EXPIRED = 4001
    SLOW_CONSUMER = 4002
    HEARTBEAT_TIMEOUT = 4003
    RATE_LIMITED = 4004
    UNAUTHORIZED = 4501
    DISCONNECTED = 4503


_RECONNECT = frozenset({1001, 1006, 1011, 1012, 1013, 1014})
_TERMINAL = frozenset({1000, 1002, 1003, 1007, 1008, 1009, 1010})


def should_reconnect(code: int | None) -> bool:
    """Whether a client should reconnect (with backoff and jitter) after this close code.

    Contract §4: 1001/1012 and 4000–4499 reconnect; 1008, 1009 and 4500–4999 do not.
    An abnormal end with no close frame (``None``/1006) is a network loss: reconnect.
    """
    if code is None or code in _RECONNECT:
        return True
    if code in _TERMINAL:
        return False
    if 4000 <= code <= 4499:
        return True
    if 4500 <= code <= 4999:
        return False
    # Unknown 1xxx/3xxx codes: treat as transient, the backoff keeps it cheap.
    return code < 4000
