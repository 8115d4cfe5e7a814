"""SyncPlay rooms in Redis, shared by every node: a room survives the loss of any node.

Each room is one JSON blob (``Room.to_dict``). :meth:`RedisRoomStore.update` is a
compare-and-set on ``Room.version`` done by one Lua script, so concurrent commands on one
room from any number of nodes are serialized: a lost race re-reads and re-runs the pure
engine. Invitation codes are indexed by keys that expire with the invitation and are
claimed in the same script (a code already used by another room counts as a lost race).
Only GET/SET/DEL/S* commands and EVAL are used (Valkey and Dragonfly have them).

Keys (``P`` is the broker's prefix): ``P:room:{id}`` (JSON), ``P:rooms`` (set of ids),
``P:invite:{code}`` (room id, expires with the invitation).
"""

from __future__ import annotations

import builtins
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from ..codes import ErrorCode
from ..exceptions import BrokerUnavailable, RequestError
from ..protocol import now_ms
from .machine import SECURE_IDS, IdSource, Room

__all__ = ["RedisRoomStore"]

R = TypeVar("R")
T = TypeVar("T")

# KEYS: room, rooms-set. ARGV: room_id, expected version ("" = must not exist), new JSON
# ("" = delete), prefix, now_ms, then pairs (code, expires_at_ms) to claim, then "|",
# then codes to release.
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
local prefix = ARGV[4]
local now = tonumber(ARGV[5])
local i = 6
local claims = {}
while ARGV[i] ~= '|' do
  local code, exp = ARGV[i], tonumber(ARGV[i + 1])
  local owner = redis.call('GET', prefix .. ':invite:' .. code)
  if owner and owner ~= ARGV[1] then return 'code_taken' end
  if exp > now then table.insert(claims, {code, exp - now}) end
  i = i + 2
end
i = i + 1
while ARGV[i] do
  local key = prefix .. ':invite:' .. ARGV[i]
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
  i = i + 1
end
if ARGV[3] == '' then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], ARGV[1])
  for _, c in ipairs(claims) do redis.call('DEL', prefix .. ':invite:' .. c[1]) end
  return 'ok'
end
for _, c in ipairs(claims) do
  redis.call('SET', prefix .. ':invite:' .. c[1], ARGV[1], 'PX', math.floor(c[2]))
end
redis.call('SET', KEYS[1], ARGV[3])
redis.call('SADD', KEYS[2], ARGV[1])
return 'ok'
"""


class RedisRoomStore:
    """:class:`~revenge_ws.syncplay.store.RoomStore` in Redis (see the module doc)."""

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str = "revenge",
        max_rooms: int = 10_000,
        max_attempts: int = 8,
        ids: IdSource = SECURE_IDS,
    ) -> None:
        self._redis = redis
        self.prefix = prefix
        self.max_rooms = max_rooms
        self.max_attempts = max_attempts
        self.ids = ids
        self._cas = redis.register_script(_CAS)

    @classmethod
    def for_broker(cls, broker: Any, **kw: Any) -> RedisRoomStore:
        """Share the Redis broker's connection pool and key prefix."""
        return cls(broker.redis, prefix=broker.prefix, **kw)

    def _room_key(self, room_id: str) -> str:
        return f"{self.prefix}:room:{room_id}"

    @property
    def _set_key(self) -> str:
        return f"{self.prefix}:rooms"

    async def _run(self, aw: Awaitable[T]) -> T:
        try:
            return await aw
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"redis: {exc}") from None

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

    async def _write(self, room: Room, expected: str, old_codes: set[str]) -> str:
        codes = [(c, inv.expires_at) for c, inv in room.invites.items()]
        release = sorted(old_codes - set(room.invites))
        argv: list[Any] = [
            room.room_id,
            expected,
            "" if room.ended else orjson.dumps(room.to_dict()),
        ]
        argv += [self.prefix, int(now_ms())]
        for code, exp in codes:
            argv += [code, int(exp)]
        argv += ["|", *release]
        result = await self._run(
            self._cas(keys=[self._room_key(room.room_id), self._set_key], args=argv)
        )
        return result.decode() if isinstance(result, bytes) else str(result)

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
        for _ in range(self.max_attempts):
            raw = await self._run(self._redis.get(self._room_key(room_id)))
            if raw is None:
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
        raise RequestError(ErrorCode.UNAVAILABLE, "the room is busy; try again", retryable=True)

    async def delete(self, room_id: str) -> bool:
        room = await self.get(room_id)
        if room is None:
            return False
        room.ended = True
        return await self._write(room, str(room.version), set(room.invites)) == "ok"

    async def find_invite(self, code: str, now_ms: float) -> Room | None:
        code = code.replace("-", "").replace(" ", "").upper()
        room_id = await self._run(self._redis.get(f"{self.prefix}:invite:{code}"))
        if room_id is None:
            return None
        room = await self.get(_text(room_id))
        if room is None:
            return None
        invite = room.invites.get(code)
        if invite is None or invite.expires_at <= now_ms:
            return None
        return room


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
