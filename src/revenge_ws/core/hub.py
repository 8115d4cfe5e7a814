"""The hub: this node's connections by id and by user, and subscribers by channel.

Fan-out takes a publication's frame, built once, and appends the same bytes to every
local subscriber's bounded outbox: no task, no encode and no write per recipient in the
loop. Per connection and channel it tracks ``seq``, so it drops duplicates and detects
gaps (then asks the node to recover from history).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from ..broker.base import Publication
from .channels import CONFLATABLE_TYPES
from .connection import Connection, SubState

__all__ = ["Hub"]

GapHandler = Callable[[Connection, str], None]
#: Live publications buffered per channel while a connection recovers it.
PENDING_LIMIT = 10_000


class Hub:
    def __init__(self, on_gap: GapHandler | None = None) -> None:
        self.connections: dict[str, Connection] = {}
        self.by_user: dict[str, set[Connection]] = {}
        self.channels: dict[str, dict[Connection, SubState]] = {}
        self._on_gap = on_gap
        self.delivered = 0

    # -- connections -----------------------------------------------------------------
    def add(self, conn: Connection) -> None:
        self.connections[conn.session_id] = conn
        self.by_user.setdefault(conn.user_id, set()).add(conn)

    def remove(self, conn: Connection) -> list[str]:
        """Forget a connection; returns the channels that now have no local subscriber."""
        self.connections.pop(conn.session_id, None)
        conns = self.by_user.get(conn.user_id)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self.by_user[conn.user_id]
        emptied = [ch for ch in list(conn.subs) if self.unsubscribe(conn, ch)]
        return emptied

    def user_connections(self, user_id: str) -> set[Connection]:
        return self.by_user.get(user_id, set())

    def __iter__(self) -> Iterator[Connection]:
        return iter(list(self.connections.values()))

    def __len__(self) -> int:
        return len(self.connections)

    # -- subscriptions -----------------------------------------------------------------
    def subscribe(self, conn: Connection, channel: str, state: SubState) -> bool:
        """Attach ``conn`` to ``channel``; True when it is the channel's first local
        subscriber (the node must then subscribe the broker)."""
        subs = self.channels.get(channel)
        first = subs is None
        if subs is None:
            subs = self.channels[channel] = {}
        subs[conn] = state
        conn.subs[channel] = state
        return first

    def unsubscribe(self, conn: Connection, channel: str) -> bool:
        """Detach; True when the channel has no local subscriber left."""
        conn.subs.pop(channel, None)
        subs = self.channels.get(channel)
        if subs is None:
            return False
        subs.pop(conn, None)
        if not subs:
            del self.channels[channel]
            return True
        return False

    # -- fan-out ---------------------------------------------------------------------
    def deliver(self, pub: Publication, lazy: bool = False) -> int:
        """Queue ``pub`` for every local subscriber; returns how many got it. ``lazy``:
        its frames may linger in the outboxes (:class:`~.connection.Flusher`)."""
        subs = self.channels.get(pub.channel)
        if not subs:
            return 0
        frame = pub.frame
        seq = pub.seq
        epoch = pub.epoch
        latest = pub.type in CONFLATABLE_TYPES
        n = 0
        gaps: list[Connection] | None = None
        for conn, st in subs.items():
            if st.pending is not None:
                if len(st.pending) < PENDING_LIMIT:
                    st.pending.append(pub)
                else:
                    st.overflow = True
                continue
            if seq != st.seq + 1 or epoch != st.epoch:
                if epoch == st.epoch and seq <= st.seq:
                    continue  # already delivered (history and live overlapped)
                if gaps is None:
                    gaps = []
                gaps.append(conn)
                continue
            st.seq = seq
            if latest:
                conn.send_latest(pub.channel, frame, lazy)
            else:
                conn.outbox.barrier(pub.channel)
                conn.send_frame(frame, lazy)
            n += 1
        self.delivered += n
        if gaps and self._on_gap is not None:
            for conn in gaps:
                self._on_gap(conn, pub.channel)
        return n

    def deliver_to(self, conn: Connection, pub: Publication) -> bool:
        """Deliver one publication to one connection (recovery), keeping ``seq``."""
        st = conn.subs.get(pub.channel)
        if st is None or (pub.epoch == st.epoch and pub.seq <= st.seq):
            return False
        st.seq = pub.seq
        st.epoch = pub.epoch
        return conn.send_frame(pub.frame)
