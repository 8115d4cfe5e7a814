"""Subscriptions: a connection's place in each channel's stream.

What :class:`Subscriptions` guarantees, per channel and connection: no gap and no
duplicate. Attaching takes the channel's position (or recovers from ``since``) while live
publications are buffered, then sends the missed ones and the buffer in order
(:meth:`Subscriptions.attach`). A gap seen later in the live stream (pub/sub is
at-most-once) is filled from history, or the client is told ``subscription.reset``
(:meth:`Subscriptions.on_gap`); after a broker outage every channel is re-checked with one
history read per channel, not per connection (:meth:`Subscriptions.recover_all`).
Presence entries of non-personal channels follow subscriptions.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from ..broker.base import HistoryResult, PresenceInfo, Publication
from ..codes import ErrorCode
from ..exceptions import BrokerUnavailable, RequestError
from ..protocol import StreamPosition, encode_message
from .channels import LATEST_VALUE, is_personal, parse_channel
from .connection import Connection, SubState

if TYPE_CHECKING:
    from .node import Node, Request

__all__ = ["Subscriptions"]

#: Channels re-checked against history at once after a broker outage, and tries per channel.
RECOVERY_CONCURRENCY = 16
RECOVERY_ATTEMPTS = 5


def _since(value: Any, name: str) -> StreamPosition | None:
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or not isinstance(value.get("epoch"), str)
        or not isinstance(value.get("seq"), int)
        or isinstance(value.get("seq"), bool)
        or value["seq"] < 0
    ):
        raise RequestError(
            ErrorCode.INVALID_MESSAGE, f"'since' of {name} must be {{epoch: str, seq: int >= 0}}"
        )
    return StreamPosition(value["epoch"], value["seq"])


class Subscriptions:
    """The node's subscription logic (the hub keeps who is subscribed to what)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        #: Catch-ups in progress, by ``session_id NUL channel``.
        self.recovering: set[str] = set()

    async def attach(
        self,
        conn: Connection,
        name: str,
        since: StreamPosition | None,
        *,
        replay_latest: bool = False,
    ) -> tuple[dict[str, Any], Callable[[], None]]:
        """Subscribe ``conn`` to ``name`` (policy already checked).

        Live publications are buffered from the moment the node listens until the
        returned ``finish`` runs, which sends the missed ones and then the buffer:
        per channel and connection, no gap and no duplicate.
        """
        state = SubState(epoch="", seq=0, pending=[])
        old = conn.subs.get(name)
        if self.node.hub.subscribe(conn, name, state):
            try:
                await self.node.call(self.node.broker.subscribe(name))
            except BaseException:
                self.node.hub.unsubscribe(conn, name)
                raise
        try:
            chan = parse_channel(name)
            latest_wanted = chan.family in LATEST_VALUE
            res = await self.node.call(self.node.broker.history(name, since, 0))
            latest_pub: Publication | None = None
            if latest_wanted:
                top = await self.node.call(self.node.broker.history(name, None, 1))
                latest_pub = top.publications[-1] if top.publications else None
        except BaseException:
            if old is not None:
                self.node.hub.subscribe(conn, name, old)
            elif self.node.hub.unsubscribe(conn, name):
                with contextlib.suppress(BrokerUnavailable):
                    await self.node.call(self.node.broker.unsubscribe(name))
            raise
        missed: list[Publication] = []
        if since is not None and res.recovered:
            state.epoch, state.seq = since.epoch, since.seq
            missed = res.publications
        elif replay_latest and latest_pub is not None and latest_pub.epoch == res.position.epoch:
            # Subscribed by the server (a job started): the latest value follows at once.
            state.epoch, state.seq = latest_pub.epoch, latest_pub.seq - 1
            missed = [latest_pub]
        else:
            state.epoch, state.seq = res.position.epoch, res.position.seq
        entry: dict[str, Any] = {
            "channel": name,
            "epoch": res.position.epoch,
            "seq": res.position.seq,
            "recovered": since is not None and res.recovered,
            "missed": len(missed),
        }
        if latest_wanted:
            entry["latest"] = orjson.loads(latest_pub.payload) if latest_pub else None
        if old is None and not is_personal(name):
            self.node.spawn(self._presence_add(conn, name), name=f"presence-{conn.session_id}")

        def finish() -> None:
            for pub in missed:
                self.node.hub.deliver_to(conn, pub)
            self.drain_pending(conn, name, state)

        return entry, finish

    def drain_pending(self, conn: Connection, name: str, state: SubState) -> None:
        pending, state.pending = state.pending or [], None
        for pub in pending:
            if pub.epoch == state.epoch and pub.seq <= state.seq:
                continue
            if pub.epoch != state.epoch or pub.seq != state.seq + 1:
                self.on_gap(conn, name)
                return
            self.node.hub.deliver_to(conn, pub)
        if state.overflow:
            state.overflow = False
            self.on_gap(conn, name)

    async def _presence_add(self, conn: Connection, name: str) -> None:
        # This runs as a task: an unsubscribe or a close processed before it (pipelined
        # frames) has already removed the entry, so adding it now would leave it forever.
        if conn.closed or name not in conn.subs:
            return
        info = PresenceInfo(conn.user_id, conn.claims.display_name, self.node.node_id)
        await self.node.call(self.node.broker.presence.add(name, conn.session_id, info))
        if conn.closed or name not in conn.subs:  # removed while the add was in flight
            await self.presence_remove(name, conn.session_id)

    async def handle_subscribe(self, req: Request) -> dict[str, Any]:
        items = req.data.get("channels")
        if not isinstance(items, list) or not items:
            raise RequestError(ErrorCode.INVALID_MESSAGE, "'channels' must be a non-empty list")
        limit = self.node.settings.limits.channels_per_connection
        if len(items) > limit:
            raise RequestError(ErrorCode.TOO_LARGE, f"at most {limit} channels per request")
        conn = req.conn
        results: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for item in items:
            name = item.get("name") if isinstance(item, dict) else item
            try:
                since = _since(item.get("since"), str(name)) if isinstance(item, dict) else None
                chan = parse_channel(name)
                if chan.name not in conn.subs and len(conn.subs) >= limit:
                    raise RequestError(
                        ErrorCode.TOO_LARGE, f"at most {limit} channels per connection"
                    )
                await self.node.policy.check(conn.claims, chan)
                entry, finish = await self.attach(conn, chan.name, since)
            except RequestError as exc:
                errors.append({"channel": name, "code": exc.code.value, "message": exc.message})
                continue
            results.append(entry)
            req.after_reply.append(finish)
        return {"subscriptions": results, "errors": errors}

    async def handle_unsubscribe(self, req: Request) -> dict[str, Any]:
        items = req.data.get("channels")
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise RequestError(ErrorCode.INVALID_MESSAGE, "'channels' must be a list of names")
        removed = []
        for name in items:
            if name in req.conn.subs:
                removed.append(name)
                await self.unsubscribe(req.conn, name)
        return {"channels": removed}

    async def subscribe(self, conn: Connection, name: str) -> dict[str, Any]:
        """Subscribe a connection on the server's initiative (room join, job start).

        The client is told with a ``subscription.added`` direct message (its position, so
        it can recover the channel after a reconnect); a latest-value channel's newest
        publication follows it at once.
        """
        entry, finish = await self.attach(conn, name, None, replay_latest=True)
        conn.send(encode_message("subscription.added", entry))
        finish()
        return entry

    async def unsubscribe(self, conn: Connection, name: str) -> None:
        if self.node.hub.unsubscribe(conn, name):
            with contextlib.suppress(BrokerUnavailable):
                await self.node.call(self.node.broker.unsubscribe(name))
        with contextlib.suppress(BrokerUnavailable):
            await self.presence_remove(name, conn.session_id)

    async def presence_remove(self, name: str, session_id: str) -> None:
        # Personal channels keep no entries (their presence is the connection count).
        if not is_personal(name):
            await self.node.call(self.node.broker.presence.remove(name, session_id))

    async def presence(self, channel: str) -> list[dict[str, Any]]:
        """Who is on ``channel`` (cluster-wide): ``[{user_id, name, connections}]``.

        A personal channel's presence is its user's open connections (see
        :data:`~revenge_ws.core.channels.PERSONAL`); the name is the display name
        when the user has a connection on this node, else the user id.
        """
        if is_personal(channel):
            user_id = channel.partition(":")[2]
            count = await self.node.call(self.node.broker.presence.connection_count(user_id))
            if count <= 0:
                return []
            local = next(iter(self.node.hub.user_connections(user_id)), None)
            name = local.claims.display_name if local is not None else user_id
            return [{"user_id": user_id, "name": name, "connections": count}]
        members = await self.node.call(self.node.broker.presence.members(channel))
        users: dict[str, dict[str, Any]] = {}
        for info in members.values():
            u = users.setdefault(info.user_id, {"user_id": info.user_id, "name": info.name})
            u["connections"] = u.get("connections", 0) + 1
        return list(users.values())

    # -- recovery ------------------------------------------------------------------------
    def on_gap(self, conn: Connection, channel: str) -> None:
        key = f"{conn.session_id}\0{channel}"
        if key in self.recovering or conn.closed:
            return
        self.recovering.add(key)
        st = conn.subs.get(channel)
        if st is not None and st.pending is None:
            st.pending = []
        self.node.spawn(self._recover(conn, channel, key), name=f"recover-{channel}")

    async def _recover(self, conn: Connection, channel: str, key: str) -> None:
        try:
            st = conn.subs.get(channel)
            if st is None:
                return
            try:
                res = await self.node.call(
                    self.node.broker.history(channel, StreamPosition(st.epoch, st.seq), 0)
                )
            except BrokerUnavailable:
                # Try again when the broker is back (on_reconnect re-checks everyone).
                st.pending = None
                return
            if conn.subs.get(channel) is not st:
                return  # re-subscribed meanwhile: that subscription recovers itself
            self.recovering.discard(key)
            self._catch_up(conn, channel, st, res)
        finally:
            self.recovering.discard(key)

    def _catch_up(self, conn: Connection, channel: str, st: SubState, res: HistoryResult) -> None:
        """Send what ``res`` proves ``conn`` missed, or tell it the gap cannot be filled;
        then release the live publications buffered meanwhile."""
        if st.epoch == res.position.epoch and (res.recovered or st.seq == res.position.seq):
            for pub in res.publications:
                self.node.hub.deliver_to(conn, pub)  # skips what it already has
        else:
            st.epoch, st.seq = res.position.epoch, res.position.seq
            conn.send(
                encode_message(
                    "subscription.reset",
                    {
                        "channel": channel,
                        "epoch": st.epoch,
                        "seq": st.seq,
                        "reason": "history does not cover the gap; reload state",
                    },
                )
            )
        self.drain_pending(conn, channel, st)

    async def recover_all(self) -> None:
        """After a broker outage: one history read per channel (not per connection),
        a bounded number at a time, each retried with backoff."""
        sem = asyncio.Semaphore(RECOVERY_CONCURRENCY)

        async def one(channel: str) -> None:
            async with sem:
                await self._recover_channel(channel)

        await asyncio.gather(*(one(ch) for ch in list(self.node.hub.channels)))

    async def _recover_channel(self, channel: str) -> None:
        subs = self.node.hub.channels.get(channel)
        if not subs:
            return
        targets: list[tuple[Connection, SubState, str]] = []
        for conn, st in list(subs.items()):
            key = f"{conn.session_id}\0{channel}"
            if key in self.recovering or st.pending is not None or conn.closed:
                continue  # already catching up on its own
            self.recovering.add(key)
            st.pending = []
            targets.append((conn, st, key))
        try:
            res: HistoryResult | None = None
            for attempt in range(RECOVERY_ATTEMPTS):
                try:
                    top = await self.node.call(self.node.broker.history(channel, None, 0))
                    lows = [st.seq for _, st, _ in targets if st.epoch == top.position.epoch]
                    res = top
                    if lows:
                        since = StreamPosition(top.position.epoch, min(lows))
                        res = await self.node.call(self.node.broker.history(channel, since, 0))
                    break
                except BrokerUnavailable:
                    await asyncio.sleep(min(5.0, 0.2 * 2**attempt))
            for conn, st, key in targets:
                self.recovering.discard(key)
                if conn.subs.get(channel) is not st or conn.closed:
                    continue
                if res is None:
                    st.pending = None  # the broker stayed away; the next gap retries
                elif res.recovered or st.epoch != res.position.epoch:
                    self._catch_up(conn, channel, st, res)
                else:
                    # Too old for the oldest reader: each one checks its own position.
                    st.pending = None
                    self.on_gap(conn, channel)
        finally:
            for _, _, key in targets:
                self.recovering.discard(key)
