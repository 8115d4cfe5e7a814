"""The deadline index: rooms record their next deadline, stores index it, and the node's
timeout sweep loads only the rooms that are due (not every room every second)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import pytest

from revenge_ws.features.syncplay import SyncPlay
from revenge_ws.syncplay import machine
from revenge_ws.syncplay.machine import Actor, Outcome, Room, Settings, handle, next_deadline, tick
from revenge_ws.syncplay.store import MemoryRoomStore

R = TypeVar("R")
T0 = 1_700_000_000_000.0
S = Settings(scrypt_n=16, scrypt_r=1)


def who(uid: str) -> Actor:
    return Actor(uid, uid.title(), f"s-{uid}")


def new_room(at: float = T0, uid: str = "alice") -> Room:
    data = {"name": "room", "content": {"type": "movie", "id": "m"}, "public": True}
    out = handle(None, "syncplay.create", data, who(uid), at, settings=S)
    assert out.room is not None
    return out.room


def do(room: Room, rtype: str, uid: str, at: float, **data: Any) -> Outcome:
    payload = {"room_id": room.room_id, **data}
    return handle(room, f"syncplay.{rtype}", payload, who(uid), at, settings=S)


# --------------------------------------------------------------------------- the engine


def test_every_change_records_the_next_deadline() -> None:
    room = new_room()
    assert room.due_at == next_deadline(room, S) == T0 + S.member_stale_ms
    do(room, "join", "bob", T0 + 1_000)
    do(room, "ready", "alice", T0 + 2_000)
    assert room.due_at == next_deadline(room, S)
    out = machine.disconnect(room, "bob", "s-bob", T0 + 3_000, settings=S)
    assert out.changed
    assert room.due_at == next_deadline(room, S) == out.next_deadline
    out = tick(room, T0 + 40_000, settings=S)  # alice goes stale, bob's grace is over
    assert out.changed
    assert room.due_at == next_deadline(room, S)
    assert Room.from_dict(room.to_dict()).due_at == room.due_at


def test_an_unchanged_outcome_reports_the_recorded_deadline() -> None:
    room = new_room()
    do(room, "report", "alice", T0 + S.presence_refresh_ms, position=0.0, is_playing=False)
    version = room.version
    out = do(
        room, "report", "alice", T0 + S.presence_refresh_ms + 1, position=0.0, is_playing=False
    )
    assert not out.changed
    assert room.version == version
    assert out.next_deadline == room.due_at == next_deadline(room, S)


def test_tick_records_a_missing_or_wrong_deadline_once() -> None:
    room = new_room()
    room.due_at = None  # a room stored before rooms recorded their deadline
    version = room.version
    out = tick(room, T0 + 1, settings=S)
    assert out.changed and out.effects == []
    assert room.version == version + 1
    assert room.due_at == next_deadline(room, S)
    assert not tick(room, T0 + 2, settings=S).changed
    # Settings of another node: the deadline is corrected by the tick that sees it.
    lenient = Settings(scrypt_n=16, scrypt_r=1, member_stale_ms=60_000.0)
    assert tick(room, T0 + 3, settings=lenient).changed
    assert room.due_at == T0 + 60_000.0


def test_an_ended_room_has_no_deadline() -> None:
    room = new_room()
    out = tick(room, T0 + S.member_remove_ms, settings=S)
    assert room.ended
    assert room.due_at is None and out.next_deadline is None


# --------------------------------------------------------------------------- the memory store


@pytest.fixture(params=[True, False], ids=["isolated", "live"])
def store(request: pytest.FixtureRequest) -> MemoryRoomStore:
    return MemoryRoomStore(isolate=request.param)


async def test_due_names_rooms_whose_deadline_passed_earliest_first(store: MemoryRoomStore) -> None:
    first, second = new_room(T0 + 5_000), new_room(T0)
    second.room_id = "second"
    await store.create(first)
    await store.create(second)
    assert await store.due(T0 + S.member_stale_ms - 1) == []
    assert await store.due(T0 + S.member_stale_ms) == ["second"]
    # Still due until a write moves the deadline: a failed sweep is retried.
    assert await store.due(T0 + 40_000) == ["second", first.room_id]
    assert await store.due(T0 + 40_000) == ["second", first.room_id]
    await store.update("second", lambda r: tick(r, T0 + 40_000, settings=S))
    assert await store.due(T0 + 40_000) == [first.room_id]
    # alice of "second" is removed at last_seen + member_remove_ms: the room ends.
    await store.update("second", lambda r: tick(r, T0 + S.member_remove_ms, settings=S))
    assert await store.get("second") is None
    assert await store.due(T0 + 10**9) == [first.room_id]
    assert await store.delete(first.room_id)
    assert await store.due(T0 + 10**9) == []


async def test_unknown_deadlines_are_due_at_once(store: MemoryRoomStore) -> None:
    room = new_room()
    room.due_at = None
    await store.create(room)
    assert await store.due(0.0) == [room.room_id]
    await store.update(room.room_id, lambda r: tick(r, T0, settings=S))
    assert await store.due(T0) == []


async def test_the_heap_stays_bounded_and_right_under_many_writes() -> None:
    store = MemoryRoomStore(isolate=False)
    rooms = [new_room(T0 + i) for i in range(5)]
    for i, room in enumerate(rooms):
        room.room_id = f"r{i}"
        do(room, "ready", "alice", T0 + i)  # not blocking: only presence sets the deadline
        await store.create(room)
    # Each presence write moves a room's deadline and leaves a stale heap entry behind.
    for step in range(1, 400):
        at = T0 + step * S.presence_refresh_ms
        rid = f"r{step % 5}"
        await store.update(
            rid, lambda r, at=at: do(r, "report", "alice", at, position=0.0, is_playing=False)
        )
    assert len(store._heap) <= 2 * len(store._due) + 64
    at = T0 + 399 * S.presence_refresh_ms
    expected = []
    for i in range(5):
        room = await store.get(f"r{i}")
        assert room is not None and room.due_at is not None
        if room.due_at <= at + S.member_stale_ms:
            expected.append((room.due_at, room.room_id))
    assert await store.due(at + S.member_stale_ms) == [rid for _, rid in sorted(expected)]


# --------------------------------------------------------------------------- the node's sweep


class _Pub:
    seq = 1


class StubNode:
    """What SyncPlay.apply needs from a node: publications and per-connection actions."""

    def __init__(self) -> None:
        self.published: list[tuple[str, str, dict[str, Any]]] = []

    async def publish(self, channel: str, mtype: str, data: dict[str, Any]) -> _Pub:
        self.published.append((channel, mtype, data))
        return _Pub()

    async def session_action(self, *args: Any, **kw: Any) -> None:
        return None


class CountingStore(MemoryRoomStore):
    def __init__(self) -> None:
        super().__init__(isolate=False)
        self.loads: list[str] = []

    async def list_all(self) -> list[Room]:
        self.loads.append("*")
        return await super().list_all()

    async def get(self, room_id: str) -> Room | None:
        self.loads.append(room_id)
        return await super().get(room_id)

    async def update(self, room_id: str, fn: Callable[[Room], R]) -> R:
        self.loads.append(room_id)
        return await super().update(room_id, fn)


async def test_the_sweep_loads_only_rooms_that_are_due(monkeypatch: pytest.MonkeyPatch) -> None:
    store = CountingStore()
    rooms = [new_room(T0 + i * 60_000) for i in range(3)]
    for i, room in enumerate(rooms):
        room.room_id = f"r{i}"
        await store.create(room)
    feature = SyncPlay(StubNode(), store, S)  # type: ignore[arg-type]
    clock = [T0 + 1_000]
    monkeypatch.setattr("revenge_ws.features.syncplay.now_ms", lambda: clock[0])
    await feature.tick_once()
    assert store.loads == []  # nothing due: no room loaded at all
    clock[0] = T0 + S.member_stale_ms  # r0's alice goes stale
    await feature.tick_once()
    assert store.loads == ["r0"]
    r0 = await store.get("r0")
    assert r0 is not None and not r0.members["alice"].connected
    assert ("playback:r0", "syncplay.member_updated") in {
        (c, t)
        for c, t, _ in feature.node.published  # type: ignore[attr-defined]
    }
    store.loads.clear()
    await feature.tick_once()
    assert store.loads == []  # handled: no longer due
