"""The Redis broker: publish/subscribe, history and presence shared by every node.

Needs Redis >= 7 (or Valkey / Dragonfly) and ``redis`` (redis-py >= 5, the optional
dependency ``revenge-ws[redis]``); this is the only module that imports it. Only plain
commands, EVAL/EVALSHA scripts, Streams and pub/sub are used (no Functions, no modules).

Key layout (``P`` is the key prefix, default ``revenge``; ``C`` a channel, ``U`` a user)::

    P:ch:C            hash    epoch, seq, ttl (history ttl, ms)   TTL max(channel_ttl, ttl)
    P:hist:C          stream  id "<seq>-0", fields t (Redis ms), p (payload)   TTL = ttl
    P:idem:C:K        string  "<epoch>:<seq>" of the first publish with key K
    P:pres:C          zset    client_id -> expiry (Redis ms)         TTL presence_ttl
    P:presinfo:C      hash    client_id -> {"u", "n", "node"}         TTL presence_ttl
    P:conns:U         zset    client_id -> expiry (Redis ms)         TTL presence_ttl
    P:users           zset    user_id   -> expiry (Redis ms)         TTL presence_ttl
    P:kv:K            string  set_if_absent / get_value / set_value
    P:pub:C           pub/sub channel of C's publications (payload = the publication JSON)
    P:control         pub/sub channel of control messages

Every write of a channel's seq, history and pub/sub happens in one Lua script, so the three
can never disagree. Times that matter across nodes (history TTL, presence expiry) are
Redis' own clock (``TIME`` in the scripts), so node clock skew does not matter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Iterable
from datetime import datetime
from typing import Any, TypeVar

import orjson
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

from ..config import HistoryFamily
from ..exceptions import BrokerError, BrokerUnavailable, ConfigError
from ..protocol import StreamPosition, rfc3339
from .base import BrokerHandler, HistoryResult, PresenceInfo, Publication

__all__ = ["RedisBroker", "RedisPresence"]

log = logging.getLogger("revenge_ws.broker.redis")

T = TypeVar("T")

#: How long closing the broker may wait for its tasks and connections (s).
CLOSE_TIMEOUT = 5.0
#: Channels per SUBSCRIBE command when a link (re)subscribes everything.
SUBSCRIBE_BATCH = 1000
#: Entries per script call / pipeline when presence is refreshed.
REFRESH_BATCH = 500
#: Longest the listener sleeps on an idle link between heartbeat checks.
POLL_INTERVAL = 1.0
#: A link that stayed up this long resets the reconnect backoff to its minimum.
STABLE_LINK = 5.0
#: Client ids whose connection was removed, remembered so that a late ``presence.add``
#: of a closed connection does not register an entry that would be refreshed forever.
RELEASED_MEMORY = 10_000
#: Error prefixes of ResponseErrors that mean "Redis cannot serve right now", not a bug.
_TRANSIENT = ("LOADING", "BUSY", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "OOM",
              "MISCONF", "NOREPLICAS")  # fmt: skip

# -- Lua -----------------------------------------------------------------------------------
# Every script names all its keys in KEYS (Dragonfly and Redis Cluster require it) and
# takes the time from Redis itself.

_NOW = """
local _t = redis.call('TIME')
local now = tonumber(_t[1]) * 1000 + math.floor(tonumber(_t[2]) / 1000)
"""

#: KEYS: meta, history[, idempotency]. ARGV: fresh epoch, payload head, payload tail,
#: size, history ttl ms, meta ttl ms, idempotency ttl ms, pub/sub channel.
#: Returns {1, epoch, seq} for a new publication, {0, epoch, seq, payload|nil} for a
#: repeated idempotency key (nothing written, nothing published).
PUBLISH_LUA = (
    _NOW
    + """
