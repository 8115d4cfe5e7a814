"""The ``activity`` channel's presence, and ``server.shutdown``.

``activity.presence`` `{online, offline}` (contract v1.1 §11) follows a user's first
connection cluster-wide and their last close, from the broker's connection counts: the
node that saw the count go 0 → 1 (or 1 → 0) reports it, so no two nodes report the same
change. Changes are coalesced by :class:`~revenge_ws.core.presence.PresenceCoalescer`
(one publication per ``activity.presence_window`` per node, net changes only) and an
offline report waits ``activity.offline_grace``.

Across nodes a user may close on one node and come back on another within the grace.
The node where they left writes an *away mark* ``presence:away:{user}`` = the grace's end
(wall-clock ms) in the broker's key-value store:

* the node where they come back drops them from its online batch when the mark's end is
  later than their arrival (one ``get_values`` per batch, not one call per user);
* the node where they left reports them offline only if, at the end of its grace, they
  have no connection anywhere and the mark is still its own (a later close elsewhere owns
  the report).

A node that stops (SIGTERM) starts no grace for the users it closes (they are coming
back; a restart must not flap) but writes all their marks before it closes anyone, so
the node they come back to stays quiet. Hence a user who does not come back after their
node stopped, or whose node died (SIGKILL: their connections expire from the broker
after the presence TTL), is not reported offline. Node clocks are assumed to agree to
well within the grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from ..core.connection import Connection
from ..core.node import Node
from ..core.presence import PresenceCoalescer
from ..exceptions import BrokerUnavailable

__all__ = ["PresenceFeed", "install"]

log = logging.getLogger("revenge_ws.activity")
#: Away marks outlive the grace by this much, so a batch flushed one window after an
#: arrival still finds the mark it needs (s).
MARK_SLACK = 5.0
#: Offline candidates checked against the broker per round (bounds one round's work).
CHECK_BATCH = 500
#: What one publication's names may cost this node in writes (bytes, all subscribers
#: together), the size of one named user in it, and the fewest names a publication has.
WINDOW_BYTES = 4_000_000
ENTRY_BYTES = 48
MIN_USERS = 10


def _mark(user_id: str) -> str:
    return f"presence:away:{user_id}"


class PresenceFeed:
    """Drives one node's :class:`PresenceCoalescer`: feeds it from the node's hooks,
    checks graces against the cluster, publishes ``activity.presence``."""

    def __init__(self, node: Node, *, clock: Callable[[], float] = time.time) -> None:
        cfg = node.settings.activity
        self.node = node
        self.clock = clock
        self.coalescer = PresenceCoalescer(cfg.presence_window, cfg.offline_grace)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- hooks -------------------------------------------------------------------------
    async def online(self, conn: Connection) -> None:
        self.coalescer.online(conn.user_id, conn.claims.display_name, self.clock())
        self._kick()

    async def offline(self, conn: Connection) -> None:
        node, co = self.node, self.coalescer
        if node.closing:
            return  # a restart, not a departure: stop() wrote every user's mark already
        deadline = co.offline(conn.user_id, conn.claims.display_name, self.clock())
        self._kick()
        with contextlib.suppress(BrokerUnavailable):
            await node.call(
                node.broker.set_value(
                    _mark(conn.user_id), _ms(deadline), deadline - self.clock() + self._slack
                )
            )

    @property
    def _slack(self) -> float:
        return self.coalescer.window + MARK_SLACK

    def max_users(self) -> int:
        """Users a publication names per list: ``activity.presence_max_users``, fewer when
        this node has so many subscribers on ``activity`` that naming them all would
        write more than :data:`WINDOW_BYTES` (each name goes to every subscriber)."""
        subscribers = len(self.node.hub.channels.get("activity", ()))
        by_bytes = WINDOW_BYTES // (ENTRY_BYTES * max(1, subscribers))
        return max(MIN_USERS, min(self.node.settings.activity.presence_max_users, by_bytes))

    async def stop(self) -> None:
        """Publish the open batch now; forget the graces (a restart is not an absence);
        mark every local user away before any of them is told to reconnect."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.coalescer.drop_graces()
        await self._publish(force=True)
        await self._mark_restart()

    async def _mark_restart(self) -> None:
        """The node restarts: its users are coming back, not leaving. Their marks tell
        the node they come back to that they never left; each lasts the spread window
        they are told to come back within, plus the grace. Written here, before the
        closes, because a mark written at each close would race the reconnect it is
        about: the client may already be counted on another node by then."""
        node = self.node
        if node.broker_in_process or not node.hub.by_user:
            return  # an in-process broker dies with this process: nobody would read it
        deadline = self.clock() + node.stop_window + self.coalescer.grace
        marks = {_mark(user): _ms(deadline) for user in node.hub.by_user}
        with contextlib.suppress(BrokerUnavailable):
            await node.call(node.broker.set_values(marks, deadline - self.clock() + self._slack))

    # -- the driver --------------------------------------------------------------------
    def _kick(self) -> None:
        if self._task is None or self._task.done():
            self._task = self.node.spawn(self._run(), name="activity-presence")
        self._wake.set()

    async def _run(self) -> None:
        """Sleep until the coalescer has something due, then do it; end when idle."""
        while True:
            wakeup = self.coalescer.next_wakeup()
            if wakeup is None:
                return  # nothing pending: the next hook starts a new task
            self._wake.clear()
            delay = wakeup - self.clock()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                continue  # woken early: the wake-up time may have moved
            try:
                await self._check_graces()
                await self._publish()
            except BrokerUnavailable as exc:
                # Retried at the next wake-up (the batch and the graces are kept).
                log.warning("presence: broker unavailable: %s", exc)
                await asyncio.sleep(self.coalescer.window)

    async def _check_graces(self) -> None:
        co = self.coalescer
        due = co.due(self.clock())
        done = 0
        try:
            for i in range(0, len(due), CHECK_BATCH):
                chunk = due[i : i + CHECK_BATCH]
                keys = [_mark(u) for u, _ in chunk]
                marks = await self.node.call(self.node.broker.get_values(keys))
                for (user, deadline), mark in zip(chunk, marks, strict=True):
                    if mark is not None and mark != _ms(deadline):
                        co.cancel_offline(user, deadline)  # a later close elsewhere owns it
                    elif await self.node.call(self.node.broker.presence.connection_count(user)):
                        co.cancel_offline(user, deadline)  # connected again somewhere
                    else:
                        co.confirm_offline(user, deadline, self.clock())
                    done += 1
        finally:
            if done < len(due):
                co.requeue(due[done:])

    async def _publish(self, *, force: bool = False) -> None:
        co = self.coalescer
        now = self.clock()
        if not force and not co.flush_due(now):
            return
        arrivals = co.online_since()
        if arrivals:
            users = list(arrivals)
            marks = await self.node.call(self.node.broker.get_values([_mark(u) for u in users]))
            for user, mark in zip(users, marks, strict=True):
                if mark is not None and float(mark) > arrivals[user] * 1000:
                    co.suppress_online(user)  # still in its grace on the node they left
        change = co.flush(now, force=force)
        if change is None:
            return
        data = change.data(self.max_users())
        await self.node.publish("activity", "activity.presence", data)


def _ms(seconds: float) -> str:
    return repr(round(seconds * 1000, 3))


def install(node: Node) -> PresenceFeed | None:
    async def shutdown() -> None:
        # Admins see the node go (contract §3: server.shutdown on the server channel).
        await node.publish(
            "server", "server.shutdown", {"node_id": node.node_id, "reason": "restart"}
        )

    node.on_stop.append(shutdown)
    if not node.settings.activity.presence:
        return None
    feed = PresenceFeed(node)
    node.on_user_online.append(feed.online)
    node.on_user_offline.append(feed.offline)
    node.on_stop.append(feed.stop)
    return feed
