"""The broker interface: publish, subscribe, history and presence across nodes.

A node owns exactly one broker. The broker is the single source of truth for a
channel's ``seq``/``epoch`` and history; the hub only fans out what the broker delivers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from ..config import HistoryFamily
from ..protocol import StreamPosition, encode_publication, frame_text

__all__ = [
    "Broker",
    "BrokerHandler",
    "HistoryResult",
    "PresenceInfo",
    "PresenceManager",
    "Publication",
]


@dataclass(slots=True, eq=False)
class Publication:
    """One publication on a channel, as every node sees it.

    ``payload`` is the JSON envelope, encoded once by whoever assigned the ``seq``;
    ``frame`` is that payload as a WebSocket text frame, built once per node on first use.
    """

    channel: str
    type: str
    seq: int
    epoch: str
    data: dict[str, Any]
    timestamp: str
    #: Wall-clock ms at which the broker accepted it (publish-to-send latency).
    created_ms: float
    payload: bytes = b""
    _frame: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.payload:
            self.payload = encode_publication(
                self.channel, self.type, self.seq, self.epoch, self.data, self.timestamp
            )

    @property
    def frame(self) -> bytes:
        f = self._frame
        if f is None:
            f = self._frame = frame_text(self.payload)
        return f

    @property
    def position(self) -> StreamPosition:
        return StreamPosition(self.epoch, self.seq)


@dataclass(frozen=True, slots=True)
class HistoryResult:
    """``position`` is the channel's current top; ``publications`` follow ``since``.

    ``recovered`` is False when the history cannot prove there is no gap after
    ``since`` (epoch changed, or ``since.seq`` fell out of the retained window); then
    ``publications`` is empty — never a partial recovery.
    """

    position: StreamPosition
    publications: list[Publication]
    recovered: bool


@dataclass(frozen=True, slots=True)
class PresenceInfo:
    user_id: str
    name: str
    node_id: str


class BrokerHandler(Protocol):
    """What a broker calls back into (the node)."""

    def on_publication(self, pub: Publication) -> None:
        """A publication on a channel this node subscribed to. Per channel, calls come
        in ``seq`` order; a publication may be missed (pub/sub is at-most-once) and the
        hub detects the gap by ``seq`` and recovers from history."""

    def on_control(self, message: dict[str, Any]) -> None:
        """A cluster-wide control message (disconnect, revoke...), on every node."""

    def on_reconnect(self) -> None:
        """The broker's link was restored after an outage: publications may have been
        missed on every channel; the node re-checks its subscriptions against history."""


class PresenceManager(Protocol):
    """Who is subscribed to a channel, and how many connections a user has, cluster-wide.

    Entries of a node that stops refreshing them expire (Redis: a TTL refreshed by live
    nodes), so a dead node's users disappear by themselves.
    """

    async def add(self, channel: str, client_id: str, info: PresenceInfo) -> None: ...

    async def remove(self, channel: str, client_id: str) -> None: ...

    async def members(self, channel: str) -> dict[str, PresenceInfo]: ...

    async def add_connection(self, user_id: str, client_id: str) -> int:
        """Register a connection; returns the user's connection count including it."""
        ...

    async def remove_connection(self, user_id: str, client_id: str) -> int:
        """Forget a connection; returns how many the user still has."""
        ...

    async def connection_count(self, user_id: str) -> int: ...

    async def online_users(self) -> int: ...


class Broker(Protocol):
    """Publish/subscribe with per-channel history.

    Guarantees every implementation keeps:

    * ``publish`` assigns ``seq`` (exactly previous + 1 within an epoch) and appends to
      history atomically, then delivers to every subscribed node. It either returns the
      publication or raises ``BrokerUnavailable`` having published nothing.
    * Delivery to nodes is at-most-once and in ``seq`` order per channel; history is
      the truth, so a node that misses one recovers it by ``seq``.
    * An ``epoch`` names a history generation: history lost (restart of a memory broker,
      a Redis that lost its data, a channel expired) means a new epoch, never a silent gap.
    * ``idempotency_key``: the same key within ``idempotency_ttl`` returns the first
      publication's position and publishes nothing.

    An implementation whose calls never wait on I/O may set a class attribute
    ``in_process = True``; the node then awaits them without its broker timeout.
    """

    @property
    def presence(self) -> PresenceManager:
        """Cluster-wide presence kept by this broker."""
        ...

    async def start(self, handler: BrokerHandler) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise ``BrokerUnavailable`` unless the broker answers now."""
        ...

    async def publish(
        self,
        channel: str,
        mtype: str,
        data: dict[str, Any],
        history: HistoryFamily,
        *,
        idempotency_key: str | None = None,
    ) -> Publication: ...

    async def subscribe(self, channel: str) -> None:
        """This node wants ``channel``'s publications (the hub reference-counts)."""
        ...

    async def unsubscribe(self, channel: str) -> None: ...

    async def history(
        self, channel: str, since: StreamPosition | None = None, limit: int = 0
    ) -> HistoryResult:
        """With ``since``: every publication after it (up to ``limit`` if > 0), or
        ``recovered=False``. Without: the current position and the last ``limit``."""
        ...

    async def publish_control(self, message: dict[str, Any]) -> None:
        """Deliver ``message`` to ``on_control`` of every node, this one included."""
        ...

    async def set_if_absent(self, key: str, value: str, ttl: float) -> str | None:
        """Store ``value`` unless ``key`` exists; return the existing value or None."""
        ...

    async def get_value(self, key: str) -> str | None: ...

    async def get_values(self, keys: list[str]) -> list[str | None]:
        """:meth:`get_value` of many keys in one round trip, in the order given."""
        ...

    async def set_value(self, key: str, value: str, ttl: float) -> None: ...

    async def set_values(self, values: dict[str, str], ttl: float) -> None:
        """:meth:`set_value` of many keys with one ``ttl``, pipelined (not atomic)."""
        ...