local meta, hist = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  -- No meta: a new channel, or Redis lost it (flush, restart, expiry). Start a new
  -- epoch, and drop any history left from the old one so the two never mix.
  epoch = ARGV[1]
  redis.call('DEL', hist)
  redis.call('HSET', meta, 'epoch', epoch, 'seq', 0)
end
if KEYS[3] then
  local first = redis.call('GET', KEYS[3])
  if first then
    local sep = string.find(first, ':', 1, true)
    local e, s = string.sub(first, 1, sep - 1), string.sub(first, sep + 1)
    local payload = false
    if e == epoch then
      local found = redis.call('XRANGE', hist, s, s)
      if #found > 0 then payload = found[1][2][4] end
    end
    return {0, e, tonumber(s), payload}
  end
end
local seq = redis.call('HINCRBY', meta, 'seq', 1)
local sseq = string.format('%d', seq)
local payload = ARGV[2] .. sseq .. ',"epoch":"' .. epoch .. '"' .. ARGV[3]
local size, httl, mttl = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
redis.call('HSET', meta, 'ttl', ARGV[5])
if size > 0 and httl > 0 then
  local id = sseq .. '-0'
  local stamp = string.format('%d', now)
  local ok = redis.pcall('XADD', hist, 'MAXLEN', size, id, 't', stamp, 'p', payload)
  if type(ok) == 'table' and ok.err then
    -- A stream left with higher ids than this epoch's seq: it cannot be ours.
    redis.call('DEL', hist)
    redis.call('XADD', hist, 'MAXLEN', size, id, 't', stamp, 'p', payload)
  end
  redis.call('PEXPIRE', hist, httl)
else
  redis.call('DEL', hist)
end
redis.call('PEXPIRE', meta, math.max(mttl, httl))
if KEYS[3] then
  redis.call('SET', KEYS[3], epoch .. ':' .. sseq, 'PX', ARGV[7])
end
redis.call('PUBLISH', ARGV[8], payload)
return {1, epoch, seq}
"""
)

#: KEYS: meta, history. ARGV: fresh epoch, since epoch ('' = no since), since seq, limit,
#: default history ttl ms, meta ttl ms. Returns {epoch, top seq, recovered 0/1, payloads...}.
HISTORY_LUA = (
    _NOW
    + """
local meta, hist = KEYS[1], KEYS[2]
local m = redis.call('HMGET', meta, 'epoch', 'seq', 'ttl')
local epoch, top, httl = m[1], tonumber(m[2]), tonumber(m[3])
if not epoch then
  -- Persist the new epoch now: the next publish must continue it, or every subscriber
  -- that read this position would see a second, spurious epoch change.
  epoch, top, httl = ARGV[1], 0, tonumber(ARGV[5])
  redis.call('DEL', hist)
  redis.call('HSET', meta, 'epoch', epoch, 'seq', 0, 'ttl', ARGV[5])
