"""Cluster-wide presence in Redis: channel members, each user's connections, online users.

Part of the Redis broker (it shares the broker's client, key prefix, timeout and error
policy); :class:`RedisPresence` is reached as ``RedisBroker.presence``. Keys
(``P`` is the prefix, ``C`` a channel, ``U`` a user)::

    P:pres:C          zset    client_id -> expiry (Redis ms)         TTL presence_ttl
    P:presinfo:C      hash    client_id -> {"u", "n", "node"}         TTL presence_ttl
    P:conns:U         zset    client_id -> expiry (Redis ms)         TTL presence_ttl
    P:users           zset    user_id   -> expiry (Redis ms)         TTL presence_ttl
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import orjson

from ..protocol import encode
from .base import PresenceInfo
from .redis_scripts import lua

if TYPE_CHECKING:
    from .redis import RedisBroker

__all__ = ["RedisPresence"]

#: Entries per script call / pipeline when presence is refreshed.
REFRESH_BATCH = 500
#: Client ids whose connection was removed, remembered so that a late ``presence.add``
#: of a closed connection does not register an entry that would be refreshed forever.
RELEASED_MEMORY = 10_000


def _ms(seconds: float) -> int:
    """A positive TTL in ms (Redis refuses 0 for PX/PEXPIRE)."""
    return max(1, int(seconds * 1000))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisPresence:
    """Cluster-wide :class:`~revenge_ws.broker.base.PresenceManager` in Redis.

    Guarantees:

    * Every entry (a channel member, a user's connection, an online user) carries an
      expiry ``presence_ttl`` ahead, in Redis time. The node that added it re-writes it
      every ``presence_refresh`` seconds while it lives, so a SIGKILLed node's entries
      vanish within ``presence_ttl`` without anyone cleaning up; after Redis lost its
      data, live nodes put their entries back within one refresh.
    * ``add_connection`` prunes expired connections, adds this one and counts them in
      one script: concurrent calls from any nodes get distinct counts, so a
      connections-per-user limit checked against the result holds cluster-wide.
    * ``remove_connection(user, client)`` also forgets the channel entries of
      ``client`` (a connection that is gone is on no channel any more).
    """

    def __init__(self, broker: RedisBroker) -> None:
        self._b = broker
        redis = broker._redis
        self._add_conns = redis.register_script(lua("add_conns"))
        self._remove_conn = redis.register_script(lua("remove_conn"))
        self._count_live = redis.register_script(lua("count_live"))
        self._pres_add = redis.register_script(lua("presence_add"))
        self._pres_remove = redis.register_script(lua("presence_remove"))
        self._pres_members = redis.register_script(lua("presence_members"))
        # What this node registered, re-written by the refresh task.
        self._channels: dict[str, dict[str, bytes]] = {}
        self._client_channels: dict[str, set[str]] = {}
        self._conns: dict[str, set[str]] = {}
        self._released: OrderedDict[str, None] = OrderedDict()
        # Removals made while a refresh runs: the refresh may have re-added their entries
        # from its snapshot, so they are replayed once it is done.
        self._removed_meanwhile: list[tuple[Any, list[str], list[Any]]] | None = None

    # -- keys ------------------------------------------------------------------------
    def _kpres(self, channel: str) -> list[str]:
        p = self._b.prefix
        return [f"{p}:pres:{channel}", f"{p}:presinfo:{channel}"]

    def _kconns(self, user_id: str) -> list[str]:
        p = self._b.prefix
        return [f"{p}:conns:{user_id}", f"{p}:users"]

    @property
    def _ttl_ms(self) -> int:
        return _ms(self._b.presence_ttl)

    # -- channel presence --------------------------------------------------------------
    async def add(self, channel: str, client_id: str, info: PresenceInfo) -> None:
        # Kept (and re-written at every refresh) while the connection lives: its own size.
        blob = encode({"u": info.user_id, "n": info.name, "node": info.node_id})
        await self._b._run(
            self._b.batch.script(
                self._pres_add, self._kpres(channel), [self._ttl_ms, client_id, blob]
            )
        )
        if client_id in self._released:
            # The connection was removed while this add was in flight: undo it.
            await self._b._run(
                self._b.batch.script(self._pres_remove, self._kpres(channel), [client_id])
            )
            return
        self._channels.setdefault(channel, {})[client_id] = blob
        self._client_channels.setdefault(client_id, set()).add(channel)

    def _forget(self, channel: str, client_id: str) -> None:
        members = self._channels.get(channel)
        if members is not None:
            members.pop(client_id, None)
            if not members:
                del self._channels[channel]
        chans = self._client_channels.get(client_id)
        if chans is not None:
            chans.discard(channel)
            if not chans:
                del self._client_channels[client_id]

    async def remove(self, channel: str, client_id: str) -> None:
        # Forget locally first: even if Redis is unreachable now, the entry is no longer
        # refreshed and expires by itself.
        self._forget(channel, client_id)
        self._note_removal(self._pres_remove, self._kpres(channel), [client_id])
        await self._b._run(
            self._b.batch.script(self._pres_remove, self._kpres(channel), [client_id])
        )

    def _note_removal(self, script: Any, keys: list[str], args: list[Any]) -> None:
        if self._removed_meanwhile is not None:
            self._removed_meanwhile.append((script, keys, args))

    async def members(self, channel: str) -> dict[str, PresenceInfo]:
        raw = await self._b._run(self._pres_members(self._kpres(channel)))
        out: dict[str, PresenceInfo] = {}
        for i in range(0, len(raw) - 1, 2):
            try:
                info = orjson.loads(raw[i + 1])
                out[_text(raw[i])] = PresenceInfo(
                    str(info["u"]), str(info.get("n", "")), str(info.get("node", ""))
                )
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue  # not written by us: ignore rather than fail the caller
        return out

    # -- connections -------------------------------------------------------------------
    async def add_connection(self, user_id: str, client_id: str) -> int:
        count = await self._b._run(
            self._b.batch.script(
                self._add_conns, self._kconns(user_id), [self._ttl_ms, user_id, client_id]
            )
        )
        # Registered for refreshing only once Redis has it: a failed admission is never
        # released by the node, so it must not be refreshed forever either.
        self._released.pop(client_id, None)
        self._conns.setdefault(user_id, set()).add(client_id)
        return int(count)

    async def remove_connection(self, user_id: str, client_id: str) -> int:
        conns = self._conns.get(user_id)
        if conns is not None:
            conns.discard(client_id)
            if not conns:
                del self._conns[user_id]
        self._released[client_id] = None
        while len(self._released) > RELEASED_MEMORY:
            self._released.popitem(last=False)
        keys = self._kconns(user_id)
        for ch in list(self._client_channels.get(client_id, ())):
            self._forget(ch, client_id)
            keys += self._kpres(ch)
        self._note_removal(self._remove_conn, keys, [client_id, user_id])
        return int(
            await self._b._run(self._b.batch.script(self._remove_conn, keys, [client_id, user_id]))
        )

    async def connection_count(self, user_id: str) -> int:
        return int(
            await self._b._run(
                self._b.batch.script(self._count_live, self._kconns(user_id)[:1], [])
            )
        )

    async def online_users(self) -> int:
        return int(await self._b._run(self._count_live([f"{self._b.prefix}:users"])))

    # -- refresh -------------------------------------------------------------------------
    def _batches(self) -> Iterable[tuple[Any, list[str], list[Any]]]:
        ttl = self._ttl_ms
        for user_id, clients in list(self._conns.items()):
            ids = sorted(clients)
            for i in range(0, len(ids), REFRESH_BATCH):
                chunk = ids[i : i + REFRESH_BATCH]
                yield self._add_conns, self._kconns(user_id), [ttl, user_id, *chunk]
        for channel, members in list(self._channels.items()):
            items = list(members.items())
            for i in range(0, len(items), REFRESH_BATCH):
                args: list[Any] = [ttl]
                for client_id, blob in items[i : i + REFRESH_BATCH]:
                    args += (client_id, blob)
                yield self._pres_add, self._kpres(channel), args

    async def refresh(self) -> None:
        """Push every local entry's expiry ``presence_ttl`` ahead (re-adding lost ones)."""
        self._removed_meanwhile = []
        try:
            await self._pipelined(self._batches())
        finally:
            replay, self._removed_meanwhile = self._removed_meanwhile, None
        if replay:
            await self._pipelined(replay)

    async def forget_all(self) -> None:
        """Remove every entry this node registered (at shutdown)."""
        calls: list[tuple[Any, list[str], list[Any]]] = []
        for user_id, clients in self._conns.items():
            for client_id in clients:
                keys = self._kconns(user_id)
                for ch in self._client_channels.pop(client_id, ()):
                    keys += self._kpres(ch)
                calls.append((self._remove_conn, keys, [client_id, user_id]))
        for channel, members in self._channels.items():
            calls.append((self._pres_remove, self._kpres(channel), list(members)))
        self._conns.clear()
        self._channels.clear()
        self._client_channels.clear()
        await self._pipelined(calls)

    async def _pipelined(self, calls: Iterable[tuple[Any, list[str], list[Any]]]) -> None:
        batch: list[tuple[Any, list[str], list[Any]]] = []
        for call in calls:
            batch.append(call)
            if len(batch) >= REFRESH_BATCH:
                await self._b._run(self._execute(batch))
                batch = []
        if batch:
            await self._b._run(self._execute(batch))

    async def _execute(self, batch: list[tuple[Any, list[str], list[Any]]]) -> None:
        batcher = self._b.batch
        await batcher.all([batcher.script(script, keys, args) for script, keys, args in batch])
