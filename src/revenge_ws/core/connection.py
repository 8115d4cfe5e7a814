"""One client connection as the core sees it: session, outbox, subscriptions.

The transport is an adapter (aiohttp in production, a list in unit tests). Writes are
coalesced: frames queued during one event-loop iteration leave in a single ``write()``,
which is where most of a hub's CPU goes (one syscall per message per client otherwise).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..auth import Claims
from ..codes import CloseCode
from ..protocol import frame_text
from .outbox import Outbox
from .session import Session

__all__ = ["Connection", "Flusher", "Loop", "SubState", "Transport"]

#: Above this many bytes in the transport's own buffer we stop writing and let the
#: outbox hold (and conflate) frames until the kernel takes more.
HIGH_WATER = 64 * 1024
#: At most this much leaves in one write, so one connection cannot hog the loop.
WRITE_CHUNK = 256 * 1024
#: How often a backpressured connection retries its flush (s).
RETRY_DELAY = 0.01


#: A push this far below the outbox limit cannot fail whatever the transport holds
#: (flush never lets the transport hold more than HIGH_WATER + WRITE_CHUNK + a ping).
_NO_CHECK_SLACK = HIGH_WATER + WRITE_CHUNK + 4096


#: A flush pass at least this long (s) is a large fan-out...
SATURATED_PASS = 0.001
#: ...and when the next one is asked for sooner than half the time the last one took
#: (the loop flushing two thirds of the time or more), the hub is saturated: the next pass
#: waits about one pass (at most this, s) so that the frames of the publications handled
#: meanwhile leave in the same writes. (Half, not all of it: a pass slowed down by a busy
#: machine must not make a 20/s stream wait.)
MAX_FLUSH_DELAY = 0.005


class Flusher:
    """Flushes every connection that queued frames, in ONE loop callback per iteration
    (instead of one call_soon handle per connection).

    Under saturation (the loop busy flushing two thirds of the time or more) the next pass is
    deferred by up to one pass: a delivery then shares its ``write()`` with the following
    publications' (the syscall is ~2/3 of a delivery's cost). Below that, nothing waits.

    A *lingering* delivery (:meth:`add_lazy`, asked for during a reconnect storm) waits up
    to ``linger`` seconds in its connection's outbox, so that the publications of that
    time leave in one ``write()``, unless something else (a reply) flushes the connection
    first. ``linger`` 0: nothing lingers."""

    __slots__ = (
        "_clock",
        "_ended",
        "_lazy",
        "_lazy_scheduled",
        "_loop",
        "_pass",
        "_pending",
        "_scheduled",
        "linger",
    )

    def __init__(
        self, loop: Any, clock: Callable[[], float] = time.perf_counter, linger: float = 0.0
    ) -> None:
        self._loop = loop
        self._clock = clock
        self._pending: list[Connection] = []
        self._scheduled = False
        self._pass = 0.0
        self._ended = 0.0
        self.linger = linger
        self._lazy: list[Connection] = []
        self._lazy_scheduled = False

    def add(self, conn: Connection) -> None:
        self._pending.append(conn)
        if not self._scheduled:
            self._scheduled = True
            last = self._pass
            if last >= SATURATED_PASS and self._clock() - self._ended < last / 2:
                self._loop.call_later(min(last, MAX_FLUSH_DELAY), self._run)
            else:
                self._loop.call_soon(self._run)

    def add_lazy(self, conn: Connection) -> None:
        self._lazy.append(conn)
        if not self._lazy_scheduled:
            self._lazy_scheduled = True
            self._loop.call_later(self.linger, self._run_lazy)

    def _run(self) -> None:
        pending, self._pending = self._pending, []
        self._scheduled = False
        t0 = self._clock()
        for conn in pending:
            conn.flush()
        self._ended = self._clock()
        self._pass = self._ended - t0

    def _run_lazy(self) -> None:
        lazy, self._lazy = self._lazy, []
        self._lazy_scheduled = False
        for conn in lazy:
            if conn._lazy_pending:  # else a reply flushed it meanwhile
                conn.flush()


class Transport(Protocol):
    """The I/O side of a connection, implemented by the WebSocket adapter."""

    def write(self, data: bytes) -> None:
        """Write complete WebSocket frames; never blocks, never raises."""

    def buffered(self) -> int:
        """Bytes written but not yet accepted by the kernel."""
        ...

    def close(self, code: int, reason: str) -> None:
        """Start the close handshake (asynchronously); idempotent."""

    def ping(self) -> None:
        """Send a WebSocket ping frame."""


class Loop(Protocol):
    """The two scheduling calls the core needs (an asyncio loop, or a fake in tests)."""

    def call_soon(self, callback: Callable[..., object], *args: Any) -> Any: ...

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> Any: ...


@dataclass(slots=True)
class SubState:
    """A connection's position on one channel; ``pending`` buffers live publications
    while a recovery is in progress, so they can follow the history without a gap."""

    epoch: str
    seq: int
    pending: list[Any] | None = None
    overflow: bool = False


@dataclass(eq=False, slots=True)
class Connection:
    session_id: str
    claims: Claims
    session: Session
    transport: Transport
    loop: Loop
    outbox: Outbox
    node_id: str = ""
    opened_at: float = field(default_factory=time.monotonic)
    subs: dict[str, SubState] = field(default_factory=dict)
    closed: bool = False
    close_code: int | None = None
    close_reason: str = ""
    on_slow: Callable[[Connection], None] | None = None
    _flush_pending: bool = False
    _lazy_pending: bool = False
    last_ping: float = 0.0
    sent_messages: int = 0
    flusher: Flusher | None = None

    @property
    def user_id(self) -> str:
        return self.claims.sub

    # -- sending -------------------------------------------------------------------
    def send(self, payload: bytes) -> bool:
        """Queue one JSON message (a reply or direct message)."""
        return self.send_frame(frame_text(payload))

    def send_frame(self, frame: bytes, lazy: bool = False) -> bool:
        """Queue one frame; ``lazy``: it may linger (see :class:`Flusher`)."""
        if self.closed:
            return False
        ob = self.outbox
        if ob.nbytes + len(frame) <= ob.limit - _NO_CHECK_SLACK:
            ob.append(frame)
        elif not ob.push(frame, extra=self.transport.buffered()):
            self._slow()
            return False
        self._schedule(lazy)
        return True

    def send_latest(self, key: str, frame: bytes, lazy: bool = False) -> bool:
        if self.closed:
            return False
        if not self.outbox.push_latest(key, frame, extra=self.transport.buffered()):
            self._slow()
            return False
        self._schedule(lazy)
        return True

    def _schedule(self, lazy: bool = False) -> None:
        if self._flush_pending:
            return
        fl = self.flusher
        if lazy and fl is not None and fl.linger > 0:
            if not self._lazy_pending:
                self._lazy_pending = True
                fl.add_lazy(self)
            return
        self._flush_pending = True
        if fl is not None:
            fl.add(self)
        else:
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write what is queued, in as few writes as the transport allows."""
        self._flush_pending = False
        self._lazy_pending = False
        ob = self.outbox
        if self.closed or not ob:
            return
        if self.transport.buffered() > HIGH_WATER:
            self._flush_pending = True
            self.loop.call_later(RETRY_DELAY, self.flush)
            return
        if len(ob) == 1:
            self.sent_messages += 1
            self.transport.write(ob.pop_one())
            return
        frames = ob.drain(WRITE_CHUNK)
        self.sent_messages += len(frames)
        self.transport.write(b"".join(frames))
        if ob:
            self._flush_pending = True
            self.loop.call_later(RETRY_DELAY, self.flush)

    def _slow(self) -> None:
        # Never close synchronously: we may be inside the hub's fan-out loop.
        if self.on_slow is not None:
            self.loop.call_soon(self.on_slow, self)
        else:
            self.close(CloseCode.SLOW_CONSUMER, "slow consumer")

    def close(self, code: int, reason: str) -> None:
        """Flush what is queued, then close with ``code``. Idempotent."""
        if self.closed:
            return
        if code != CloseCode.SLOW_CONSUMER and self.outbox:
            # Replies queued before the close must arrive before the close frame.
            self.flush_all()
        self.closed = True
        self.close_code = code
        self.close_reason = reason
        self.transport.close(code, reason)

    def flush_all(self) -> None:
        while self.outbox:
            frames = self.outbox.drain()
            self.transport.write(b"".join(frames))
