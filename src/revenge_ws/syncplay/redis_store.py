"""SyncPlay rooms in Redis, shared by every node: a room survives the loss of any node.

Each room is one JSON blob (``Room.to_dict``). :meth:`RedisRoomStore.update` is a
compare-and-set on ``Room.version`` done by one Lua script, so concurrent commands on one
room from any number of nodes are serialized: a lost race re-reads and re-runs the pure
engine. Invitation codes are indexed by keys that expire with the invitation and are
claimed in the same script (a code already used by another room counts as a lost race).
The same script keeps a sorted set of room ids scored by their next deadline
(``Room.due_at``), so every node's timeout sweep asks Redis which rooms are due instead of
loading every room every second; a room keeps its timeouts when any node goes away.
Only GET/SET/DEL/EXISTS, S* and Z* commands and EVAL are used (Valkey and Dragonfly have them).
Every Redis failure is answered ``UNAVAILABLE`` (``RedisErrorPolicy.ROOM_STORE`` in
:mod:`revenge_ws.redis_errors`).

Keys (``P`` is the broker's prefix): ``P:room:{id}`` (JSON), ``P:rooms`` (set of ids),
``P:rooms:due`` (sorted set: id scored by deadline, ms), ``P:invite:{code}`` (room id,
expires with the invitation).
"""

from __future__ import annotations

import asyncio
import builtins
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from redis.asyncio import Redis

from ..codes import ErrorCode
from ..exceptions import RequestError
from ..protocol import now_ms
from ..redis_errors import RedisErrorPolicy, redis_call
from .ids import SECURE_IDS, IdSource
from .model import Room, invite_key

__all__ = ["RedisRoomStore"]

R = TypeVar("R")
T = TypeVar("T")

# KEYS: room, rooms-set, due-index, the invite keys to claim (n of them), then the invite
# keys to release. ARGV: room_id, expected version ("" = must not exist), new JSON ("" =
# delete), now_ms, n, the room's deadline (index score), then the n claims' expiry times
# (ms). Every key is declared in KEYS, so the script also runs where undeclared keys are
# refused (Dragonfly's default, Redis Cluster).
_CAS = """
local cur = redis.call('GET', KEYS[1])
local expected = ARGV[2]
if expected == '' then
  if cur then return 'exists' end
else
  if not cur then return 'missing' end
  local v = cjson.decode(cur)['version']
  if tostring(v) ~= expected then return 'conflict' end
end
local now = tonumber(ARGV[4])
local n = tonumber(ARGV[5])
for i = 1, n do
  local owner = redis.call('GET', KEYS[3 + i])
  if owner and owner ~= ARGV[1] then return 'code_taken' end
end
for i = 4 + n, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then redis.call('DEL', KEYS[i]) end
end
if ARGV[3] == '' then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
  for i = 1, n do
    if redis.call('GET', KEYS[3 + i]) == ARGV[1] then redis.call('DEL', KEYS[3 + i]) end
  end
  return 'ok'
end
for i = 1, n do
  local ttl = tonumber(ARGV[6 + i]) - now
  if ttl > 0 then redis.call('SET', KEYS[3 + i], ARGV[1], 'PX', math.floor(ttl)) end
end
redis.call('SET', KEYS[1], ARGV[3])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[1])
return 'ok'
"""

# KEYS: rooms-set, due-index. The ids of rooms missing from the index (stored before it
# existed, or the index key was lost).
_MISSING = """
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if not redis.call('ZSCORE', KEYS[2], id) then out[#out + 1] = id end
end
return out
"""

# KEYS: room, due-index. ARGV: room_id, deadline. NX: a write since the caller read the room
# has indexed a newer deadline, which wins.
_INDEX = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('ZADD', KEYS[2], 'NX', ARGV[2], ARGV[1])
end
return 0
"""

# KEYS: room, rooms-set, due-index. ARGV: room_id. Drops the index entries of a room whose
# blob is gone (e.g. evicted), so it is not due forever.
_FORGET = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
end
return 0
"""

#: How often (s) a node checks that every room is in the deadline index.
REINDEX_INTERVAL = 60.0