end
top = top or 0
httl = httl or tonumber(ARGV[5])
redis.call('PEXPIRE', meta, math.max(tonumber(ARGV[6]), httl))
local cutoff = now - httl
local limit = tonumber(ARGV[4])
if ARGV[2] == '' then
  local out = {epoch, top, 1}
  if limit > 0 then
    local entries = redis.call('XREVRANGE', hist, '+', '-', 'COUNT', limit)
    for i = #entries, 1, -1 do
      local f = entries[i][2]
      if tonumber(f[2]) >= cutoff then out[#out + 1] = f[4] end
    end
  end
  return out
end
local since = tonumber(ARGV[3])
if ARGV[2] ~= epoch or since > top then return {epoch, top, 0} end
local missed = top - since
if missed == 0 then return {epoch, top, 1} end
if limit > 0 and missed > limit then return {epoch, top, 0} end
local entries = redis.call('XRANGE', hist, string.format('%d', since + 1), '+', 'COUNT', missed)
-- ids are distinct seqs in [since+1, top]: exactly `missed` of them means no gap.
if #entries ~= missed then return {epoch, top, 0} end
local out = {epoch, top, 1}
for i = 1, #entries do
  local f = entries[i][2]
  if tonumber(f[2]) < cutoff then return {epoch, top, 0} end
  out[#out + 1] = f[4]
end
return out
"""
)

#: KEYS: user's connections, online users. ARGV: ttl ms, user id, client ids...
#: Drops expired connections, (re)registers the given ones, returns the user's count.
ADD_CONNS_LUA = (
    _NOW
    + """
local exp = now + tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for i = 3, #ARGV do redis.call('ZADD', KEYS[1], exp, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], exp, ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return redis.call('ZCARD', KEYS[1])
"""
)

#: KEYS: user's connections, online users, then presence zset/info pairs of the channels
#: the connection was on. ARGV: client id, user id. Returns the user's connections left.
REMOVE_CONN_LUA = (
    _NOW
    + """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local n = redis.call('ZCARD', KEYS[1])
if n == 0 then redis.call('ZREM', KEYS[2], ARGV[2]) end
for i = 3, #KEYS - 1, 2 do
  redis.call('ZREM', KEYS[i], ARGV[1])
  redis.call('HDEL', KEYS[i + 1], ARGV[1])
end
return n
"""
)

#: KEYS: one zset of expiries. Returns how many entries have not expired.
COUNT_LIVE_LUA = (
    _NOW
    + """
return redis.call('ZCOUNT', KEYS[1], '(' .. string.format('%d', now), '+inf')
"""
)

#: KEYS: presence zset, presence info hash. ARGV: ttl ms, then client id / info pairs.
PRESENCE_ADD_LUA = (
    _NOW
    + """
local exp = now + tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], exp, ARGV[i])
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return 1
"""
)

#: KEYS: presence zset, presence info hash. ARGV: client ids.
PRESENCE_REMOVE_LUA = """
for i = 1, #ARGV do
  redis.call('ZREM', KEYS[1], ARGV[i])
  redis.call('HDEL', KEYS[2], ARGV[i])
