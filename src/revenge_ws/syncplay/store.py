"""Where SyncPlay rooms live between requests.

:class:`RoomStore` is the contract the node relies on; :class:`MemoryRoomStore` implements it
in process (one node, tests). A shared implementation (Redis) keeps each room as one JSON blob
of :meth:`Room.to_dict` and fulfils the same guarantees:

- ``update`` is a compare-and-set on ``Room.version``: read the blob, run ``fn`` on a fresh
  :class:`Room`, and write only if the stored version is still the one read (``WATCH``/``MULTI``
  or a Lua script comparing ``version``); on a lost race, read again and re-run ``fn``. ``fn``
  is pure apart from mutating the room it is given (the engine in
  :mod:`revenge_ws.syncplay.machine` is), so running it twice is harmless: the node acts only
  on the result of the run that was committed.
- Invitation codes are indexed (``code -> room_id``, e.g. ``SET NX PX`` keys), globally unique:
  a write that would add a code already used by another room is treated like a lost race, so
  ``fn`` runs again and draws another code.
- Public rooms and all rooms are indexed (sets) for ``list_public``/``list_all``.
- Rooms are indexed by their next deadline (``Room.due_at``, recorded by the engine at every
  change), written atomically with the room, for :meth:`RoomStore.due`: the node's timeout
  sweep loads only the rooms that have something due instead of every room every second.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

from ..codes import ErrorCode
from ..exceptions import RequestError
from .ids import SECURE_IDS, IdSource
from .model import Room, invite_key

__all__ = ["MemoryRoomStore", "RoomStore"]

R = TypeVar("R")


class RoomStore(Protocol):
    """Persistence of SyncPlay rooms. Every method returns copies: mutating a returned
    :class:`Room` changes nothing stored; only :meth:`update` writes an existing room."""

    async def get(self, room_id: str) -> Room | None:
        """The room, or None when there is no such room (ended rooms are gone)."""
        ...

    async def list_public(self) -> list[Room]:
        """Every public room, oldest first."""
        ...

    async def list_all(self) -> list[Room]:
        """Every room, oldest first (admins, the node's timeout sweeper)."""
        ...

    async def due(self, now_ms: float) -> list[str]:
        """Ids of the rooms whose recorded deadline (``Room.due_at``) is at or before
        ``now_ms``, earliest first; a room without one counts as due at once. A room stays
        due until a write records a later deadline (the engine's ``tick`` records one
        whenever the recorded one is wrong), so a sweep that fails is retried by the next."""
        ...

    async def create(self, room: Room) -> None:
        """Store a new room. ``CONFLICT`` when its id or one of its invitation codes is taken,
        or when the store is full."""
        ...

    async def update(self, room_id: str, fn: Callable[[Room], R]) -> R:
        """Run ``fn`` on the current room and store what it left, atomically per room.

        Commands on one room are serialized: no two ``fn`` runs on the same room interleave
        with each other's writes, and a committed run always saw the latest committed room.
        ``fn`` may run more than once (compare-and-set retries); only the last run's result is
        returned, and only its changes are stored. Nothing is written when ``fn`` raises
        (the exception propagates) or leaves ``Room.version`` unchanged. When ``fn`` leaves
        the room ended (``Room.ended``), the room and its invitations are deleted.
        ``NOT_FOUND`` when there is no such room; ``UNAVAILABLE`` (retryable) when the
        bounded retries were exhausted.
        """
        ...

    async def delete(self, room_id: str) -> bool:
        """Remove the room and its invitation codes; False when there was none."""
        ...

    async def find_invite(self, code: str, now_ms: float) -> Room | None:
        """The room an unexpired invitation code admits to, or None."""
        ...


class MemoryRoomStore:
    """An in-process :class:`RoomStore` (one node, development, tests).

    Two modes:

    - ``isolate=True`` (default): rooms are kept as ``to_dict`` snapshots and ``fn`` runs on a
      fresh copy, exactly like a shared store: a failing ``fn`` leaves nothing behind, and a
      room that would not survive JSON fails here first.
    - ``isolate=False``: ``fn`` runs on the stored room itself, which skips a
      deserialization per request (about 10x cheaper for a 50-member room). The guarantee
      "nothing is written when ``fn`` raises" then holds only for functions that raise before
      mutating, which the engine's ``handle``/``tick``/``disconnect`` guarantee for
      :class:`RequestError`; any change ``fn`` makes sticks even without a version bump.
      Invitation codes are checked after ``fn`` and cannot be redrawn by running it again,
      so a code already used by another room is removed from the room and the update fails
      with a retryable ``CONFLICT`` (draw codes with :attr:`ids` to make that practically
      impossible).

    Updates are serialized per room by an :class:`asyncio.Lock`. Nothing awaits between read
    and write today, so the lock only matters if that changes, but it makes the guarantee
    independent of that detail.
    """

    def __init__(
        self,
        *,
        max_rooms: int = 10_000,
        max_attempts: int = 5,
        isolate: bool = True,
        ids: IdSource = SECURE_IDS,
    ) -> None:
        if max_rooms < 1 or max_attempts < 1:
            raise ValueError("max_rooms and max_attempts must be >= 1")
        self.max_rooms = max_rooms
        self.max_attempts = max_attempts
        self.isolate = isolate
        self._snaps: dict[str, dict[str, Any]] = {}  # isolate=True
        self._live: dict[str, Room] = {}  # isolate=False
        self._locks: dict[str, asyncio.Lock] = {}
        self._invites: dict[str, str] = {}  # code -> room_id
        self._codes: dict[str, set[str]] = {}  # room_id -> its codes
        self._due: dict[str, float] = {}  # room_id -> recorded deadline
        # (deadline, room_id), with stale entries skipped when popped: updates only push.
        self._heap: list[tuple[float, str]] = []
        #: Pass this to the engine: its invitation codes avoid every code in use here.
        self.ids: IdSource = _FreshCodes(self._invites, ids)

    def __len__(self) -> int:
        return len(self._snaps) + len(self._live)

    async def get(self, room_id: str) -> Room | None:
        if self.isolate:
            snap = self._snaps.get(room_id)
            return None if snap is None else Room.from_dict(snap)
        room = self._live.get(room_id)
        return None if room is None else Room.from_dict(room.to_dict())

    async def list_public(self) -> list[Room]:
        return [r for r in await self.list_all() if r.public]

    async def list_all(self) -> list[Room]:
        if self.isolate:
            rooms = [Room.from_dict(s) for s in self._snaps.values()]
        else:
            rooms = [Room.from_dict(r.to_dict()) for r in self._live.values()]
        rooms.sort(key=lambda r: (r.created_at, r.room_id))
        return rooms

    async def due(self, now_ms: float) -> list[str]:
        heap, found = self._heap, {}
        while heap and heap[0][0] <= now_ms:
            deadline, room_id = heapq.heappop(heap)
            if self._due.get(room_id) == deadline:
                found[room_id] = deadline
        # Still due until a write moves them: back into the heap.
        for room_id, deadline in found.items():
            heapq.heappush(heap, (deadline, room_id))
        return list(found)

    async def create(self, room: Room) -> None:
        if room.ended:
            raise ValueError("cannot store an ended room")
        if room.room_id in self._snaps or room.room_id in self._live:
            raise RequestError(ErrorCode.CONFLICT, "a room with this id already exists")
        if len(self) >= self.max_rooms:
            raise RequestError(ErrorCode.CONFLICT, "too many rooms on this server; try later")
        if self._taken_codes(room):
            raise RequestError(ErrorCode.CONFLICT, "an invitation code is already in use")
        self._put(room, Room.from_dict(room.to_dict()))

    async def update(self, room_id: str, fn: Callable[[Room], R]) -> R:
        if room_id not in self._snaps and room_id not in self._live:
            # Checked before creating a lock, so unknown ids cannot grow the lock table.
            raise RequestError(ErrorCode.NOT_FOUND, "no such room")
        lock = self._locks.setdefault(room_id, asyncio.Lock())
        async with lock:
            if not self.isolate:
                return self._update_live(room_id, fn)
            for _ in range(self.max_attempts):
                snap = self._snaps.get(room_id)
                if snap is None:
                    raise RequestError(ErrorCode.NOT_FOUND, "no such room")
                room = Room.from_dict(snap)
                result = fn(room)
                if room.version == snap["version"]:
                    return result
                self._check_id(room, room_id)
                if room.ended:
                    self._drop(room_id)
                    return result
                if self._taken_codes(room):
                    continue  # like a lost compare-and-set: the rerun draws other codes
                self._put(room, room)
                return result
        raise RequestError(ErrorCode.UNAVAILABLE, "the room is busy; try again", retryable=True)

    async def delete(self, room_id: str) -> bool:
        if room_id not in self._snaps and room_id not in self._live:
            return False
        self._drop(room_id)
        return True

    async def find_invite(self, code: str, now_ms: float) -> Room | None:
        code = invite_key(code)
        room_id = self._invites.get(code)
        room = None if room_id is None else await self.get(room_id)
        if room is None:
            return None
        return None if room.live_invite(code, now_ms) is None else room

    # -- internals

    def _update_live(self, room_id: str, fn: Callable[[Room], R]) -> R:
        room = self._live[room_id]
        before = room.version
        result = fn(room)
        if room.version == before:
            return result
        self._check_id(room, room_id)
        if room.ended:
            self._drop(room_id)
            return result
        taken = self._taken_codes(room)
        for code in taken:
            del room.invites[code]
        self._put(room, room)
        if taken:
            raise RequestError(
                ErrorCode.CONFLICT, "invitation code clash; try again", retryable=True
            )
        return result

    @staticmethod
    def _check_id(room: Room, room_id: str) -> None:
        if room.room_id != room_id:
            raise ValueError("update must not change the room id")

    def _taken_codes(self, room: Room) -> list[str]:
        return [c for c in room.invites if self._invites.get(c, room.room_id) != room.room_id]

    def _put(self, room: Room, stored: Room) -> None:
        codes = set(room.invites)
        for code in self._codes.get(room.room_id, set()) - codes:
            del self._invites[code]
        for code in codes:
            self._invites[code] = room.room_id
        self._codes[room.room_id] = codes
        self._index(room)
        if self.isolate:
            self._snaps[room.room_id] = stored.to_dict()
        else:
            self._live[room.room_id] = stored

    def _drop(self, room_id: str) -> None:
        self._snaps.pop(room_id, None)
        self._live.pop(room_id, None)
        for code in self._codes.pop(room_id, set()):
            del self._invites[code]
        self._locks.pop(room_id, None)
        self._due.pop(room_id, None)

    def _index(self, room: Room) -> None:
        deadline = 0.0 if room.due_at is None else room.due_at
        if self._due.get(room.room_id) == deadline:
            return
        self._due[room.room_id] = deadline
        heapq.heappush(self._heap, (deadline, room.room_id))
        # Every write of a new deadline leaves a stale entry behind; rebuild before they
        # outnumber the live ones (reports rewrite every room every 10 s).
        if len(self._heap) > 2 * len(self._due) + 64:
            self._heap = [(d, r) for r, d in self._due.items()]
            heapq.heapify(self._heap)


class _FreshCodes:
    """An :class:`IdSource` whose invitation codes avoid the ones a store already indexes."""

    def __init__(self, taken: Mapping[str, str], base: IdSource) -> None:
        self._taken = taken
        self._base = base

    def new_id(self) -> str:
        return self._base.new_id()

    def invite_code(self) -> str:
        code = self._base.invite_code()
        for _ in range(16):
            if code not in self._taken:
                break
            code = self._base.invite_code()
        return code

    def salt(self) -> bytes:
        return self._base.salt()
