"""The device registry in Redis, shared by every node (contract v1.1 §13).

Keys (``P`` is the broker's prefix, ``U`` a user id, ``D`` a device id)::

    P:dev:U        hash   D -> record (JSON)                 TTL ttl, refreshed
    P:dev:exp      zset   "U\\nD" -> expiry (Redis ms)
    P:dev:owner    hash   D -> U (the latest claim)

A record counts only while its ``P:dev:exp`` score lies ahead: the holding node re-writes
its records every ``refresh`` seconds, so a SIGKILLed node's devices vanish within
``ttl``, and :meth:`RedisDeviceRegistry.expired` hands each vanished record to one node,
which tells the device's user. Scripts take the time from Redis and name every key in
KEYS. Every Redis failure is answered ``UNAVAILABLE`` (``RedisErrorPolicy.BROKER``).
"""

from __future__ import annotations

import builtins
from collections.abc import Awaitable, Iterable
from typing import Any, Literal, TypeVar

import orjson
from redis.asyncio import Redis

from ..redis_errors import RedisErrorPolicy, redis_call
from .registry import Record

__all__ = ["RedisDeviceRegistry"]

T = TypeVar("T")

# KEYS: user hash, exp zset, owner hash. ARGV: device id, member, record, ttl ms,
# mode ("claim" | "refresh"), session id. Reply: the replaced record (claim), "lost"
# when another session holds the device (refresh), or false.
_PUT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local old = redis.call('HGET', KEYS[1], ARGV[1])
local live = false
if old then
  local score = redis.call('ZSCORE', KEYS[2], ARGV[2])
  live = score and tonumber(score) > now
end
if ARGV[5] == 'refresh' and old and live then
  local held = cjson.decode(old)
  if held['session_id'] ~= ARGV[6] then return 'lost' end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[2])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[7])
if ARGV[5] == 'claim' and old and live then return old end
return false
"""

# KEYS: user hash, exp zset, owner hash. ARGV: device id, member, session id, user id.
# Deletes the record if that session holds it; 1 if it did.
_REMOVE = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then return 0 end
if cjson.decode(old)['session_id'] ~= ARGV[3] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[2])
if redis.call('HGET', KEYS[3], ARGV[1]) == ARGV[4] then redis.call('HDEL', KEYS[3], ARGV[1]) end
return 1
"""

# KEYS: user hash, exp zset. ARGV: user id. The user's live records.
_LIST = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local all = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #all, 2 do
  local score = redis.call('ZSCORE', KEYS[2], ARGV[1] .. '\\n' .. all[i])
  if score and tonumber(score) > now then out[#out + 1] = all[i + 1] end
end
return out
"""

# KEYS: exp zset. ARGV: limit. Pops the members whose expiry passed.
_EXPIRED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
if #due > 0 then redis.call('ZREM', KEYS[1], unpack(due)) end
return due
"""

# KEYS: user hash, exp zset, owner hash. ARGV: device id, member, user id.
# After _EXPIRED: drops the record unless it was claimed again meanwhile; returns it.
_DROP = """
if redis.call('ZSCORE', KEYS[2], ARGV[2]) then return false end
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then return false end
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('HGET', KEYS[3], ARGV[1]) == ARGV[3] then redis.call('HDEL', KEYS[3], ARGV[1]) end
return old
"""


class RedisDeviceRegistry:
    """:class:`~revenge_ws.devices.registry.DeviceRegistry` in Redis (see the module doc)."""

    kind: Literal["memory", "redis"] = "redis"

    def __init__(self, redis: Redis, *, prefix: str, ttl: float, timeout: float) -> None:
        self._redis = redis
        self.prefix = prefix
        self.ttl_ms = max(1, int(ttl * 1000))
        self.timeout = timeout
        self._put = redis.register_script(_PUT)
        self._remove = redis.register_script(_REMOVE)
        self._list = redis.register_script(_LIST)
        self._expired = redis.register_script(_EXPIRED)
        self._drop = redis.register_script(_DROP)

    @classmethod
    def for_broker(cls, broker: Any) -> RedisDeviceRegistry:
        """Share the Redis broker's pool and prefix; records live ``presence_ttl``."""
        return cls(
            broker.redis, prefix=broker.prefix, ttl=broker.presence_ttl, timeout=broker.timeout
        )

    async def _run(self, aw: Awaitable[T]) -> T:
        return await redis_call(aw, RedisErrorPolicy.BROKER, self.timeout)

    def _keys(self, user_id: str) -> list[str]:
        p = self.prefix
        return [f"{p}:dev:{user_id}", f"{p}:dev:exp", f"{p}:dev:owner"]

    def _put_args(self, record: Record, mode: str) -> list[Any]:
        user, dev = record["user_id"], record["device_id"]
        return [
            dev,
            f"{user}\n{dev}",
            orjson.dumps(record),
            self.ttl_ms,
            mode,
            record["session_id"],
            user,
        ]

    async def claim(self, record: Record) -> Record | None:
        old = await self._run(
            self._put(self._keys(record["user_id"]), self._put_args(record, "claim"))
        )
        return None if not old else _load(old)

    async def refresh(self, records: Iterable[Record]) -> builtins.list[Record]:
        batch = builtins.list(records)
        if not batch:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for record in batch:
                await self._put(
                    self._keys(record["user_id"]), self._put_args(record, "refresh"), client=pipe
                )
            replies = await self._run(pipe.execute())
        return [r for r, reply in zip(batch, replies, strict=True) if _text(reply) == "lost"]

    async def remove(self, user_id: str, device_id: str, session_id: str) -> bool:
        done = await self._run(
            self._remove(
                self._keys(user_id), [device_id, f"{user_id}\n{device_id}", session_id, user_id]
            )
        )
        return bool(done)

    async def get(self, user_id: str, device_id: str) -> Record | None:
        p = self.prefix
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hget(f"{p}:dev:{user_id}", device_id)
            pipe.zscore(f"{p}:dev:exp", f"{user_id}\n{device_id}")
            pipe.time()
            raw, score, now = await self._run(pipe.execute())
        if raw is None or score is None or score <= now[0] * 1000 + now[1] // 1000:
            return None
        return _load(raw)

    async def list(self, user_id: str) -> builtins.list[Record]:
        keys = self._keys(user_id)[:2]
        rows = await self._run(self._list(keys, [user_id]))
        return [_load(r) for r in rows]

    async def list_all(self, limit: int) -> builtins.list[Record]:
        p = self.prefix
        now = await self._run(self._redis.time())
        members = await self._run(
            self._redis.zrangebyscore(
                f"{p}:dev:exp", now[0] * 1000 + now[1] // 1000, "+inf", start=0, num=limit
            )
        )
        if not members:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for member in members:
                user, _, dev = _text(member).partition("\n")
                pipe.hget(f"{p}:dev:{user}", dev)
            rows = await self._run(pipe.execute())
        return [_load(r) for r in rows if r is not None]

    async def owner(self, device_id: str) -> str | None:
        raw = await self._run(self._redis.hget(f"{self.prefix}:dev:owner", device_id))
        return None if raw is None else _text(raw)

    async def expired(self, limit: int) -> builtins.list[Record]:
        due = await self._run(self._expired([f"{self.prefix}:dev:exp"], [limit]))
        if not due:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for member in due:
                user, _, dev = _text(member).partition("\n")
                await self._drop(self._keys(user), [dev, _text(member), user], client=pipe)
            rows = await self._run(pipe.execute())
        return [_load(r) for r in rows if r]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _load(raw: Any) -> Record:
    record: Record = orjson.loads(raw)
    return record
