"""The Redis broker's pub/sub link: one connection per node, kept up for as long as the
broker runs.

:class:`LinkKeeper` builds the link, subscribes everything the broker wants, confirms it,
watches it with a heartbeat and rebuilds it after any failure with a bounded, jittered
backoff. It knows nothing about publications: it hands every message to the broker
(``on_message``) and tells it when a link is ready (``on_ready``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..exceptions import BrokerUnavailable

__all__ = ["SUBSCRIBE_BATCH", "LinkKeeper", "PubSubLink"]

log = logging.getLogger("revenge_ws.broker.redis")

#: Channels per SUBSCRIBE command when a link (re)subscribes everything.
SUBSCRIBE_BATCH = 1000
#: Longest the listener sleeps on an idle link between heartbeat checks.
POLL_INTERVAL = 1.0
#: A link that stayed up this long resets the reconnect backoff to its minimum.
STABLE_LINK = 5.0


class PubSubLink:
    """One pub/sub connection and what is in flight on it.

    Only the keeper's task reads from it; ``subscribe``/``unsubscribe`` write to it.
    """

    def __init__(self, conn: AbstractConnection) -> None:
        self.conn = conn
        #: Channels of the initial SUBSCRIBE not confirmed yet; ready when empty.
        self.initial: set[bytes] = set()
        self.subscribed_at_start: set[bytes] = set()
        self.ready = False
        self.ready_at = 0.0
        self.waiters: dict[bytes, list[asyncio.Future[None]]] = {}
        #: SUBSCRIBE / UNSUBSCRIBE asked for during this loop iteration, in order: sent
        #: together (one command per run of the same kind), not one write per channel.
        self._outgoing: list[tuple[str, bytes]] = []
        self._senders: set[asyncio.Task[None]] = set()

    async def send(self, *args: Any) -> None:
        # A disconnected redis-py connection would silently reconnect on send, without
        # our subscriptions: refuse, and let the keeper rebuild the link instead.
        if not self.conn.is_connected:
            raise RedisConnectionError("pub/sub link is closed")
        await self.conn.send_command(*args, check_health=False)

    async def subscribe(self, rch: bytes) -> None:
        """SUBSCRIBE and wait until Redis confirms it (so a history read after this
        call cannot miss a publication that pub/sub did not deliver)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.setdefault(rch, []).append(fut)
        try:
            self._queue("SUBSCRIBE", rch)
            await fut
        finally:
            waiting = self.waiters.get(rch)
            if waiting is not None and fut in waiting:
                waiting.remove(fut)
                if not waiting:
                    del self.waiters[rch]

    def unsubscribe(self, rch: bytes) -> None:
        """UNSUBSCRIBE (sent at the end of this loop iteration; nobody waits for it)."""
        self._queue("UNSUBSCRIBE", rch)

    def _queue(self, command: str, rch: bytes) -> None:
        if not self.conn.is_connected:
            raise RedisConnectionError("pub/sub link is closed")
        self._outgoing.append((command, rch))
        if len(self._outgoing) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        out, self._outgoing = self._outgoing, []
        runs: list[tuple[str, list[bytes]]] = []
        for command, rch in out:
            if runs and runs[-1][0] == command and len(runs[-1][1]) < SUBSCRIBE_BATCH:
                runs[-1][1].append(rch)
            else:
                runs.append((command, [rch]))
        task = asyncio.create_task(self._send_runs(runs))
        self._senders.add(task)
        task.add_done_callback(self._senders.discard)

    async def _send_runs(self, runs: list[tuple[str, list[bytes]]]) -> None:
        for i, (command, channels) in enumerate(runs):
            try:
                await self.send(command, *channels)
            except BaseException as exc:
                # The link is broken (the keeper rebuilds it): every subscribe still to be
                # sent fails now, as a direct send would have.
                failure = exc if isinstance(exc, Exception) else RedisConnectionError("closed")
                for later, chans in runs[i:]:
                    if later == "SUBSCRIBE":
                        for rch in chans:
                            for fut in self.waiters.get(rch, ()):
                                if not fut.done():
                                    fut.set_exception(failure)
                if not isinstance(exc, Exception):
                    raise
                return

    def confirmed(self, rch: bytes) -> None:
        self.initial.discard(rch)
        # Every waiter of the channel is satisfied: the channel is subscribed now.
        for fut in self.waiters.pop(rch, ()):
            if not fut.done():
                fut.set_result(None)

    def fail(self, exc: BaseException) -> None:
        for waiting in self.waiters.values():
            for fut in waiting:
                if not fut.done():
                    fut.set_exception(exc)
        self.waiters.clear()

    async def close(self) -> None:
        for task in list(self._senders):
            task.cancel()
        with contextlib.suppress(Exception):
            await self.conn.disconnect(nowait=True)


