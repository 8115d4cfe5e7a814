"""The in-process broker: one node, no dependencies, history in memory.

A restart loses history; every channel then starts a new epoch, so clients are told
``recovered: false`` instead of silently missing publications.
"""

from __future__ import annotations

import asyncio
import heapq
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from ..config import HistoryFamily
from ..protocol import StreamPosition, rfc3339
from .base import BrokerHandler, HistoryResult, PresenceInfo, Publication

__all__ = ["MemoryBroker", "MemoryPresence"]

#: Keys (idempotency keys, revocations) kept at most; past it, expired ones are swept.
KV_MAX = 100_000
#: How often expired history is dropped from every channel (s).
SWEEP_INTERVAL = 60.0


#: Shared by every channel that has never had a publication (most personal channels):
#: a deque costs ~760 bytes even when empty, and a node holds two such channels per
#: connected user. ``maxlen=0`` makes an accidental append a no-op; the first publish
#: gives the channel a deque of its own.
_NO_HISTORY: deque[Publication] = deque(maxlen=0)


class _Channel:
    __slots__ = ("epoch", "history", "seq", "ttl")

    def __init__(self, ttl: float) -> None:
        self.epoch = secrets.token_hex(4)
        self.seq = 0
        self.ttl = ttl
        self.history: deque[Publication] = _NO_HISTORY


class MemoryPresence:
    """Presence of one process (nothing to expire: the process is the node)."""

    def __init__(self) -> None:
        self._channels: dict[str, dict[str, PresenceInfo]] = {}
        self._users: dict[str, set[str]] = {}

    async def add(self, channel: str, client_id: str, info: PresenceInfo) -> None:
        self._channels.setdefault(channel, {})[client_id] = info

    async def remove(self, channel: str, client_id: str) -> None:
        members = self._channels.get(channel)
        if members is not None:
            members.pop(client_id, None)
            if not members:
                del self._channels[channel]

    async def members(self, channel: str) -> dict[str, PresenceInfo]:
        return dict(self._channels.get(channel, {}))

    async def add_connection(self, user_id: str, client_id: str) -> int:
        conns = self._users.setdefault(user_id, set())
        conns.add(client_id)
        return len(conns)

    async def remove_connection(self, user_id: str, client_id: str) -> int:
        conns = self._users.get(user_id)
        if conns is None:
            return 0
        conns.discard(client_id)
        if not conns:
            del self._users[user_id]
            return 0
        return len(conns)

    async def connection_count(self, user_id: str) -> int:
        return len(self._users.get(user_id, ()))

    async def online_users(self) -> int:
        return len(self._users)


