"""The client's types: options, counters, the refusal of a subscribe, and the records
the connection loop keeps per request and per ended connection."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..codes import ErrorCode
from ..exceptions import RequestError
from ._backoff import ReconnectPolicy

Message = dict[str, Any]
#: ``handler(message)``; may be a coroutine function (then it runs as a task).
Handler = Callable[[Message], Awaitable[None] | None]
#: Returns a fresh token (called before connecting and before it expires).
TokenProvider = Callable[[], Awaitable[str]]
#: ``on_recovery_failed(channel)``; may be a coroutine function.
RecoveryCallback = Callable[[str], Awaitable[None] | None]

REPLY_TYPES = frozenset({"ack", "error", "pong"})
#: Channels per ``subscribe`` request (the contract's per-connection limit).
SUBSCRIBE_CHUNK = 128
#: A handshake refused with 401 this many times in a row, with fresh tokens, is terminal.
MAX_UNAUTHORIZED = 3
#: Refresh attempts are at least this far apart (s).
MIN_REFRESH_GAP = 1.0


class SubscribeError(RequestError):
    """Some channels of a ``subscribe`` were refused.

    ``errors`` lists ``{channel, code, message}``; ``subscriptions`` holds the ack
    entries of the channels that were subscribed (they stay subscribed).
    """

    def __init__(self, errors: list[dict[str, Any]], subscriptions: list[dict[str, Any]]) -> None:
        first = errors[0]
        try:
            code = ErrorCode(str(first.get("code")))
        except ValueError:
            code = ErrorCode.INTERNAL
        names = ", ".join(f"{e.get('channel')} ({e.get('code')})" for e in errors)
        super().__init__(code, f"subscription refused: {names}")
        self.errors = errors
        self.subscriptions = subscriptions


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """Every option of :class:`Client` (seconds unless noted)."""

    #: Send the token as ``?token=`` (like a browser) instead of ``Authorization``.
    token_in_query: bool = False
    headers: Mapping[str, str] | None = None
    #: ``Origin`` header (browser-like clients); native apps send none.
    origin: str | None = None
    #: Messages buffered for :meth:`Client.messages`; the oldest is dropped beyond it.
    queue_size: int = 100
    request_timeout: float = 5.0
    #: TCP + TLS + upgrade + welcome must complete within this.
    connect_timeout: float = 10.0
    #: The close handshake gets this long before the socket is dropped.
    close_timeout: float = 2.0
    policy: ReconnectPolicy = field(default_factory=ReconnectPolicy)
    #: A connection that lived this long resets the backoff to its first step.
    stable_after: float = 5.0
    #: Refresh the token this long before ``expires_at`` (at most half the time left);
    #: None disables proactive refresh.
    refresh_margin: float | None = 60.0
    #: Quick pings right after connecting (clock sync), then every ``heartbeat.interval``.
    initial_pings: int = 3
    initial_ping_interval: float = 1.0
    #: Override the welcome's ``heartbeat.interval`` / ``heartbeat.timeout``.
    ping_interval: float | None = None
    watchdog_timeout: float | None = None
    clock_samples: int = 8
    #: False: never reconnect (the first disconnect is final).
    reconnect: bool = True
    #: Notification ids remembered for de-duplication.
    notification_ids: int = 10_000
    max_msg_size: int = 4 * 1024 * 1024


@dataclass(slots=True)
class ClientStats:
    """Counters, for logs, metrics and tests."""

    #: Connections that completed the welcome and the re-subscription.
    connects: int = 0
    #: Connection attempts (successful or not).
    attempts: int = 0
    disconnects: int = 0
    delivered: int = 0
    #: Publications dropped as already delivered (same channel and seq, or same
    #: notification id).
    duplicates: int = 0
    #: Publications dropped while their channel recovered (the server re-sends them).
    held: int = 0
    #: Gaps seen (each starts a recovery of its channel).
    gaps: int = 0
    recoveries: int = 0
    recovery_failures: int = 0
    #: Messages dropped from a full :meth:`Client.messages` queue (oldest first).
    dropped: int = 0
    pings: int = 0
    watchdog_fired: int = 0
    token_refreshes: int = 0
    invalid_frames: int = 0


@dataclass(slots=True)
class Pending:
    future: asyncio.Future[Message]
    on_reply: Callable[[Message, float], None] | None = None


@dataclass(slots=True)
class Disconnect:
    """How one connection (or connection attempt) ended."""

    code: int | None = None
    reason: str = ""
    http_status: int | None = None
    retry_after: float | None = None
    #: The welcome arrived (the connection was usable).
    opened: bool = False
    #: The connection lived at least ``stable_after``.
    stable: bool = False
    window: float | None = None
