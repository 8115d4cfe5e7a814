"""The one exception tree of revenge-ws.

Every exception the package raises on purpose derives from :class:`RevengeError`::

    RevengeError
    ├── ConfigError            a setting is missing or invalid (names the key)
    ├── ProtocolError          a client message broke the wire contract (carries an ErrorCode)
    │   └── RequestError       a request was refused; ``code`` is the contract's error code
    ├── AuthError              a token or API key was refused (carries an ErrorCode)
    ├── StoreError             the durable store failed (notifications)
    │   └── StoreUnavailable   the store cannot be reached right now (retryable)
    ├── BrokerError            the broker failed
    │   └── BrokerUnavailable  the broker cannot be reached right now (retryable)
    └── ClientError            raised by :mod:`revenge_ws.client` and :mod:`revenge_ws.publisher`
        ├── ConnectionClosed   the connection closed; ``code`` tells whether to reconnect
        ├── RequestTimeout     no reply within the timeout
        └── PublishError       the hub refused a backend call (``status``, ``code``)

Server code turns ``ProtocolError``/``RequestError`` into an ``error`` envelope and
``AuthError`` into a refused handshake; nothing else should reach a client.
"""

from __future__ import annotations

from .codes import ErrorCode

__all__ = [
    "AuthError",
    "BrokerError",
    "BrokerUnavailable",
    "ClientError",
    "ConfigError",
    "ConnectionClosed",
    "ProtocolError",
    "PublishError",
    "RequestError",
    "RequestTimeout",
    "RevengeError",
    "StoreError",
    "StoreUnavailable",
]

# Codes a client may retry as they are: the condition is expected to pass.
_RETRYABLE = frozenset(
    {ErrorCode.RATE_LIMITED, ErrorCode.UNAVAILABLE, ErrorCode.INTERNAL, ErrorCode.TIMEOUT}
)


class RevengeError(Exception):
    """Base class of every exception revenge-ws raises on purpose."""


class ConfigError(RevengeError):
    """A setting is missing or invalid; the message names the key and says how to fix it."""


class ProtocolError(RevengeError):
    """A client message broke the wire contract; becomes an ``error`` envelope."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        retryable: bool | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = code in _RETRYABLE if retryable is None else retryable
        #: The ``id`` of the request that failed, when it could be read.
        self.request_id = request_id

    def to_data(self) -> dict[str, object]:
        return {"code": self.code.value, "message": self.message, "retryable": self.retryable}


class RequestError(ProtocolError):
    """A request was understood but refused (``NOT_FOUND``, ``FORBIDDEN``, ``CONFLICT``...)."""


class AuthError(RevengeError):
    """A credential was refused. ``code`` is ``UNAUTHORIZED`` or ``FORBIDDEN``.

    The message is safe to show to the caller: it never contains the credential.
    """

    def __init__(
        self, message: str, code: ErrorCode = ErrorCode.UNAUTHORIZED, *, expired: bool = False
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        #: The credential was valid but has expired (``auth.refresh`` answers TOKEN_EXPIRED).
        self.expired = expired


class StoreError(RevengeError):
    """The durable store failed."""


class StoreUnavailable(StoreError):
    """The durable store cannot be reached right now; the operation may be retried."""


class BrokerError(RevengeError):
    """The broker failed."""


class BrokerUnavailable(BrokerError):
    """The broker cannot be reached right now; nothing was half-published."""


class ClientError(RevengeError):
    """Base of the errors raised by the Python client and the publisher helper."""


class ConnectionClosed(ClientError):
    """The WebSocket closed. ``reconnect`` says whether the close code allows reconnecting."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(f"connection closed ({code}): {reason}" if reason else f"closed ({code})")
        self.code = code
        self.reason = reason


class RequestTimeout(ClientError):
    """No reply arrived within the request's timeout."""


class PublishError(ClientError):
    """The hub refused a backend HTTP call; ``status`` and ``code`` say why."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
