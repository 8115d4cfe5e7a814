"""The room store contract, for the memory store and the Redis store alike (the Redis
one on a private redis-server): atomic per-room updates across nodes, invitations."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from revenge_ws.codes import ErrorCode
from revenge_ws.exceptions import RequestError
from revenge_ws.syncplay import machine
from revenge_ws.syncplay.machine import Actor, Room
from revenge_ws.syncplay.redis_store import RedisRoomStore
from revenge_ws.syncplay.store import MemoryRoomStore, RoomStore

from .helpers import redis_server

NOW = 1_800_000_000_000.0
ALICE = Actor("alice", "Alice", "s-a")
BOB = Actor("bob", "Bob", "s-b")


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture(params=["memory", "redis"])
async def stores(request: pytest.FixtureRequest) -> AsyncIterator[tuple[RoomStore, RoomStore]]:
    """Two views of one store (two nodes, for Redis)."""
    if request.param == "memory":
        store = MemoryRoomStore(max_rooms=3)
        yield store, store
        return
    url: str = request.getfixturevalue("redis_url")
    prefix = "t" + secrets.token_hex(4)
    clients = [aioredis.Redis.from_url(url, protocol=2) for _ in range(2)]
    try:
        yield (
            RedisRoomStore(clients[0], prefix=prefix, max_rooms=3),
            RedisRoomStore(clients[1], prefix=prefix, max_rooms=3),
        )
    finally:
        for c in clients:
            await c.aclose()


def new_room(**data: Any) -> Room:
    req = {"name": "R", "content": {"type": "movie", "id": "m"}, "public": True, **data}
    out = machine.handle(None, "create", req, ALICE, NOW)
    assert out.room is not None
    return out.room


async def test_create_get_list_delete(stores: tuple[RoomStore, RoomStore]) -> None:
    a, b = stores
    room = new_room()
    await a.create(room)
    got = await b.get(room.room_id)
    assert got is not None and got.to_dict() == room.to_dict()
    private = new_room(public=False)
    await a.create(private)
    assert [r.room_id for r in await b.list_all()] == sorted(
        [room.room_id, private.room_id], key=lambda i: (NOW, i)
    ) or len(await b.list_all()) == 2
    assert [r.room_id for r in await b.list_public()] == [room.room_id]
    with pytest.raises(RequestError) as info:
        await b.create(room)
    assert info.value.code is ErrorCode.CONFLICT
    await a.create(new_room())
    with pytest.raises(RequestError) as info:
        await a.create(new_room())  # max_rooms=3
    assert info.value.code is ErrorCode.CONFLICT
    assert await b.delete(room.room_id) is True
    assert await a.get(room.room_id) is None
    assert await a.delete(room.room_id) is False


async def test_update_is_atomic_across_nodes(stores: tuple[RoomStore, RoomStore]) -> None:
    a, b = stores
    room = new_room()
    await a.create(room)
    rid = room.room_id

    def chat(actor: Actor, i: int) -> Any:
        def step(r: Room) -> machine.Outcome:
            return machine.handle(r, "chat", {"room_id": rid, "message": f"m{i}"}, actor, NOW + i)

        return step

    await a.update(rid, lambda r: machine.handle(r, "join", {"room_id": rid}, BOB, NOW))
    results = await asyncio.gather(
        *(s.update(rid, chat(ALICE if i % 2 else BOB, i)) for i, s in enumerate([a, b] * 10))
    )
    assert len(results) == 20
    final = await a.get(rid)
    assert final is not None
    # No lost update: every chat message is there, exactly once.
    assert sorted(c["message"] for c in final.chat) == sorted(f"m{i}" for i in range(20))
    assert final.version == room.version + 21


async def test_refused_request_changes_nothing_and_unknown_room(
    stores: tuple[RoomStore, RoomStore],
) -> None:
    a, b = stores
    room = new_room(password="pw")
    await a.create(room)
    with pytest.raises(RequestError) as info:
        await b.update(
            room.room_id, lambda r: machine.handle(r, "join", {"room_id": room.room_id}, BOB, NOW)
        )
    assert info.value.code is ErrorCode.FORBIDDEN
    again = await a.get(room.room_id)
    assert again is not None and again.version == room.version
    with pytest.raises(RequestError) as info:
        await a.update("nope", lambda r: None)
    assert info.value.code is ErrorCode.NOT_FOUND


async def test_invitations_and_ending(stores: tuple[RoomStore, RoomStore]) -> None:
    a, b = stores
    room = new_room(password="pw")
    await a.create(room)
    rid = room.room_id
    ids = getattr(a, "ids", machine.SECURE_IDS)
    out = await a.update(
        rid, lambda r: machine.handle(r, "invite", {"room_id": rid}, ALICE, NOW, ids=ids)
    )
    code = out.reply["code"]
    found = await b.find_invite(code.lower(), NOW)
    assert found is not None and found.room_id == rid
    assert await b.find_invite(code, NOW + 25 * 3600 * 1000) is None  # expired
    assert await b.find_invite("ZZZZZZZZ", NOW) is None
    # Ending the room drops it and its codes.
    await b.update(rid, lambda r: machine.handle(r, "end", {"room_id": rid}, ALICE, NOW))
    assert await a.get(rid) is None
    assert await a.find_invite(code, NOW) is None


async def test_a_code_used_by_another_room_is_a_lost_race(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url, protocol=2)
    prefix = "t" + secrets.token_hex(4)
    try:

        class Fixed:
            def __init__(self) -> None:
                self.codes = iter(["AAAAAAAA", "AAAAAAAA", "BBBBBBBB"])

            def new_id(self) -> str:
                return secrets.token_hex(6)

            def invite_code(self) -> str:
                return next(self.codes)

            def salt(self) -> bytes:
                return b"0" * 16

        ids = Fixed()
        store = RedisRoomStore(client, prefix=prefix, ids=ids)
        r1, r2 = new_room(), new_room()
        await store.create(r1)
        await store.create(r2)
        for r in (r1, r2):
            rid = r.room_id
            await store.update(
                rid,
                lambda room, rid=rid: machine.handle(
                    room, "invite", {"room_id": rid}, ALICE, NOW, ids=ids
                ),
            )
        second = await store.get(r2.room_id)
        assert second is not None and list(second.invites) == ["BBBBBBBB"]
        assert (await store.find_invite("AAAAAAAA", NOW)).room_id == r1.room_id  # type: ignore[union-attr]
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- deadline index


def room_at(at: float) -> Room:
    req = {"name": "R", "content": {"type": "movie", "id": "m"}, "public": True}
    out = machine.handle(None, "create", req, ALICE, at)
    assert out.room is not None
    return out.room


async def test_the_deadline_index_is_shared_by_every_node(
    stores: tuple[RoomStore, RoomStore],
) -> None:
    a, b = stores
    first, second = room_at(NOW), room_at(NOW + 5_000)
    await a.create(first)
    await a.create(second)
    assert await b.due(NOW + 29_999) == []
    assert await b.due(NOW + 40_000) == [first.room_id, second.room_id]
    out = await b.update(first.room_id, lambda r: machine.tick(r, NOW + 40_000))
    assert out.changed  # alice went stale; her removal is the next deadline
    assert await a.due(NOW + 40_000) == [second.room_id]
    await b.update(first.room_id, lambda r: machine.tick(r, NOW + 120_000))  # empty: ended
    assert await a.due(NOW + 10**9) == [second.room_id]
    assert await b.delete(second.room_id)
    assert await a.due(NOW + 10**9) == []


async def test_the_redis_index_heals(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url, protocol=2)
    prefix = "t" + secrets.token_hex(4)
    due_key = f"{prefix}:rooms:due"
    try:
        store = RedisRoomStore(client, prefix=prefix)
        kept, lost = room_at(NOW), room_at(NOW)
        await store.create(kept)
        await store.create(lost)
        assert await store.due(NOW) == []  # the first call also checks the index
        # The index key is lost (eviction, a flush): found at the next check, each room at
        # the deadline its blob records.
        await client.delete(due_key)
        assert await store.due(NOW + 40_000) == []
        store._reindex_at = 0.0
        assert set(await store.due(NOW + 40_000)) == {kept.room_id, lost.room_id}
        assert await store.due(NOW + 29_999) == []
        # A room whose blob vanished leaves the index (else it would be due forever).
        await client.delete(f"{prefix}:room:{lost.room_id}")
        with pytest.raises(RequestError) as info:
            await store.update(lost.room_id, lambda r: machine.tick(r, NOW + 40_000))
        assert info.value.code is ErrorCode.NOT_FOUND
        assert await store.due(NOW + 40_000) == [kept.room_id]
        assert lost.room_id.encode() not in await client.smembers(f"{prefix}:rooms")
        # A blob written before rooms recorded deadlines: due at once, its tick records one.
        key = f"{prefix}:room:{kept.room_id}"
        raw = await client.get(key)
        assert raw is not None
        blob = orjson.loads(raw)
        del blob["due_at"]
        await client.set(key, orjson.dumps(blob))
        await client.zrem(due_key, kept.room_id)
        store._reindex_at = 0.0
        assert await store.due(NOW) == [kept.room_id]
        out = await store.update(kept.room_id, lambda r: machine.tick(r, NOW))
        assert out.changed and out.effects == []
        assert await store.due(NOW) == []
        assert await client.zscore(due_key, kept.room_id) == NOW + 30_000
    finally:
        await client.aclose()


async def test_any_node_applies_the_timeouts_of_a_room(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Node A wrote the room and is gone; node B's sweep finds it through the index."""
    from revenge_ws.features.syncplay import SyncPlay

    from .test_syncplay_deadlines import StubNode

    clients = [aioredis.Redis.from_url(redis_url, protocol=2) for _ in range(2)]
    prefix = "t" + secrets.token_hex(4)
    try:
        node_a, node_b = (RedisRoomStore(c, prefix=prefix) for c in clients)
        room = room_at(NOW)
        await node_a.create(room)
        rid = room.room_id
        await node_a.update(rid, lambda r: machine.handle(r, "join", {"room_id": rid}, BOB, NOW))
        await clients[0].aclose()
        stub = StubNode()
        feature = SyncPlay(stub, node_b, machine.DEFAULT_SETTINGS)  # type: ignore[arg-type]
        clock = [NOW + 29_000]
        monkeypatch.setattr("revenge_ws.features.syncplay.now_ms", lambda: clock[0])
        await feature.tick_once()
        assert stub.published == []
        clock[0] = NOW + 30_000
        await feature.tick_once()
        stored = await node_b.get(rid)
        assert stored is not None
        assert not stored.members["alice"].connected and not stored.members["bob"].connected
        assert {t for _, t, _ in stub.published} >= {"syncplay.member_updated"}
        clock[0] = NOW + 120_000
        await feature.tick_once()
        assert await node_b.get(rid) is None  # both removed: the room ended
        assert "syncplay.ended" in {t for _, t, _ in stub.published}
    finally:
        for c in clients:
            await c.aclose()