class LinkKeeper:
    """Keeps one :class:`PubSubLink` up (see the module doc).

    ``wanted()`` names every pub/sub channel the link must carry (read when a link is
    built and once it is ready); ``on_ready(reconnected)`` runs when a link's initial
    SUBSCRIBE is confirmed.
    """

    def __init__(
        self,
        *,
        make_connection: Callable[[], AbstractConnection],
        wanted: Callable[[], Iterable[bytes]],
        on_message: Callable[[bytes, bytes], None],
        on_ready: Callable[[bool], None],
        timeout: float,
        heartbeat: float,
        reconnect_min: float,
        reconnect_max: float,
    ) -> None:
        self._make_connection = make_connection
        self._wanted = wanted
        self._on_message = on_message
        self._on_ready = on_ready
        self.timeout = timeout
        self.heartbeat = heartbeat
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self._poll = min(POLL_INTERVAL, heartbeat / 2, timeout / 2)
        self.link: PubSubLink | None = None
        self.down = True
        self.ever_linked = False
        #: Set to cut the current backoff short (Redis answers again).
        self.wake = asyncio.Event()
        self.first_attempt: asyncio.Future[None] | None = None

    def ready_link(self) -> PubSubLink:
        """The link, when it is up; raises ``BrokerUnavailable`` otherwise."""
        link = self.link
        if link is None or not link.ready:
            raise BrokerUnavailable("redis pub/sub link is down (reconnecting)")
        return link

    def settle_first_attempt(self) -> None:
        fut = self.first_attempt
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def run(self) -> None:
        """Keep one pub/sub link up until cancelled."""
        delay = self.reconnect_min
        outage_started: float | None = None
        while True:
            self.wake.clear()
            link = PubSubLink(self._make_connection())
            try:
                await self._open(link)
                self.link = link
                await self._read(link)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error: BaseException = exc
            else:  # pragma: no cover - _read only returns by raising
                error = RedisConnectionError("pub/sub link ended")
            finally:
                self.link = None
                self.down = True
                link.fail(BrokerUnavailable("redis pub/sub link lost"))
                await link.close()
            self.settle_first_attempt()
            if link.ready and time.monotonic() - link.ready_at >= STABLE_LINK:
                delay = self.reconnect_min
            expected = isinstance(error, RedisError | OSError | TimeoutError)
            if not expected:
                log.error("redis pub/sub listener failed", exc_info=error)
            elif outage_started is None or link.ready:
                # Once per outage: the retries that follow log at debug level.
                outage_started = time.monotonic()
                what = "lost" if self.ever_linked else "cannot connect"
                log.warning("redis pub/sub link %s (%s); reconnecting", what, error)
            else:
                log.debug("redis pub/sub reconnect failed: %s", error)
            pause = random.uniform(delay / 2, delay)
            delay = min(delay * 2, self.reconnect_max)
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
            # cancellation that arrives as the wait ends, and this loop would go on.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self.wake.wait()

    async def _open(self, link: PubSubLink) -> None:
        async with asyncio.timeout(self.timeout):
            await link.conn.connect()  # type: ignore[no-untyped-call]
        # The snapshot the link starts with; channels subscribed from now on go through
        # subscribe(), which refuses until the link is ready.
        wanted = list(self._wanted())
        link.initial = set(wanted)
        link.subscribed_at_start = set(wanted)
        for i in range(0, len(wanted), SUBSCRIBE_BATCH):
            await link.send("SUBSCRIBE", *wanted[i : i + SUBSCRIBE_BATCH])

    async def _read(self, link: PubSubLink) -> None:
        loop = asyncio.get_running_loop()
        ready_by = loop.time() + self.timeout
        last_rx = loop.time()
        ping_sent: float | None = None
        while True:
            # A bounded read that returns None when idle keeps the heartbeat going; the
            # parser keeps a partly read reply across such timeouts.
            resp = await link.conn.read_response(timeout=self._poll)
            now = loop.time()
            if resp is None:
                if not link.ready and now > ready_by:
                    raise RedisTimeoutError("SUBSCRIBE not confirmed in time")
                if ping_sent is not None:
                    if now - ping_sent > self.timeout:
                        raise RedisTimeoutError("pub/sub heartbeat not answered")
                elif now - last_rx >= self.heartbeat:
                    await link.send("PING")
                    ping_sent = now
                continue
            last_rx = now
            ping_sent = None
            if not isinstance(resp, list) or len(resp) < 2:
                continue
            kind = resp[0]
            if kind == b"message" and len(resp) >= 3:
                self._on_message(resp[1], resp[2])
            elif kind == b"subscribe":
                link.confirmed(resp[1])
                if not link.ready and not link.initial:
                    await self._ready(link)

    async def _ready(self, link: PubSubLink) -> None:
        link.ready = True
        link.ready_at = time.monotonic()
        self.down = False
        reconnected = self.ever_linked
        self.ever_linked = True
        self.settle_first_attempt()
        # Channels unsubscribed while the link was being built: drop them on Redis too.
        stale = link.subscribed_at_start - set(self._wanted())
        if stale:
            await link.send("UNSUBSCRIBE", *stale)
        self._on_ready(reconnected)
