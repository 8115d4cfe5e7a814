"""What a SyncPlay request yields: who asked (:class:`Actor`), and the :class:`Outcome`
with the effects the node carries out in order once the room is stored."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .model import Room

# --------------------------------------------------------------------------- effects


@dataclass(frozen=True, slots=True)
class Actor:
    """Who sent a request. ``session_id`` is None for calls that come over HTTP."""

    user_id: str
    username: str
    session_id: str | None = None
    is_admin: bool = False


@dataclass(frozen=True, slots=True)
class Publish:
    """Publish ``type``/``data`` on ``channel`` (always the room's ``playback:`` channel)."""

    channel: str
    type: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Direct:
    """Send ``type``/``data`` to one member's connection (no ``seq``). ``session_id`` is None
    only for a member that has no connection (joined over HTTP): there is nothing to deliver."""

    user_id: str
    session_id: str | None
    type: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Subscribe that connection to ``channel`` and remember it is in this room."""

    user_id: str
    session_id: str
    channel: str


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """Unsubscribe that connection from ``channel``; it is no longer in this room."""

    user_id: str
    session_id: str
    channel: str


@dataclass(frozen=True, slots=True)
class RoomEnded:
    """The room is over: the store drops it (``Room.ended`` is set)."""

    room_id: str
    reason: str


Effect = Publish | Direct | Subscribe | Unsubscribe | RoomEnded


@dataclass(slots=True)
class Outcome:
    """What a call did.

    ``reply`` is the ``ack`` data. ``effects`` must be carried out in order, and only after the
    room was stored: ``Subscribe`` comes before the publications its connection must see, and
    ``Unsubscribe`` after the ones (``member_left``, ``ended``) it must still get.
    ``changed`` says whether the room must be written. ``next_deadline`` is when :func:`tick`
    next has work (None for an ended room).
    """

    room: Room | None
    reply: dict[str, Any] = field(default_factory=dict)
    effects: list[Effect] = field(default_factory=list)
    changed: bool = False
    next_deadline: float | None = None
