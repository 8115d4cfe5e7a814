"""Admission: who may open a connection on this node, decided before the upgrade.

:class:`HandshakeGate` bounds the handshakes in progress (contract v1.1 §12): pure
bookkeeping, no clock and no I/O; the transport adapters call
:meth:`HandshakeGate.enter` when a handshake request has arrived, before anything about
it is looked at (not even its token), and :meth:`HandshakeGate.leave` once the
connection is open or refused. :class:`Admission` holds the node-wide limits (accept
rate, connections per node) and the cluster-wide ones (revocation, connections per user),
and the spread window the node advises to clients it turns away or asks to come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from ..auth import Claims
from ..codes import ErrorCode
from ..exceptions import AuthError, BrokerUnavailable
from .ratelimit import TokenBucket

if TYPE_CHECKING:
    from .node import Node

__all__ = [
    "HANDSHAKE_QUEUE",
    "LAG_PROBE_INTERVAL",
    "MAX_PENDING",
    "MAX_WINDOW",
    "STORM_HOLD",
    "Admission",
    "HandshakeGate",
    "LagMeter",
    "StormMeter",
]

#: The longest spread window a node advises (s).
MAX_WINDOW = 300.0
#: How often the node's loop-lag probe wakes (s).
LAG_PROBE_INTERVAL = 0.05
#: A storm is over this long (s) after the last second that had
#: ``server.storm_handshakes`` handshakes.
STORM_HOLD = 2.0


#: The bound on handshakes in progress follows the node's pace: this many seconds of the
#: handshakes it completed in the last second...
HANDSHAKE_QUEUE = 1.5
#: ...but never more than this many at once.
MAX_PENDING = 2048


class HandshakeGate:
    """At most ``limit`` handshakes in progress at once.

    During a reconnect storm the node would otherwise start the work of every client that
    knocks (token check, broker calls, the ``welcome``) and finish none of it in time:
    clients give up, come back, and the node keeps working for sockets nobody reads.
    Past the bound a client is told 503 with ``Retry-After`` at the cost of a few bytes.

    The bound is ``base`` (``server.max_pending_handshakes``), or about
    :data:`HANDSHAKE_QUEUE` seconds of the node's measured pace when that is more (at most
    :data:`MAX_PENDING`): a node that completes 1,000 handshakes a second works on up to
    1,500, each answered within about 1.5 s, far within a client's connect timeout, and
    refuses only what it could not answer in that time. (Longer, and the clients' first
    requests after their ``welcome`` wait behind the handshakes: with Redis, 4 s of
    handshakes made subscribe acks time out.) A fixed bound refused clients that
    a busy node would have served within a second, and its 503s sent them into backoff.
    """

    __slots__ = ("_done", "_second_end", "base", "limit", "pending", "refused")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self.base = limit
        self.limit = limit
        self.pending = 0
        #: Handshakes refused for the bound since the node started.
        self.refused = 0
        self._done = 0
        self._second_end = 0.0

    def enter(self) -> bool:
        """Take a place; False (and counted as refused) when all are taken."""
        if self.pending >= self.limit:
            self.refused += 1
            return False
        self.pending += 1
        return True

    def leave(self, now: float | None = None) -> None:
        """Give back a place taken by :meth:`enter`; ``now`` (monotonic s) counts the
        handshake toward the node's pace."""
        if self.pending > 0:
            self.pending -= 1
        if now is None:
            return
        if now >= self._second_end:
            # A whole second just ended (or the node was idle): its count sets the pace.
            rate = self._done if now < self._second_end + 1.0 else 0
            self.limit = min(MAX_PENDING, max(self.base, int(rate * HANDSHAKE_QUEUE)))
            self._second_end = now + 1.0
            self._done = 0
        self._done += 1


class StormMeter:
    """Whether the node is in a reconnect storm: some whole second (from the first
    handshake of a count) had ``rate`` handshakes, at most ``hold`` seconds ago. Pure:
    callers pass the time."""

    __slots__ = ("_count", "_end", "hold", "rate", "until")

    def __init__(self, rate: int, hold: float = STORM_HOLD) -> None:
        self.rate = rate
        self.hold = hold
        self._count = 0
        self._end = 0.0
        #: The storm lasts until this time (monotonic s).
        self.until = 0.0

    def handshake(self, now: float) -> None:
        if now >= self._end:
            self._end = now + 1.0
            self._count = 0
        self._count += 1
        if self._count >= self.rate:
            self.until = max(self.until, self._end + self.hold)

    def storming(self, now: float) -> bool:
        return now < self.until


