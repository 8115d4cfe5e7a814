"""The client's types: options, counters, the refusal of a subscribe, the device this
client is (contract §13), and the records the connection loop keeps per request, per
ended connection and for the device."""

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
#: ``handler(command, args, sender)`` of a ``remote.command`` (``sender`` is its ``from``:
#: ``{"user_id", "device_id"}``); may be a coroutine function. Its return value, when a
#: mapping, is the result's ``state``; an exception makes the result ``ok: false``.
CommandHandler = Callable[
    [str, dict[str, Any], dict[str, Any]],
    Awaitable[Mapping[str, Any] | None] | Mapping[str, Any] | None,
]

REPLY_TYPES = frozenset({"ack", "error", "pong"})
#: ``playback.update`` states (contract §13).
PLAYBACK_STATES = frozenset({"playing", "paused", "buffering", "stopped"})
#: ``remote.command`` waits this long on the hub unless the caller says otherwise (ms).
COMMAND_TIMEOUT_MS = 10_000
#: The longest ``error`` text a device sends back in a ``remote.result``.
MAX_RESULT_ERROR = 500
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
    #: While the reported playback is ``playing``, ``playback.update`` is sent again this
    #: often, its position extrapolated (the contract asks for at least every 10 s).
    playback_interval: float = 10.0
    #: A ``remote.command`` handler that takes longer is answered ``ok: false``.
    command_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """What this client is, as a device: the data of its ``device.hello`` (contract §13).

    ``device_id`` must be stable per installation (1–128 chars); ``name`` (1–100) is what
    users see ("Living room TV"); ``client`` (1–100) the app and ``version`` (0–50) its
    version. ``commands`` lists the remote commands the device obeys (``play``,
    ``pause``, ..., own ones starting with ``x-``); the hub refuses the others with
    ``REJECTED`` without asking it. ``remote_control`` defaults to "some commands are
    listed".
    """

    device_id: str
    name: str
    client: str = "revenge-ws-python"
    version: str = ""
    commands: tuple[str, ...] = ()
    remote_control: bool | None = None

    def __post_init__(self) -> None:
        for key, value, low, high in (
            ("device_id", self.device_id, 1, 128),
            ("name", self.name, 1, 100),
            ("client", self.client, 1, 100),
            ("version", self.version, 0, 50),
        ):
            if not isinstance(value, str) or not low <= len(value) <= high:
                raise ValueError(f"DeviceInfo.{key} must be a string of {low} to {high} chars")
        commands = tuple(self.commands)
        if not all(isinstance(c, str) and c for c in commands):
            raise ValueError("DeviceInfo.commands must be non-empty strings")
        object.__setattr__(self, "commands", commands)

    def hello(self) -> dict[str, Any]:
        """The ``device.hello`` data."""
        remote = bool(self.commands) if self.remote_control is None else self.remote_control
        return {
            "device_id": self.device_id,
            "name": self.name,
            "client": self.client,
            "version": self.version,
            "capabilities": {"remote_control": remote, "commands": list(self.commands)},
        }


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
    #: ``device.hello`` requests acked (one per connection, plus :meth:`Client.set_device`).
    device_hellos: int = 0
    #: ``playback.update`` requests sent (reports, periodic updates and re-sends).
    playback_updates: int = 0
    #: ``remote.command`` messages received, and the ``remote.result`` answers acked.
    commands_received: int = 0
    commands_answered: int = 0


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


@dataclass(slots=True)
class Playback:
    """The last reported playback: ``fields`` is the ``playback.update`` data without the
    position, which was ``position`` at local time ``at`` (ms)."""

    fields: dict[str, Any]
    position: float
    at: float

    @property
    def state(self) -> str:
        return str(self.fields["state"])

    def data(self, now: float) -> dict[str, Any]:
        """The update to send at local time ``now`` (ms): while playing, the position
        moved on by the time elapsed times the rate (never past the duration)."""
        position = self.position
        if self.state == "playing":
            rate = self.fields.get("rate", 1.0)
            position += max(0.0, now - self.at) / 1000.0 * float(rate)
            duration = self.fields.get("duration")
            if duration is not None:
                position = min(position, float(duration))
        return {**self.fields, "position": round(position, 3)}


@dataclass(slots=True)
class DeviceState:
    """The client's side of its device: what it says in ``device.hello``, on which
    connection the hub accepted it, what it last reported, and who answers commands."""

    info: DeviceInfo | None
    #: The hub's device object from the last ``device.hello`` ack.
    record: dict[str, Any] | None = None
    #: The connection generation the device is live on; -1: none (not said, or ended).
    gen: int = -1
    #: Set by a hello ack: the reporter re-sends the current playback.
    resend: bool = False
    playback: Playback | None = None
    #: Event-loop time of the last ``playback.update`` sent.
    sent_at: float = 0.0
    handler: CommandHandler | None = None
    reporter: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    #: One ``playback.update`` at a time, so updates reach the hub in the order taken.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