class MemoryBroker:
    """In-process :class:`~revenge_ws.broker.base.Broker`.

    Channel states are kept for at most ``max_channels`` channels (least recently used
    dropped first: that channel's next subscriber sees a new epoch).
    """

    #: Its calls complete without waiting on I/O, so the node awaits them without a
    #: timeout (``Node.call``). A broker that does I/O leaves this unset.
    in_process = True

    def __init__(
        self,
        *,
        max_channels: int = 100_000,
        idempotency_ttl: float = 600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._presence = MemoryPresence()
        self._handler: BrokerHandler | None = None
        self._channels: OrderedDict[str, _Channel] = OrderedDict()
        self._subscribed: set[str] = set()
        self._kv: dict[str, tuple[str, float]] = {}
        self._kv_expiry: list[tuple[float, str]] = []
        self._max_channels = max_channels
        self._idempotency_ttl = idempotency_ttl
        self._clock = clock
        self._next_sweep = clock() + SWEEP_INTERVAL

    @property
    def presence(self) -> MemoryPresence:
        return self._presence

    async def start(self, handler: BrokerHandler) -> None:
        self._handler = handler

    async def close(self) -> None:
        self._handler = None

    async def ping(self) -> None:
        return None

    def _state(self, channel: str, family: HistoryFamily | None = None) -> _Channel:
        st = self._channels.get(channel)
        if st is None:
            fam = family or HistoryFamily()
            st = self._channels[channel] = _Channel(fam.ttl)
            if len(self._channels) > self._max_channels:
                self._channels.popitem(last=False)
        else:
            self._channels.move_to_end(channel)
        return st

    async def publish(
        self,
        channel: str,
        mtype: str,
        data: dict[str, Any],
        history: HistoryFamily,
        *,
        idempotency_key: str | None = None,
    ) -> Publication:
        now = self._clock()
        idem = f"idem:{channel}:{idempotency_key}" if idempotency_key else None
        if idem is not None:
            seen = self._kv_get(idem, now)
            if seen is not None:
                st = self._state(channel, history)
                epoch, _, seq = seen.partition(":")
                for pub in st.history:
                    if pub.seq == int(seq) and pub.epoch == epoch:
                        return pub
                return Publication(channel, mtype, int(seq), epoch, data, "", now * 1000, b"{}")
        if now >= self._next_sweep:
            self._sweep(now)
        st = self._state(channel, history)
        st.ttl = history.ttl
        st.seq += 1
        pub = Publication(channel, mtype, st.seq, st.epoch, data, rfc3339(now * 1000), now * 1000)
        if history.size > 0:
            if st.history.maxlen != history.size:
                st.history = deque(st.history, maxlen=history.size)
            st.history.append(pub)
        if idem is not None:
            self._kv_set(idem, f"{st.epoch}:{st.seq}", now + self._idempotency_ttl)
        if channel in self._subscribed and self._handler is not None:
            self._handler.on_publication(pub)
        return pub

    def _sweep(self, now: float) -> None:
        """Drop publications past their channel's TTL everywhere (history() only trims the
        channel it reads): a channel written once and never read again would otherwise
        keep up to ``size`` publications for as long as its state lives. A channel left
        without history gives its deque back. At most once per SWEEP_INTERVAL, during a
        publish: ~0.3 µs per channel."""
        self._next_sweep = now + SWEEP_INTERVAL
        for st in self._channels.values():
            hist = st.history
            if hist:
                cutoff = (now - st.ttl) * 1000.0
                while hist and hist[0].created_ms < cutoff:
                    hist.popleft()
                if not hist:
                    st.history = _NO_HISTORY

    async def subscribe(self, channel: str) -> None:
        self._subscribed.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._subscribed.discard(channel)

    async def history(
        self, channel: str, since: StreamPosition | None = None, limit: int = 0
    ) -> HistoryResult:
        st = self._state(channel)
        hist = st.history
        cutoff = (self._clock() - st.ttl) * 1000.0
        while hist and hist[0].created_ms < cutoff:
            hist.popleft()
        position = StreamPosition(st.epoch, st.seq)
        if since is None:
            pubs = list(hist)[-limit:] if limit > 0 else []
            return HistoryResult(position, pubs, True)
        if since.epoch != st.epoch or since.seq > st.seq:
            return HistoryResult(position, [], False)
        missed = st.seq - since.seq
        if missed == 0:
            return HistoryResult(position, [], True)
        if not hist or hist[0].seq > since.seq + 1 or (limit > 0 and missed > limit):
            return HistoryResult(position, [], False)
        start = since.seq + 1 - hist[0].seq
        return HistoryResult(position, list(hist)[start:], True)

    async def publish_control(self, message: dict[str, Any]) -> None:
        if self._handler is not None:
            asyncio.get_running_loop().call_soon(self._handler.on_control, message)

    def _kv_get(self, key: str, now: float) -> str | None:
        item = self._kv.get(key)
        if item is None:
            return None
        if item[1] < now:
            del self._kv[key]
            return None
        return item[0]

    def _kv_set(self, key: str, value: str, expires: float) -> None:
        # Expired keys are dropped as they expire (a heap by expiry), not only when read:
        # idempotency keys are written ~20 times a second and never read again, and
        # kept until a 100,000-entry sweep they looked like a leak (RSS +0.3 MiB/min).
        now = self._clock()
        heap = self._kv_expiry
        while heap and heap[0][0] < now:
            at, old = heapq.heappop(heap)
            item = self._kv.get(old)
            if item is not None and item[1] == at:
                del self._kv[old]
        if len(self._kv) >= KV_MAX or len(heap) > 2 * KV_MAX:
            self._kv = {k: v for k, v in self._kv.items() if v[1] >= now}
            self._kv_expiry = [(v[1], k) for k, v in self._kv.items()]
            heapq.heapify(self._kv_expiry)
        self._kv[key] = (value, expires)
        heapq.heappush(self._kv_expiry, (expires, key))

    async def set_if_absent(self, key: str, value: str, ttl: float) -> str | None:
        now = self._clock()
        old = self._kv_get(key, now)
        if old is not None:
            return old
        self._kv_set(key, value, now + ttl)
        return None

    async def get_value(self, key: str) -> str | None:
        return self._kv_get(key, self._clock())

    async def get_values(self, keys: list[str]) -> list[str | None]:
        now = self._clock()
        return [self._kv_get(key, now) for key in keys]

    async def set_value(self, key: str, value: str, ttl: float) -> None:
        self._kv_set(key, value, self._clock() + ttl)

    async def set_values(self, values: dict[str, str], ttl: float) -> None:
        expires = self._clock() + ttl
        for key, value in values.items():
            self._kv_set(key, value, expires)