class Admission:
    """The node's admission state: the accept bucket, the handshake gate, and the
    connections admitted but not yet opened (their cluster-wide count is held)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        server = node.settings.server
        self.accept = TokenBucket(server.accept_rate, server.accept_burst, time.monotonic())
        self.handshakes = HandshakeGate(server.max_pending_handshakes)
        self.lag = LagMeter(server.max_loop_lag)
        self.storm = StormMeter(server.storm_handshakes)
        #: Admitted, not opened yet: their connection count is released if they never open.
        self.admitted: set[str] = set()
        #: The user's cluster-wide connection count each admitted connection saw.
        self.counts: dict[str, int] = {}

    async def admit(self, claims: Claims, session_id: str) -> None:
        """Decide whether this user may open one more connection, before the upgrade.

        On success the connection is counted (cluster-wide); :meth:`Node.closed` or
        :meth:`release` uncounts it. Raises :class:`AuthError` with ``UNAVAILABLE``
        (503), ``RATE_LIMITED`` (429) or ``UNAUTHORIZED`` (401).
        """
        node = self.node
        if node.closing:
            raise AuthError("shutting down", ErrorCode.UNAVAILABLE)
        if not self.accept.take(time.monotonic()):
            raise AuthError("too many handshakes, retry later", ErrorCode.UNAVAILABLE)
        if len(node.hub) >= node.settings.server.max_connections:
            raise AuthError("this node is full", ErrorCode.UNAVAILABLE)
        try:
            revoked = await node.call(node.broker.get_value(f"revoked:{claims.sub}"))
            if revoked is not None and (claims.iat is None or claims.iat * 1000 <= float(revoked)):
                raise AuthError("token revoked")
            count = await node.call(node.broker.presence.add_connection(claims.sub, session_id))
        except BrokerUnavailable:
            raise AuthError("broker unavailable", ErrorCode.UNAVAILABLE) from None
        limit = node.settings.limits.connections_per_user
        if count > limit:
            await self.release(claims, session_id)
            raise AuthError(f"more than {limit} connections for this user", ErrorCode.RATE_LIMITED)
        self.admitted.add(session_id)
        self.counts[session_id] = count

    async def release_if_unopened(self, claims: Claims, session_id: str) -> None:
        """Uncount an admitted connection whose upgrade never completed."""
        self.counts.pop(session_id, None)
        if session_id in self.admitted:
            self.admitted.discard(session_id)
            await self.release(claims, session_id)

    def wait(self) -> float:
        """Seconds until this node could admit one more connection (0: it can now),
        without spending from the accept bucket: the adapter asks this before it
        spends CPU on a token. :meth:`admit` still decides."""
        if len(self.node.hub) >= self.node.settings.server.max_connections:
            return self.retry_after()
        return self.accept.wait(time.monotonic())

    def retry_after(self) -> float:
        return max(1.0, self.accept.retry_after())

    def spread_window(self) -> float:
        """Seconds over which clients told to come back (a close in
        :data:`~revenge_ws.core.node.COME_BACK`, a 503) should spread their reconnects:
        ``server.restart_window``, or longer when this node's connections could not all
        be admitted within it at ``server.accept_rate`` (10,000 at 1,000/s: 10 s)."""
        server = self.node.settings.server
        return min(MAX_WINDOW, max(server.restart_window, len(self.node.hub) / server.accept_rate))

    async def release(self, claims: Claims, session_id: str) -> int:
        """Uncount a connection; how many the user still has (-1: the broker failed)."""
        presence = self.node.broker.presence
        with contextlib.suppress(BrokerUnavailable):
            return await self.node.call(presence.remove_connection(claims.sub, session_id))
        return -1

    async def watch_lag(self) -> None:
        """The probe of :class:`LagMeter`: runs for the node's life."""
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(LAG_PROBE_INTERVAL)
            now = loop.time()
            self.lag.record(now - start - LAG_PROBE_INTERVAL, now)

    def overloaded(self) -> bool:
        return self.lag.overloaded(asyncio.get_running_loop().time())

    def opened(self, session_id: str) -> bool:
        """The connection is open: True when it is its user's first cluster-wide."""
        self.admitted.discard(session_id)
        return self.counts.pop(session_id, 0) == 1


class LagMeter:
    """How late the node's event loop runs: the node's own measure of overload.

    A probe that should wake every few tens of milliseconds reports how late it woke
    (:meth:`record`); :meth:`overloaded` is true while the worst lateness of the last
    ``horizon`` seconds is over ``limit``. A saturated loop (fan-out, handshakes, anything)
    makes every new handshake wait behind the work already queued; past the limit the
    node says 503 at once instead, so that what it accepts finishes while its client
    still waits. Pure: no clock of its own.
    """

    __slots__ = ("_at", "_worst", "horizon", "limit")

    def __init__(self, limit: float, horizon: float = 1.0) -> None:
        self.limit = limit
        self.horizon = horizon
        self._worst = 0.0
        self._at = 0.0

    def record(self, lateness: float, now: float) -> None:
        if lateness >= self._worst or now - self._at > self.horizon:
            self._worst = max(0.0, lateness)
            self._at = now

    def lag(self, now: float) -> float:
        """The worst lateness seen within the horizon (0 when none)."""
        return self._worst if now - self._at <= self.horizon else 0.0

    def overloaded(self, now: float) -> bool:
        return self.limit > 0 and self.lag(now) > self.limit
