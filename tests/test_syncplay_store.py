"""The room store: copies, atomic per-room updates, invitation index, limits."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from revenge_ws.codes import ErrorCode
from revenge_ws.exceptions import RequestError
from revenge_ws.syncplay.machine import Actor, Invite, Outcome, Room, Settings, handle, tick
from revenge_ws.syncplay.store import MemoryRoomStore, RoomStore

T0 = 1_700_000_000_000.0
FAST = Settings(scrypt_n=16, scrypt_r=1)


class Codes:
    """An IdSource whose invitation codes are scripted."""

    def __init__(self, *codes: str) -> None:
        self.codes = list(codes)
        self.n = 0

    def new_id(self) -> str:
        self.n += 1
        return f"r{self.n}"

    def invite_code(self) -> str:
        return self.codes.pop(0)

    def salt(self) -> bytes:
        return b"0" * 16


def who(uid: str) -> Actor:
    return Actor(uid, uid.title(), f"s-{uid}")


def new_room(name: str = "room", *, public: bool = True, ids: Any = None, at: float = T0) -> Room:
    data = {"name": name, "content": {"type": "movie", "id": "m"}, "public": public}
    out = handle(None, "syncplay.create", data, who("alice"), at, settings=FAST, ids=ids or Codes())
    assert out.room is not None
    return out.room


@pytest.fixture(params=[True, False], ids=["isolated", "live"])
def store(request: pytest.FixtureRequest) -> MemoryRoomStore:
    return MemoryRoomStore(isolate=request.param)


def op(rtype: str, uid: str = "alice", at: float = T0, ids: Any = None, **data: Any) -> Any:
    def fn(room: Room) -> Outcome:
        payload = {"room_id": room.room_id, **data}
        kwargs: dict[str, Any] = {"settings": FAST}
        if ids is not None:
            kwargs["ids"] = ids
        return handle(room, f"syncplay.{rtype}", payload, who(uid), at, **kwargs)

    return fn


async def test_create_get_and_list_return_copies(store: MemoryRoomStore) -> None:
    typed: RoomStore = store  # mypy checks that the Protocol is satisfied
    assert typed is store
    a = new_room("a", ids=Codes())
    b = new_room("b", public=False, ids=Codes(), at=T0 - 1)
    b.room_id = "r-b"
    await store.create(a)
    await store.create(b)
    got = await store.get(a.room_id)
    assert got == a
    assert got is not a
    got.name = "mutated"
    stored = await store.get(a.room_id)
    assert stored is not None
    assert stored.name == "a"
    assert [r.room_id for r in await store.list_all()] == ["r-b", a.room_id]
    assert [r.room_id for r in await store.list_public()] == [a.room_id]
    assert await store.get("nope") is None


async def test_create_refuses_duplicates_full_store_and_ended_rooms() -> None:
    store = MemoryRoomStore(max_rooms=1)
    room = new_room()
    await store.create(room)
    with pytest.raises(RequestError) as dup:
        await store.create(room)
    assert dup.value.code == ErrorCode.CONFLICT
    other = new_room()
    other.room_id = "other"
    with pytest.raises(RequestError) as full:
        await store.create(other)
    assert full.value.code == ErrorCode.CONFLICT
    assert len(store) == 1
    other.ended = True
    with pytest.raises(ValueError, match="ended"):
        await MemoryRoomStore().create(other)
    with pytest.raises(ValueError, match=">= 1"):
        MemoryRoomStore(max_rooms=0)


async def test_update_stores_the_outcome_of_fn(store: MemoryRoomStore) -> None:
    room = new_room()
    await store.create(room)
    out = await store.update(room.room_id, op("join", "bob"))
    assert out.reply["room"]["member_count"] == 2
    stored = await store.get(room.room_id)
    assert stored is not None
    assert set(stored.members) == {"alice", "bob"}
    assert stored.version == room.version + 1


async def test_isolated_update_writes_nothing_when_fn_raises_or_changes_nothing() -> None:
    store = MemoryRoomStore()
    room = new_room()
    await store.create(room)

    def half_then_fail(r: Room) -> None:
        r.name = "half-done"
        r.version += 1
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await store.update(room.room_id, half_then_fail)
    with pytest.raises(RequestError):
        await store.update(room.room_id, op("kick", user_id="zed"))

    def no_version_bump(r: Room) -> str:
        r.name = "sneaky"
        return "done"

    assert await store.update(room.room_id, no_version_bump) == "done"
    assert await store.get(room.room_id) == room


async def test_update_unknown_room_is_not_found_without_leaking_locks(
    store: MemoryRoomStore,
) -> None:
    with pytest.raises(RequestError) as info:
        await store.update("ghost", lambda r: None)
    assert info.value.code == ErrorCode.NOT_FOUND
    assert store._locks == {}


async def test_update_may_not_rename_a_room(store: MemoryRoomStore) -> None:
    room = new_room()
    await store.create(room)

    def rename(r: Room) -> None:
        r.room_id = "elsewhere"
        r.version += 1

    with pytest.raises(ValueError, match="room id"):
        await store.update(room.room_id, rename)


async def test_ending_a_room_deletes_it_and_its_invitations(store: MemoryRoomStore) -> None:
    room = new_room(ids=Codes("ABCDEFGH"))
    await store.create(room)
    await store.update(room.room_id, op("invite", ids=Codes("ABCDEFGH")))
    assert await store.find_invite("ABCDEFGH", T0) is not None
    out = await store.update(room.room_id, op("end"))
    assert out.room is not None
    assert out.room.ended
    assert await store.get(room.room_id) is None
    assert await store.find_invite("ABCDEFGH", T0) is None
    assert len(store) == 0
    assert store._locks == {}
    assert await store.delete(room.room_id) is False


async def test_concurrent_commands_are_serialized(store: MemoryRoomStore) -> None:
    room = new_room()
    await store.create(room)
    users = [f"u{i}" for i in range(30)]
    await asyncio.gather(*(store.update(room.room_id, op("join", u)) for u in users))
    chats = [op("chat", u, message=f"hi from {u}") for u in users]
    await asyncio.gather(*(store.update(room.room_id, fn) for fn in chats))
    stored = await store.get(room.room_id)
    assert stored is not None
    assert len(stored.members) == 31
    assert len(stored.chat) == 30
    assert stored.version == room.version + 60


async def test_find_invite_normalizes_and_checks_expiry(store: MemoryRoomStore) -> None:
    room = new_room()
    await store.create(room)
    out = await store.update(room.room_id, op("invite", ids=Codes("HJKMNPQR")))
    assert out.reply["code"] == "HJKMNPQR"
    found = await store.find_invite("hjkm-npqr", T0)
    assert found is not None
    assert found.room_id == room.room_id
    assert await store.find_invite("HJKMNPQR", T0 + 24 * 3_600_000) is None
    assert await store.find_invite("ZZZZZZZZ", T0) is None
    # The node's join-by-code flow: resolve the code, then join that room.
    joined = await store.update(found.room_id, op("join", "bob", invite_code="HJKMNPQR"))
    assert joined.reply["room"]["member_count"] == 2


async def test_pruned_invitations_leave_the_index(store: MemoryRoomStore) -> None:
    room = new_room()
    await store.create(room)
    await store.update(room.room_id, op("invite", ids=Codes("AAAAAAAA")))
    later = T0 + 24 * 3_600_000

    def keep_alive_then_tick(r: Room) -> Outcome:
        op("chat", at=later, message="hi")(r)
        return tick(r, later, settings=FAST)

    await store.update(room.room_id, keep_alive_then_tick)
    assert store._invites == {}


async def test_refused_requests_leave_live_rooms_untouched() -> None:
    store = MemoryRoomStore(isolate=False)
    room = new_room()
    await store.create(room)
    room.name = "the caller's copy is not the stored room"
    await store.update(room.room_id, op("join", "bob"))
    before = await store.get(room.room_id)
    with pytest.raises(RequestError):
        await store.update(room.room_id, op("kick", "bob", user_id="alice"))
    assert await store.get(room.room_id) == before
    assert before is not None
    assert before.name == "room"


async def code_taken(store: MemoryRoomStore) -> Room:
    """Two rooms, the second with the id ``second``; the first holds the code SAMECODE."""
    first, second = new_room("first"), new_room("second")
    second.room_id = "second"
    await store.create(first)
    await store.create(second)
    await store.update(first.room_id, op("invite", ids=Codes("SAMECODE")))
    return first


async def test_a_code_taken_by_another_room_makes_fn_run_again() -> None:
    store = MemoryRoomStore()
    first = await code_taken(store)
    # The first run draws the taken code; the rerun draws a fresh one.
    out = await store.update("second", op("invite", ids=Codes("SAMECODE", "FRESHONE")))
    assert out.reply["code"] == "FRESHONE"
    a = await store.find_invite("SAMECODE", T0)
    b = await store.find_invite("FRESHONE", T0)
    assert a is not None
    assert b is not None
    assert (a.room_id, b.room_id) == (first.room_id, "second")


async def test_live_mode_refuses_a_clashing_code() -> None:
    store = MemoryRoomStore(isolate=False)
    first = await code_taken(store)
    with pytest.raises(RequestError) as info:
        await store.update("second", op("invite", ids=Codes("SAMECODE")))
    assert info.value.code == ErrorCode.CONFLICT
    assert info.value.retryable
    stored = await store.get("second")
    assert stored is not None
    assert stored.invites == {}
    found = await store.find_invite("SAMECODE", T0)
    assert found is not None
    assert found.room_id == first.room_id


async def test_store_ids_avoid_codes_in_use() -> None:
    store = MemoryRoomStore(isolate=False, ids=Codes("SAMECODE", "SAMECODE", "OTHERONE"))
    room = new_room()
    await store.create(room)
    await store.update(room.room_id, op("invite", ids=Codes("SAMECODE")))
    out = await store.update(room.room_id, op("invite", ids=store.ids))
    assert out.reply["code"] == "OTHERONE"
    assert store.ids.new_id() == "r1"
    assert store.ids.salt() == b"0" * 16


async def test_retries_are_bounded() -> None:
    store = MemoryRoomStore(max_attempts=2)
    first = await code_taken(store)
    with pytest.raises(RequestError) as info:
        await store.update("second", op("invite", ids=Codes("SAMECODE", "SAMECODE")))
    assert info.value.code == ErrorCode.UNAVAILABLE
    assert info.value.retryable
    stored = await store.get("second")
    assert stored is not None
    assert stored.invites == {}
    third = new_room("third", ids=Codes())
    third.room_id = "third"
    await store.update(first.room_id, lambda r: None)
    third.invites["SAMECODE"] = Invite("SAMECODE", "alice", T0, T0 + 1, None)
    with pytest.raises(RequestError) as taken:
        await store.create(third)
    assert taken.value.code == ErrorCode.CONFLICT


async def test_delete(store: MemoryRoomStore) -> None:
    room = new_room()
    await store.create(room)
    assert await store.delete(room.room_id) is True
    assert await store.get(room.room_id) is None
    assert await store.delete(room.room_id) is False