class RedisRoomStore:
    """:class:`~revenge_ws.syncplay.store.RoomStore` in Redis (see the module doc)."""

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str = "revenge",
        max_rooms: int = 10_000,
        max_attempts: int = 16,
        ids: IdSource = SECURE_IDS,
    ) -> None:
        self._redis = redis
        self.prefix = prefix
        self.max_rooms = max_rooms
        self.max_attempts = max_attempts
        self.ids = ids
        self._cas = redis.register_script(_CAS)
        self._missing = redis.register_script(_MISSING)
        self._index = redis.register_script(_INDEX)
        self._forget = redis.register_script(_FORGET)
        self._reindex_at = 0.0  # time.monotonic(); the first sweep checks the index
        self._locks: dict[str, asyncio.Lock] = {}

    @classmethod
    def for_broker(cls, broker: Any, **kw: Any) -> RedisRoomStore:
        """Share the Redis broker's connection pool and key prefix."""
        return cls(broker.redis, prefix=broker.prefix, **kw)

    def _room_key(self, room_id: str) -> str:
        return f"{self.prefix}:room:{room_id}"

    @property
    def _set_key(self) -> str:
        return f"{self.prefix}:rooms"

    @property
    def _due_key(self) -> str:
        return f"{self.prefix}:rooms:due"

    async def _run(self, aw: Awaitable[T]) -> T:
        return await redis_call(aw, RedisErrorPolicy.ROOM_STORE)

    async def get(self, room_id: str) -> Room | None:
        raw = await self._run(self._redis.get(self._room_key(room_id)))
        return None if raw is None else Room.from_dict(orjson.loads(raw))

    async def list_all(self) -> builtins.list[Room]:
        ids = sorted(await self._run(self._redis.smembers(self._set_key)))
        if not ids:
            return []
        blobs = await self._run(self._redis.mget([self._room_key(_text(i)) for i in ids]))
        rooms = [Room.from_dict(orjson.loads(b)) for b in blobs if b is not None]
        rooms.sort(key=lambda r: (r.created_at, r.room_id))
        return rooms

    async def list_public(self) -> builtins.list[Room]:
        return [r for r in await self.list_all() if r.public]

    async def due(self, now_ms: float) -> builtins.list[str]:
        if time.monotonic() >= self._reindex_at:
            await self._reindex()
            self._reindex_at = time.monotonic() + REINDEX_INTERVAL
        ids = await self._run(self._redis.zrangebyscore(self._due_key, "-inf", now_ms))
        return [_text(i) for i in ids if isinstance(i, bytes | str)]

    async def _reindex(self) -> None:
        """Index rooms the index lacks, at the deadline their blob records (0, due at once,
        when it records none: their tick records one)."""
        missing = await self._run(self._missing(keys=[self._set_key, self._due_key]))
        for raw_id in missing:
            room_id = _text(raw_id)
            key = self._room_key(room_id)
            raw = await self._run(self._redis.get(key))
            if raw is None:
                await self._run(
                    self._forget(keys=[key, self._set_key, self._due_key], args=[room_id])
                )
                continue
            due = orjson.loads(raw).get("due_at")
            score = float(due) if isinstance(due, int | float) else 0.0
            await self._run(self._index(keys=[key, self._due_key], args=[room_id, score]))

    async def _write(self, room: Room, expected: str, old_codes: set[str]) -> str:
        claims = list(room.invites.items())
        release = sorted(old_codes - set(room.invites))
        keys = [self._room_key(room.room_id), self._set_key, self._due_key]
        keys += [self._invite_key(code) for code, _ in claims]
        keys += [self._invite_key(code) for code in release]
        argv: list[Any] = [
            room.room_id,
            expected,
            "" if room.ended else orjson.dumps(room.to_dict()),
            int(now_ms()),
            len(claims),
            0.0 if room.due_at is None else room.due_at,  # unknown: due at once
            *(int(inv.expires_at) for _, inv in claims),
        ]
        result = await self._run(self._cas(keys=keys, args=argv))
        return result.decode() if isinstance(result, bytes) else str(result)

    def _invite_key(self, code: str) -> str:
        return f"{self.prefix}:invite:{code}"

    async def create(self, room: Room) -> None:
        if room.ended:
            raise ValueError("cannot store an ended room")
        if await self._run(self._redis.scard(self._set_key)) >= self.max_rooms:
            raise RequestError(ErrorCode.CONFLICT, "too many rooms on this server; try later")
        result = await self._write(room, "", set())
        if result == "exists":
            raise RequestError(ErrorCode.CONFLICT, "a room with this id already exists")
        if result == "code_taken":
            raise RequestError(ErrorCode.CONFLICT, "an invitation code is already in use")

    async def update(self, room_id: str, fn: Callable[[Room], R]) -> R:
        # Commands of this node on one room queue on a local lock, so compare-and-set
        # only ever races against other nodes; a lost race backs off a little (jittered).
        lock = self._locks.get(room_id)
        if lock is None:
            lock = self._locks[room_id] = asyncio.Lock()
        try:
            async with lock:
                return await self._update(room_id, fn)
        finally:
            if not lock.locked() and self._locks.get(room_id) is lock:
                del self._locks[room_id]

    async def _update(self, room_id: str, fn: Callable[[Room], R]) -> R:
        for attempt in range(self.max_attempts):
            key = self._room_key(room_id)
            raw = await self._run(self._redis.get(key))
            if raw is None:
                await self._run(
                    self._forget(keys=[key, self._set_key, self._due_key], args=[room_id])
                )
                raise RequestError(ErrorCode.NOT_FOUND, "no such room")
            snap = orjson.loads(raw)
            room = Room.from_dict(snap)
            old_codes = set(room.invites)
            result = fn(room)
            if room.version == snap["version"]:
                return result
            if room.room_id != room_id:
                raise ValueError("fn must not change the room id")
            outcome = await self._write(room, str(snap["version"]), old_codes)
            if outcome == "ok":
                return result
            if outcome == "missing":
                raise RequestError(ErrorCode.NOT_FOUND, "no such room")
            # conflict or code_taken: another node won; read again and re-run.
            await asyncio.sleep(random.uniform(0, 0.002 * (attempt + 1)))
        raise RequestError(ErrorCode.UNAVAILABLE, "the room is busy; try again", retryable=True)

    async def delete(self, room_id: str) -> bool:
        room = await self.get(room_id)
        if room is None:
            return False
        room.ended = True
        return await self._write(room, str(room.version), set(room.invites)) == "ok"

    async def find_invite(self, code: str, now_ms: float) -> Room | None:
        code = invite_key(code)
        room_id = await self._run(self._redis.get(self._invite_key(code)))
        if room_id is None:
            return None
        room = await self.get(_text(room_id))
        if room is None:
            return None
        return None if room.live_invite(code, now_ms) is None else room


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