end
return 1
"""

#: KEYS: presence zset, presence info hash. Prunes expired entries, returns
#: {client id, info, client id, info, ...} of the live ones.
PRESENCE_MEMBERS_LUA = (
    _NOW
    + """
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
if #dead > 0 then
  for i = 1, #dead do redis.call('HDEL', KEYS[2], dead[i]) end
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
end
local alive = redis.call('ZRANGE', KEYS[1], 0, -1)
local out = {}
for i = 1, #alive do
  local info = redis.call('HGET', KEYS[2], alive[i])
  if info then
    out[#out + 1] = alive[i]
    out[#out + 1] = info
  end
end
return out
"""
)

#: KEYS: key. ARGV: value, ttl ms. Returns the existing value, or nil after storing.
SET_IF_ABSENT_LUA = """
local old = redis.call('GET', KEYS[1])
if old then return old end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""


def _ms(seconds: float) -> int:
    """A positive TTL in ms (Redis refuses 0 for PX/PEXPIRE)."""
    return max(1, int(seconds * 1000))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _created_ms(timestamp: Any) -> float:
    try:
        return datetime.fromisoformat(timestamp).timestamp() * 1000.0
    except (TypeError, ValueError):
        return time.time() * 1000.0


def decode_publication(payload: bytes) -> Publication:
    """Build a :class:`Publication` from its JSON payload without re-encoding it.

    Raises ``ValueError`` when the payload is not a publication envelope.
    """
    obj = orjson.loads(payload)
    if not isinstance(obj, dict):
        raise ValueError("a publication must be a JSON object")
    channel, mtype, seq = obj.get("channel"), obj.get("type"), obj.get("seq")
    epoch, data, ts = obj.get("epoch"), obj.get("data"), obj.get("timestamp")
    if not (
        isinstance(channel, str)
        and isinstance(mtype, str)
        and isinstance(seq, int)
        and isinstance(epoch, str)
        and isinstance(data, dict)
        and isinstance(ts, str)
    ):
        raise ValueError("not a publication envelope")
    return Publication(channel, mtype, seq, epoch, data, ts, _created_ms(ts), payload=payload)


def _transient(exc: ResponseError) -> bool:
    return str(exc).startswith(_TRANSIENT)


class _Link:
    """One pub/sub connection and what is in flight on it.

    Only the listener task reads from it; ``subscribe``/``unsubscribe`` write to it.
    """

    def __init__(self, conn: AbstractConnection) -> None:
        self.conn = conn
        #: Channels of the initial SUBSCRIBE not confirmed yet; ready when empty.
        self.initial: set[bytes] = set()
        self.subscribed_at_start: set[bytes] = set()
        self.ready = False
        self.ready_at = 0.0
        self.waiters: dict[bytes, list[asyncio.Future[None]]] = {}

    async def send(self, *args: Any) -> None:
        # A disconnected redis-py connection would silently reconnect on send, without
        # our subscriptions: refuse, and let the listener rebuild the link instead.
        if not self.conn.is_connected:
            raise RedisConnectionError("pub/sub link is closed")
        await self.conn.send_command(*args, check_health=False)

    async def subscribe(self, rch: bytes) -> None:
        """SUBSCRIBE and wait until Redis confirms it (so a history read after this
        call cannot miss a publication that pub/sub did not deliver)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.setdefault(rch, []).append(fut)
        try:
            await self.send("SUBSCRIBE", rch)
            await fut
        finally:
            waiting = self.waiters.get(rch)
            if waiting is not None and fut in waiting:
                waiting.remove(fut)
                if not waiting:
                    del self.waiters[rch]

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
        with contextlib.suppress(Exception):
            await self.conn.disconnect(nowait=True)


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
        self._add_conns = redis.register_script(ADD_CONNS_LUA)
        self._remove_conn = redis.register_script(REMOVE_CONN_LUA)
        self._count_live = redis.register_script(COUNT_LIVE_LUA)
        self._pres_add = redis.register_script(PRESENCE_ADD_LUA)
        self._pres_remove = redis.register_script(PRESENCE_REMOVE_LUA)
        self._pres_members = redis.register_script(PRESENCE_MEMBERS_LUA)
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
        blob = orjson.dumps({"u": info.user_id, "n": info.name, "node": info.node_id})
        await self._b._run(self._pres_add(self._kpres(channel), [self._ttl_ms, client_id, blob]))
        if client_id in self._released:
            # The connection was removed while this add was in flight: undo it.
            await self._b._run(self._pres_remove(self._kpres(channel), [client_id]))
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
        await self._b._run(self._pres_remove(self._kpres(channel), [client_id]))

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
            self._add_conns(self._kconns(user_id), [self._ttl_ms, user_id, client_id])
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
        return int(await self._b._run(self._remove_conn(keys, [client_id, user_id])))

    async def connection_count(self, user_id: str) -> int:
        return int(await self._b._run(self._count_live(self._kconns(user_id)[:1])))

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
        # ``async with``: a pipeline holds a pool connection from its SCRIPT EXISTS check
        # on, and only reset() gives it back, also when a timeout cancels us midway.
        async with self._b._redis.pipeline(transaction=False) as pipe:
            for script, keys, args in batch:
                await script(keys, args, client=pipe)
            await pipe.execute()


class RedisBroker:
    """:class:`~revenge_ws.broker.base.Broker` on Redis, shared by every node.

    Guarantees (beyond the Protocol's):

    * ``publish`` runs one script that checks the idempotency key, assigns ``seq``,
      appends to history and PUBLISHes the payload: all or nothing. The payload (the
      publication's JSON) is encoded once by the publisher; every node builds its
      :class:`Publication` from those bytes without re-encoding them.
    * A channel whose meta hash is missing (new, expired after ``channel_ttl`` idle
      seconds, or lost by Redis: FLUSHALL, restart without persistence) gets a new
      epoch on the next publish *or* history read, and its old history is dropped:
      never a silent gap, never two epochs mixed.
    * ``history(since=...)`` is never partial: ``recovered=False`` and no publications
      when ``since`` is of another epoch, ahead of the top, older than the retained
      window (size or TTL, judged in Redis time) or more than ``limit`` behind.
    * One pub/sub connection per node carries one subscription per channel plus the
      control channel. It is rebuilt after any failure with a bounded, jittered backoff
      (``reconnect_min`` → ``reconnect_max``), re-subscribes everything, then calls
      ``handler.on_reconnect()``. A heartbeat (PING when idle) detects a dead peer.
    * Every call is bounded by ``timeout`` (connect, socket and pool waits too) and
      raises :class:`BrokerUnavailable` when Redis is unreachable, busy or read-only;
      nothing is retried behind the caller's back (a retried publish could publish
      twice). A publish that timed out *after* Redis received it may still have been
      published: the idempotency key makes a retry safe.
    """

    def __init__(
        self,
        url: str,
        *,
        node_id: str,
        timeout: float = 5.0,
        prefix: str = "revenge",
        idempotency_ttl: float = 600.0,
        channel_ttl: float = 86_400.0,
        presence_ttl: float = 30.0,
        presence_refresh: float = 10.0,
        max_connections: int = 64,
        reconnect_min: float = 0.1,
        reconnect_max: float = 5.0,
        heartbeat: float = 5.0,
    ) -> None:
        if not 0 < presence_refresh < presence_ttl:
            raise ConfigError("redis broker: presence_refresh must be in (0, presence_ttl)")
        if not 0 < reconnect_min <= reconnect_max:
            raise ConfigError("redis broker: need 0 < reconnect_min <= reconnect_max")
        self.node_id = node_id
        self.prefix = prefix
        self.timeout = timeout
        self.idempotency_ttl = idempotency_ttl
        self.channel_ttl = channel_ttl
        self.presence_ttl = presence_ttl
        self.presence_refresh = presence_refresh
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.heartbeat = heartbeat
        self._poll = min(POLL_INTERVAL, heartbeat / 2, timeout / 2)
        try:
            self._pool = BlockingConnectionPool.from_url(
                url,
                max_connections=max_connections,
                # Waiting for a free connection counts against the call's timeout.
                timeout=timeout,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                # No hidden retries: a call fails once, fast, and the caller decides.
                retry=Retry(NoBackoff(), 0),
                # RESP2: pub/sub messages are plain replies on every server we support.
                protocol=2,
                client_name=f"revenge-ws:{node_id}"[:128].replace(" ", "_"),
            )
        except ValueError as exc:
            raise ConfigError(
                f"REVENGE_BROKER_URL (broker.url) is not a Redis URL: {exc}"
            ) from None
        self._redis: Redis = Redis(connection_pool=self._pool)
        self._publish_script = self._redis.register_script(PUBLISH_LUA)
        self._history_script = self._redis.register_script(HISTORY_LUA)
        self._set_if_absent_script = self._redis.register_script(SET_IF_ABSENT_LUA)
        self._presence = RedisPresence(self)
        self._control = f"{prefix}:control".encode()
        self._pub_prefix = f"{prefix}:pub:".encode()
        self._handler: BrokerHandler | None = None
        self._channels: set[str] = set()
        self._link: _Link | None = None
        self._link_down = True
        self._ever_linked = False
        self._wake = asyncio.Event()
        self._refresh_now = asyncio.Event()
        self._first_attempt: asyncio.Future[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._bad_payload_logged = False

    @property
    def presence(self) -> RedisPresence:
        return self._presence

    @property
    def redis(self) -> Redis:
        """The shared client (bounded pool, no retries) for other Redis-backed stores of
        this node, e.g. SyncPlay rooms; they use keys under :attr:`prefix` that do not
        collide with the ones above. Closed by :meth:`close`."""
        return self._redis

    # -- plumbing ----------------------------------------------------------------------
    async def _run(self, aw: Awaitable[T]) -> T:
        """Await one Redis operation within ``timeout``; map failures to broker errors."""
        try:
            async with asyncio.timeout(self.timeout):
                result = await aw
        except TimeoutError:
            raise BrokerUnavailable("redis did not answer in time") from None
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise BrokerUnavailable(f"redis unreachable: {exc}") from None
        except ResponseError as exc:
            if _transient(exc):
                raise BrokerUnavailable(f"redis cannot serve: {exc}") from None
            raise BrokerError(f"redis refused: {exc}") from exc
        except RedisError as exc:
            raise BrokerError(f"redis failed: {exc}") from exc
        if self._link_down:
            # Redis answers again: reconnect the pub/sub link now, not after the backoff.
            self._wake.set()
        return result

    def _keys(self, channel: str) -> list[str]:
        return [f"{self.prefix}:ch:{channel}", f"{self.prefix}:hist:{channel}"]

    def _rch(self, channel: str) -> bytes:
        return self._pub_prefix + channel.encode()

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self, handler: BrokerHandler) -> None:
        """Start the listener and presence tasks; waits for the first connection
        attempt (at most ``timeout``) but does not fail when Redis is down: the link
        keeps retrying and :meth:`ping` reports the outage."""
        self._handler = handler
        loop = asyncio.get_running_loop()
        self._first_attempt = loop.create_future()
        self._tasks = [
            asyncio.create_task(self._listen(), name=f"revenge-redis-listener-{self.node_id}"),
            asyncio.create_task(
                self._refresh_loop(), name=f"revenge-redis-presence-{self.node_id}"
            ),
        ]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._first_attempt), self.timeout)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        # Every wait is bounded: a close must never hang a shutting-down node.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        # Entries left by connections the node did not close: drop them now rather
        # than leaving them for presence_ttl (best effort; Redis may be down).
        with contextlib.suppress(BrokerError, TimeoutError):
            async with asyncio.timeout(min(self.timeout, 2.0)):
                await self._presence.forget_all()
        self._handler = None
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._redis.aclose()
                await self._pool.disconnect()

    async def ping(self) -> None:
        """Raise ``BrokerUnavailable`` unless Redis answers and the pub/sub link is up."""
        await self._run(self._redis.ping())
        link = self._link
        if link is None or not link.ready:
            raise BrokerUnavailable("redis pub/sub link is down (reconnecting)")

    # -- publish / history ---------------------------------------------------------------
    async def publish(
        self,
        channel: str,
        mtype: str,
        data: dict[str, Any],
        history: HistoryFamily,
        *,
        idempotency_key: str | None = None,
    ) -> Publication:
        now = time.time() * 1000.0
        ts = rfc3339(now)
        # The envelope of protocol.encode_publication, split around seq/epoch (which only
        # the script knows); the script and this method join the parts identically.
        head = b'{"type":' + orjson.dumps(mtype) + b',"channel":' + orjson.dumps(channel)
        head += b',"seq":'
        tail = b',"timestamp":' + orjson.dumps(ts) + b',"data":' + orjson.dumps(data) + b"}"
        keys = self._keys(channel)
        if idempotency_key and self.idempotency_ttl > 0:
            keys.append(f"{self.prefix}:idem:{channel}:{idempotency_key}")
        args: list[EncodableT] = [
            secrets.token_hex(6),
            head,
            tail,
            history.size,
            _ms(history.ttl) if history.ttl > 0 else 0,
            _ms(self.channel_ttl),
            _ms(self.idempotency_ttl),
            self._rch(channel),
        ]
        res = await self._run(self._publish_script(keys, args))
        fresh, epoch, seq = int(res[0]), _text(res[1]), int(res[2])
        if not fresh:
            if len(res) > 3 and res[3]:
                return decode_publication(res[3])
            # The first publication is no longer in history: its position is all we know.
            return Publication(channel, mtype, seq, epoch, data, ts, now)
        payload = head + str(seq).encode() + b',"epoch":"' + epoch.encode() + b'"' + tail
        return Publication(channel, mtype, seq, epoch, data, ts, now, payload=payload)

    async def history(
        self, channel: str, since: StreamPosition | None = None, limit: int = 0
    ) -> HistoryResult:
        args: list[EncodableT] = [
            secrets.token_hex(6),
            "" if since is None else since.epoch,
            0 if since is None else since.seq,
            limit,
            _ms(HistoryFamily().ttl),
            _ms(self.channel_ttl),
        ]
        res = await self._run(self._history_script(self._keys(channel), args))
        position = StreamPosition(_text(res[0]), int(res[1]))
        pubs = [decode_publication(p) for p in res[3:]]
        return HistoryResult(position, pubs, bool(int(res[2])))

    # -- subscriptions -------------------------------------------------------------------
    async def subscribe(self, channel: str) -> None:
        """Subscribe this node's pub/sub link to ``channel`` and wait until Redis
        confirms. Raises ``BrokerUnavailable`` while the link is down."""
        if channel in self._channels:
            return
        link = self._link
        if link is None or not link.ready:
            raise BrokerUnavailable("redis pub/sub link is down (reconnecting)")
        self._channels.add(channel)
        try:
            await self._run(link.subscribe(self._rch(channel)))
        except BaseException:
            self._channels.discard(channel)
            raise

    async def unsubscribe(self, channel: str) -> None:
        """Never raises: a link that is down is rebuilt without the channel anyway."""
        self._channels.discard(channel)
        link = self._link
        if link is not None and link.ready:
            with contextlib.suppress(BrokerError):
                await self._run(link.send("UNSUBSCRIBE", self._rch(channel)))

    # -- control / kv ------------------------------------------------------------------
    async def publish_control(self, message: dict[str, Any]) -> None:
        """PUBLISH to every other node; this node's ``on_control`` runs locally (soon,
        not inline), so it gets the message even while its own link is down."""
        blob = orjson.dumps({"from": self.node_id, "m": message})
        await self._run(self._redis.publish(self._control, blob))
        handler = self._handler
        if handler is not None:
            asyncio.get_running_loop().call_soon(handler.on_control, message)

    async def set_if_absent(self, key: str, value: str, ttl: float) -> str | None:
        old = await self._run(
            self._set_if_absent_script([f"{self.prefix}:kv:{key}"], [value, _ms(ttl)])
        )
        return None if old is None else _text(old)

    async def get_value(self, key: str) -> str | None:
        value = await self._run(self._redis.get(f"{self.prefix}:kv:{key}"))
        return None if value is None else _text(value)

    async def get_values(self, keys: list[str]) -> list[str | None]:
        if not keys:
            return []
        values = await self._run(self._redis.mget([f"{self.prefix}:kv:{k}" for k in keys]))
        return [None if v is None else _text(v) for v in values]

    async def set_value(self, key: str, value: str, ttl: float) -> None:
        await self._run(self._redis.set(f"{self.prefix}:kv:{key}", value, px=_ms(ttl)))

    # -- the pub/sub link ----------------------------------------------------------------
    def _settle_first_attempt(self) -> None:
        fut = self._first_attempt
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def _listen(self) -> None:
        """Keep one pub/sub link up for as long as the broker runs."""
        delay = self.reconnect_min
        outage_started: float | None = None
        while True:
            self._wake.clear()
            link = _Link(self._pool.make_connection())  # type: ignore[no-untyped-call]
            try:
                await self._open_link(link)
                self._link = link
                await self._read(link)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error: BaseException = exc
            else:  # pragma: no cover - _read only returns by raising
                error = RedisConnectionError("pub/sub link ended")
            finally:
                self._link = None
                self._link_down = True
                link.fail(BrokerUnavailable("redis pub/sub link lost"))
                await link.close()
            self._settle_first_attempt()
            if link.ready and time.monotonic() - link.ready_at >= STABLE_LINK:
                delay = self.reconnect_min
            expected = isinstance(error, RedisError | OSError | TimeoutError)
            if not expected:
                log.error("redis pub/sub listener failed", exc_info=error)
            elif outage_started is None or link.ready:
                # Once per outage: the retries that follow log at debug level.
                outage_started = time.monotonic()
                what = "lost" if self._ever_linked else "cannot connect"
                log.warning("redis pub/sub link %s (%s); reconnecting", what, error)
            else:
                log.debug("redis pub/sub reconnect failed: %s", error)
            pause = random.uniform(delay / 2, delay)
            delay = min(delay * 2, self.reconnect_max)
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
            # cancellation that arrives as the wait ends, and this loop would go on.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self._wake.wait()

    async def _open_link(self, link: _Link) -> None:
        async with asyncio.timeout(self.timeout):
            await link.conn.connect()  # type: ignore[no-untyped-call]
        # The snapshot the link starts with; channels subscribed from now on go through
        # subscribe(), which refuses until the link is ready.
        wanted = [self._control, *(self._rch(ch) for ch in self._channels)]
        link.initial = set(wanted)
        link.subscribed_at_start = set(wanted)
        for i in range(0, len(wanted), SUBSCRIBE_BATCH):
            await link.send("SUBSCRIBE", *wanted[i : i + SUBSCRIBE_BATCH])

    async def _read(self, link: _Link) -> None:
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
                    await self._on_ready(link)

    async def _on_ready(self, link: _Link) -> None:
        link.ready = True
        link.ready_at = time.monotonic()
        self._link_down = False
        reconnected = self._ever_linked
        self._ever_linked = True
        self._settle_first_attempt()
        # Channels unsubscribed while the link was being built: drop them on Redis too.
        stale = link.subscribed_at_start - {self._control} - {self._rch(c) for c in self._channels}
        if stale:
            await link.send("UNSUBSCRIBE", *stale)
        if reconnected:
            log.info("redis pub/sub link restored; %d channels re-subscribed", len(self._channels))
            # Presence may have been lost with Redis' data: put ours back now.
            self._refresh_now.set()
            handler = self._handler
            if handler is not None:
                try:
                    handler.on_reconnect()
                except Exception:
                    log.exception("on_reconnect failed")

    def _on_message(self, rch: bytes, data: bytes) -> None:
        handler = self._handler
        if handler is None:
            return
        try:
            if rch == self._control:
                msg = orjson.loads(data)
                if not isinstance(msg, dict) or not isinstance(msg.get("m"), dict):
                    raise ValueError("not a control envelope")
                if msg.get("from") != self.node_id:  # the sender delivered it locally
                    handler.on_control(msg["m"])
                return
            if not rch.startswith(self._pub_prefix):
                return
            if rch[len(self._pub_prefix) :].decode() not in self._channels:
                return  # an UNSUBSCRIBE still in flight
            pub = decode_publication(data)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError included
            # Someone else writes to our channels: never let it break the link.
            if not self._bad_payload_logged:
                self._bad_payload_logged = True
                log.warning("dropping a malformed message on %r: %s", rch, exc)
            return
        except Exception:
            log.exception("on_control failed")
            return
        try:
            handler.on_publication(pub)
        except Exception:
            log.exception("on_publication failed for %s", pub.channel)

    # -- presence refresh ------------------------------------------------------------------
    async def _refresh_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):  # asyncio.timeout: see _listen
                async with asyncio.timeout(self.presence_refresh):
                    await self._refresh_now.wait()
            self._refresh_now.clear()
            try:
                await self._presence.refresh()
            except BrokerUnavailable as exc:
                log.debug("presence refresh skipped: %s", exc)
            except Exception:
                log.exception("presence refresh failed")
