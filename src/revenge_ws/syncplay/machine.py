"""SyncPlay room engine: a pure state machine for group watch parties (contract §8).

Nothing here does I/O or reads a clock or a random source of its own. Every call gets the
server clock as ``now_ms`` (ms since the Unix epoch) and, where it needs randomness, an
:class:`IdSource`; the result is an :class:`Outcome` (ack data plus the effects the node must
carry out). The node runs one request at a time per room (see
:class:`revenge_ws.syncplay.store.RoomStore.update`), so the functions here may mutate the
room they are given.

Guarantees
----------
- A request either succeeds, or raises :class:`RequestError` and leaves the room untouched
  (every check runs before the first mutation).
- ``Room.version`` grows by one on every call that changed the room (``Outcome.changed``);
  stores use it for compare-and-set. Duplicate and stale requests, and routine reports,
  change nothing at all, so they cost no write.
- ``command_seq`` grows by exactly one per published ``syncplay.command``.
- No room freezes: every reason to wait has a deadline that :func:`tick` enforces, and
  :func:`next_deadline` says when the next one falls. Every change records it in
  ``Room.due_at``, so a store can index rooms by deadline and the node ticks only rooms
  that are due.

Timeline
--------
The room's playback is ``(state, position, rate, when)``. While ``playing``,
``position(t) = position + (t - when) / 1000 * rate`` for ``t >= when`` and ``position`` before
``when`` (players wait, paused at ``position``, for the scheduled start). In any other state the
position is fixed. ``syncplay.state`` carries ``when`` as an added field, so a late joiner can
compute the position without waiting for the next command.

Scheduling rule
---------------
``play`` (also the automatic start when a ``waiting`` room stops waiting) and ``seek`` are
scheduled at ``when = now + lead`` where::

    lead = min(max_lead_ms, max(min_lead_ms, 2 * max(rtt_ms of connected members)))

(defaults 500 ms and 5 s). A publication reaches a member about ``rtt / 2`` after it leaves the
hub, so ``2 * rtt`` leaves four one-way delays of margin for jitter, the broker hop and fan-out;
members that never reported an RTT count as 0 and are covered by the 500 ms floor. The cap
stops one member on a terrible link from delaying everyone: such a member gets the command
late and is pulled in by drift correction. ``pause`` and ``rate`` take effect at ``when = now``:
stopping early is harmless, and a rate change that lands one one-way delay late is off by
``delay * delta_rate`` (tens of ms), which drift correction absorbs.

Readiness
---------
A member is *blocking* when it is connected, not ready, and neither asked to be ignored
(``ignore_wait``) nor timed out. New members and every member after ``set_content`` start
not ready. A ``play`` while anyone blocks puts the room in ``waiting``; the room starts by
itself as soon as nobody blocks. ``buffering`` from a member that was ready, while the room
plays, pauses everybody (``waiting``); a member that is still on its first load does not stop
a running room, it catches up. A blocking member is ignored after 60 s (first load) or 10 s
(rebuffer) without ``ready``: ``syncplay.wait_timeout`` tells everyone. After
``max_wait_timeouts`` (3) timeouts for one content the member no longer blocks at all, so a
flaky link cannot stall the group every few seconds.

Presence
--------
Requests refresh a member's presence (reports, every 5 s, double as a heartbeat; one is
written at most every ``presence_refresh_ms``, 10 s). A member silent for
30 s is marked disconnected (it stops blocking and stops counting for the lead) and removed
after 120 s; a member whose connection closed (:func:`disconnect`) is removed after 30 s unless
it joins again. The leader keeps leadership until removed; then it passes to the member
present longest (connected members first). When the last member leaves or is removed, the room
ends at once (reason ``empty``): an empty room has nobody to resume it, and ending it frees its
slot. A room with no activity other than reports for 24 h ends (reason ``idle``).

Drift
-----
``report`` compares the member's position (advanced by half its RTT) with the timeline. Beyond
``sync_threshold_s`` (or when it plays while it should not, or the reverse) the member gets a
direct ``syncplay.sync``. Hints back off per member: 1.5 s after the first, then doubling
while the member stays out of sync (up to 60 s), so a player that cannot follow never loops.
Reports are not judged during the first second after a command, nor while buffering, nor
when they carry an older ``command_seq``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Annotated, Any, Final, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..codes import ErrorCode
from ..exceptions import ConfigError, RequestError

__all__ = [
    "CONTROL_MODES",
    "DEFAULT_SETTINGS",
    "INVITE_ALPHABET",
    "REQUEST_TYPES",
    "SECURE_IDS",
    "STATES",
    "Actor",
    "Direct",
    "Effect",
    "IdSource",
    "Invite",
    "Member",
    "Outcome",
    "Publish",
    "Room",
    "RoomEnded",
    "SecureIds",
    "Settings",
    "Subscribe",
    "Unsubscribe",
    "channel_of",
    "chat_history",
    "disconnect",
    "handle",
    "hash_password",
    "lead_ms",
    "list_rooms",
    "next_deadline",
    "tick",
    "verify_password",
]

IDLE: Final = "idle"
WAITING: Final = "waiting"
PAUSED: Final = "paused"
PLAYING: Final = "playing"
STATES: Final = (IDLE, WAITING, PAUSED, PLAYING)

SHARED: Final = "shared"
LEADER_ONLY: Final = "leader_only"
CONTROL_MODES: Final = (SHARED, LEADER_ONLY)

# No 0/O, 1/I/L: codes are read aloud and typed from phones.
INVITE_ALPHABET: Final = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
INVITE_LENGTH: Final = 8

MAX_POSITION: Final = 10_000_000.0  # seconds (~115 days): bounds hostile input, not content
MAX_RTT_MS: Final = 600_000.0
_EPS_POS: Final = 0.0005  # positions are kept to 3 decimals
_SCHEMA: Final = 1


def channel_of(room_id: str) -> str:
    """The channel a room publishes on."""
    return f"playback:{room_id}"


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class Settings:
    """Node-wide SyncPlay limits and timings (times in ms unless the name says seconds)."""

    max_participants: int = 50
    max_participants_limit: int = 1000
    buffering_timeout_first_ms: float = 60_000.0
    buffering_timeout_rebuffer_ms: float = 10_000.0
    max_wait_timeouts: int = 3
    sync_threshold_s: float = 2.0
    sync_hint_interval_ms: float = 1_500.0
    sync_hint_max_interval_ms: float = 60_000.0
    sync_grace_ms: float = 1_000.0
    min_lead_ms: float = 500.0
    max_lead_ms: float = 5_000.0
    duplicate_window_ms: float = 1_000.0
    chat_per_minute: int = 60
    chat_max_chars: int = 1000
    chat_history: int = 100
    event_log_size: int = 200
    idle_end_ms: float = 24 * 3600 * 1000.0
    invite_ttl_ms: float = 24 * 3600 * 1000.0
    max_invites: int = 100
    presence_refresh_ms: float = 10_000.0
    member_stale_ms: float = 30_000.0  # 0 disables
    member_remove_ms: float = 120_000.0  # 0 disables
    reconnect_grace_ms: float = 30_000.0
    max_name_chars: int = 100
    scrypt_n: int = 2**14
    scrypt_r: int = 8
    scrypt_p: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.max_participants <= self.max_participants_limit:
            raise ConfigError("syncplay max_participants must be between 1 and the limit")
        if not 0 < self.min_lead_ms <= self.max_lead_ms:
            raise ConfigError("syncplay min_lead_ms must be > 0 and <= max_lead_ms")
        if self.member_stale_ms and self.presence_refresh_ms >= self.member_stale_ms:
            raise ConfigError("syncplay presence_refresh_ms must be below member_stale_ms")
        if self.sync_threshold_s <= 0:
            raise ConfigError("syncplay sync_threshold_s must be > 0")
        if self.scrypt_n < 2 or self.scrypt_n & (self.scrypt_n - 1):
            raise ConfigError("syncplay scrypt_n must be a power of two >= 2")
        for name in ("chat_per_minute", "chat_history", "event_log_size", "max_invites"):
            if getattr(self, name) < 1:
                raise ConfigError(f"syncplay {name} must be >= 1")


DEFAULT_SETTINGS: Final = Settings()


# --------------------------------------------------------------------------- randomness


class IdSource(Protocol):
    """Where the engine gets identifiers and salts (injected so tests are deterministic)."""

    def new_id(self) -> str:
        """A fresh, unguessable id (rooms, chat messages)."""
        ...

    def invite_code(self) -> str:
        """A fresh invitation code: ``INVITE_LENGTH`` characters of ``INVITE_ALPHABET``."""
        ...

    def salt(self) -> bytes:
        """A fresh password salt (16 random bytes)."""
        ...


class SecureIds:
    """The production :class:`IdSource`, backed by :mod:`secrets`."""

    def new_id(self) -> str:
        return secrets.token_urlsafe(12)

    def invite_code(self) -> str:
        return "".join(secrets.choice(INVITE_ALPHABET) for _ in range(INVITE_LENGTH))

    def salt(self) -> bytes:
        return secrets.token_bytes(16)


SECURE_IDS: Final = SecureIds()


def hash_password(password: str, salt: bytes, settings: Settings = DEFAULT_SETTINGS) -> str:
    """Hash a room password with scrypt; the result names its parameters and salt."""
    n, r, p = settings.scrypt_n, settings.scrypt_r, settings.scrypt_p
    dk = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32, maxmem=1 << 27)
    return f"scrypt${n}${r}${p}${salt.hex()}${dk.hex()}"


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches ``encoded`` (constant-time compare; False if malformed)."""
    try:
        algo, n_s, r_s, p_s, salt_hex, dk_hex = encoded.split("$")
        n, r, p = int(n_s), int(r_s), int(p_s)
        salt, expected = bytes.fromhex(salt_hex), bytes.fromhex(dk_hex)
    except ValueError:
        return False
    # Bounds keep a corrupted record from turning a join into a memory bomb.
    if algo != "scrypt" or not (2 <= n <= 1 << 20 and 1 <= r <= 32 and 1 <= p <= 16):
        return False
    dk = hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, dklen=len(expected), maxmem=1 << 27
    )
    return hmac.compare_digest(dk, expected)


# --------------------------------------------------------------------------- model


@dataclass(slots=True)
class Member:
    """One user in a room. ``session_id`` is the connection that currently represents it."""

    user_id: str
    username: str
    session_id: str | None
    joined_at: float
    last_seen_at: float
    can_control: bool = False
    is_ready: bool = False
    is_buffering: bool = False
    ignore_wait: bool = False
    wait_timed_out: bool = False
    wait_timeouts: int = 0
    first_load: bool = True
    not_ready_since: float | None = None
    rtt_ms: float | None = None
    position: float | None = None
    is_playing: bool = False
    connected: bool = True
    disconnected_at: float | None = None
    last_sync_at: float | None = None
    sync_streak: int = 0

    def view(self, leader_id: str | None) -> dict[str, Any]:
        """The contract's member object (plus a few added fields)."""
        return {
            "user_id": self.user_id,
            "username": self.username,
            "is_leader": self.user_id == leader_id,
            "can_control": self.can_control,
            "is_ready": self.is_ready,
            "is_buffering": self.is_buffering,
            "rtt_ms": None if self.rtt_ms is None else round(self.rtt_ms, 1),
            "ignore_wait": self.ignore_wait,
            "wait_timed_out": self.wait_timed_out,
            "is_connected": self.connected,
            "joined_at": self.joined_at,
        }


@dataclass(slots=True)
class Invite:
    """An invitation code: admits without the password until ``expires_at``."""

    code: str
    created_by: str
    created_at: float
    expires_at: float
    user_id: str | None = None


@dataclass(slots=True)
class Room:
    """A SyncPlay room. ``to_dict``/``from_dict`` round-trip it through JSON losslessly."""

    room_id: str
    name: str
    content: dict[str, str]
    public: bool
    password_hash: str | None
    max_participants: int
    control_mode: str
    leader_id: str | None
    created_at: float
    created_by: str
    state: str = IDLE
    position: float = 0.0
    rate: float = 1.0
    anchor_ms: float = 0.0
    updated_at: float = 0.0
    updated_by: str | None = None
    command_seq: int = 0
    last_command: dict[str, Any] | None = None
    members: dict[str, Member] = field(default_factory=dict)
    invites: dict[str, Invite] = field(default_factory=dict)
    banned: list[str] = field(default_factory=list)
    chat: list[dict[str, Any]] = field(default_factory=list)
    chat_times: dict[str, list[float]] = field(default_factory=dict)
    log: list[dict[str, Any]] = field(default_factory=list)
    last_activity_at: float = 0.0
    ended: bool = False
    ended_reason: str | None = None
    version: int = 0
    #: :func:`next_deadline` as of the last change (None: ended, or not known yet for a room
    #: stored before this field existed; :func:`tick` then records it). Stores index rooms
    #: by it, so the timeout sweep loads only rooms that are due.
    due_at: float | None = None

    # -- timeline

    def position_at(self, t_ms: float) -> float:
        """Where every player should be at server time ``t_ms`` (unrounded)."""
        if self.state != PLAYING or t_ms <= self.anchor_ms:
            return self.position
        return self.position + (t_ms - self.anchor_ms) / 1000.0 * self.rate

    # -- wire views

    def view(self) -> dict[str, Any]:
        """The contract's room object."""
        return {
            "room_id": self.room_id,
            "name": self.name,
            "content": dict(self.content),
            "public": self.public,
            "has_password": self.password_hash is not None,
            "max_participants": self.max_participants,
            "control_mode": self.control_mode,
            "leader_id": self.leader_id,
            "state": self.state,
            "member_count": len(self.members),
            "created_at": self.created_at,
        }

    def state_view(self, settings: Settings = DEFAULT_SETTINGS) -> dict[str, Any]:
        """The ``syncplay.state`` payload; ``when`` (added) anchors ``position``."""
        return {
            "room_id": self.room_id,
            "state": self.state,
            "position": round(self.position, 3),
            "rate": self.rate,
            "updated_at": self.updated_at,
            "updated_by": self.updated_by,
            "waiting_on": _waiting_on(self, settings) if self.state == WAITING else [],
            "command_seq": self.command_seq,
            "when": self.anchor_ms,
        }

    def members_view(self) -> list[dict[str, Any]]:
        return [m.view(self.leader_id) for m in _by_seniority(self.members.values())]

    # -- storage

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict holding everything (including the password hash: storage only)."""
        out: dict[str, Any] = {"schema": _SCHEMA}
        for name in _FIELDS[Room]:
            out[name] = getattr(self, name)
        out["content"] = dict(self.content)
        out["last_command"] = None if self.last_command is None else dict(self.last_command)
        out["members"] = {uid: _asdict(m) for uid, m in self.members.items()}
        out["invites"] = {code: _asdict(i) for code, i in self.invites.items()}
        out["banned"] = list(self.banned)
        out["chat"] = [dict(c) for c in self.chat]
        out["chat_times"] = {uid: list(ts) for uid, ts in self.chat_times.items()}
        out["log"] = [dict(e) for e in self.log]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Room:
        """Rebuild a room from :meth:`to_dict` output; unknown keys are ignored."""
        if data.get("schema", _SCHEMA) != _SCHEMA:
            raise ValueError(f"unsupported room schema {data.get('schema')!r}")
        kwargs = _known(cls, data)
        kwargs["content"] = dict(data["content"])
        last = data.get("last_command")
        kwargs["last_command"] = None if last is None else dict(last)
        kwargs["members"] = {uid: _member_from(m) for uid, m in data.get("members", {}).items()}
        kwargs["invites"] = {
            code: Invite(**_known(Invite, i)) for code, i in data.get("invites", {}).items()
        }
        kwargs["banned"] = list(data.get("banned", []))
        kwargs["chat"] = [dict(c) for c in data.get("chat", [])]
        kwargs["chat_times"] = {u: list(t) for u, t in data.get("chat_times", {}).items()}
        kwargs["log"] = [dict(e) for e in data.get("log", [])]
        return cls(**kwargs)


# dataclasses.fields() is slow enough to dominate a room's (de)serialization: cache the names.
_FIELDS: Final[dict[type[Any], frozenset[str]]] = {
    cls: frozenset(f.name for f in fields(cls)) for cls in (Room, Member, Invite)
}


def _asdict(obj: Member | Invite) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in _FIELDS[type(obj)]}


def _known(cls: type[Any], data: Mapping[str, Any]) -> dict[str, Any]:
    names = _FIELDS[cls]
    return {k: v for k, v in data.items() if k in names}


def _member_from(data: Mapping[str, Any]) -> Member:
    # Members are most of a room's weight: skip the filtering when the keys match exactly.
    if data.keys() == _FIELDS[Member]:
        return Member(**data)
    return Member(**_known(Member, data))


def _by_seniority(members: Iterable[Member]) -> list[Member]:
    return sorted(members, key=lambda m: (m.joined_at, m.user_id))


def _blocks(m: Member, s: Settings) -> bool:
    return (
        m.connected
        and not m.is_ready
        and not m.ignore_wait
        and not m.wait_timed_out
        and m.wait_timeouts < s.max_wait_timeouts
    )


def _waiting_on(room: Room, s: Settings) -> list[str]:
    return [m.user_id for m in _by_seniority(room.members.values()) if _blocks(m, s)]


def _wait_timeout(m: Member, s: Settings) -> float:
    return s.buffering_timeout_first_ms if m.first_load else s.buffering_timeout_rebuffer_ms


def lead_ms(room: Room, settings: Settings = DEFAULT_SETTINGS) -> float:
    """How far ahead ``play``/``seek`` are scheduled (see the module docstring)."""
    worst = max(
        (m.rtt_ms for m in room.members.values() if m.connected and m.rtt_ms is not None),
        default=0.0,
    )
    return min(settings.max_lead_ms, max(settings.min_lead_ms, 2.0 * worst))


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


class _Ctx:
    __slots__ = ("changed", "effects", "ids", "now", "room", "settings")

    def __init__(self, room: Room, now: float, settings: Settings, ids: IdSource) -> None:
        self.room = room
        self.now = now
        self.settings = settings
        self.ids = ids
        self.effects: list[Effect] = []
        # Cleared by a request that turns out to change nothing: it must then not have
        # mutated the room at all, and nothing is written.
        self.changed = True

    def publish(self, mtype: str, data: dict[str, Any]) -> None:
        self.effects.append(Publish(channel_of(self.room.room_id), mtype, data))

    def publish_state(self) -> None:
        self.publish("syncplay.state", self.room.state_view(self.settings))

    def publish_member(self, m: Member) -> None:
        self.publish("syncplay.member_updated", m.view(self.room.leader_id))

    def log(self, event: str, user_id: str | None, **extra: Any) -> None:
        entry: dict[str, Any] = {"at": self.now, "event": event, "user_id": user_id}
        entry.update(extra)
        self.room.log.append(entry)
        overflow = len(self.room.log) - self.settings.event_log_size
        if overflow > 0:
            del self.room.log[:overflow]

    def command(self, command: str, when: float, by: str | None) -> None:
        room = self.room
        room.command_seq += 1
        room.updated_at = self.now
        room.updated_by = by
        cmd = {
            "room_id": room.room_id,
            "command": command,
            "position": round(room.position, 3),
            "rate": room.rate,
            "when": when,
            "issued_by": by,
            "command_seq": room.command_seq,
        }
        room.last_command = cmd
        self.publish("syncplay.command", dict(cmd))
        self.log(command, by, position=cmd["position"], command_seq=room.command_seq)

    def outcome(self, reply: dict[str, Any], changed: bool = True) -> Outcome:
        room = self.room
        if changed:
            room.version += 1
            room.due_at = None if room.ended else next_deadline(room, self.settings)
            return Outcome(room, reply, self.effects, changed, room.due_at)
        # Unchanged (most reports): the deadline recorded by the last change still holds,
        # and recomputing it for every report was a visible share of the hub's CPU.
        if room.ended:
            deadline = None
        elif room.due_at is not None:
            deadline = room.due_at
        else:
            deadline = next_deadline(room, self.settings)
        return Outcome(room, reply, self.effects, changed, deadline)


# --------------------------------------------------------------------------- request schemas


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False, frozen=True)


_Id = Annotated[str, Field(min_length=1, max_length=128)]
_Pos = Annotated[float, Field(ge=0.0, le=MAX_POSITION)]
_Rtt = Annotated[float, Field(ge=0.0, le=MAX_RTT_MS)]
_Seq = Annotated[int, Field(ge=0)]


class _Content(_Req):
    type: Literal["movie", "episode"]
    id: Annotated[str, Field(min_length=1, max_length=200)]


class _RoomReq(_Req):
    room_id: _Id


class _ControlReq(_RoomReq):
    command_seq: _Seq | None = None


class _CreateReq(_Req):
    name: Annotated[str, Field(min_length=1, max_length=200)]
    content: _Content
    public: bool = False
    password: Annotated[str, Field(max_length=256)] | None = None
    max_participants: Annotated[int, Field(ge=1)] | None = None
    control_mode: Literal["shared", "leader_only"] = SHARED


class _JoinReq(_Req):
    room_id: _Id | None = None
    password: Annotated[str, Field(max_length=256)] | None = None
    invite_code: Annotated[str, Field(min_length=1, max_length=32)] | None = None
    rtt_ms: _Rtt | None = None

    @model_validator(mode="after")
    def _room_or_code(self) -> _JoinReq:
        if self.room_id is None and self.invite_code is None:
            raise ValueError("'room_id' or 'invite_code' is required")
        return self


class _UserReq(_RoomReq):
    user_id: _Id


class _UpdateReq(_RoomReq):
    name: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    public: bool | None = None
    password: Annotated[str, Field(max_length=256)] | None = None
    max_participants: Annotated[int, Field(ge=1)] | None = None
    control_mode: Literal["shared", "leader_only"] | None = None
    can_control: Annotated[dict[_Id, bool], Field(max_length=1000)] | None = None


class _InviteReq(_RoomReq):
    user_id: _Id | None = None


class _ChatReq(_RoomReq):
    message: Annotated[str, Field(min_length=1, max_length=100_000)]


class _PauseReq(_ControlReq):
    position: _Pos | None = None


class _SeekReq(_ControlReq):
    position: _Pos


class _RateReq(_ControlReq):
    rate: Annotated[float, Field(ge=0.25, le=2.0)]


class _SetContentReq(_ControlReq):
    content: _Content


class _PositionReq(_RoomReq):
    position: _Pos | None = None


class _IgnoreWaitReq(_RoomReq):
    ignore: bool


class _ReportReq(_RoomReq):
    position: _Pos
    is_playing: bool
    is_buffering: bool = False
    rtt_ms: _Rtt | None = None
    command_seq: _Seq | None = None


def _validate(model: type[_Req], data: object, rtype: str) -> Any:
    if not isinstance(data, Mapping):
        raise RequestError(ErrorCode.INVALID_MESSAGE, f"syncplay.{rtype}: 'data' must be an object")
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in err["loc"])
        where = f"invalid '{loc}'" if loc else "invalid data"
        raise RequestError(
            ErrorCode.INVALID_MESSAGE, f"syncplay.{rtype}: {where}: {err['msg']}"
        ) from None


# --------------------------------------------------------------------------- checks


def _member(room: Room, actor: Actor) -> Member:
    m = room.members.get(actor.user_id)
    if m is None:
        raise RequestError(ErrorCode.FORBIDDEN, "you are not a member of this room")
    return m


def _player(room: Room, actor: Actor) -> Member:
    """The member, when this connection is the one that represents it."""
    m = _member(room, actor)
    if actor.session_id is not None and m.session_id not in (None, actor.session_id):
        raise RequestError(
            ErrorCode.CONFLICT,
            "another connection of yours represents you in this room; send syncplay.join to "
            "take over",
        )
    return m


def _is_leader(room: Room, actor: Actor) -> bool:
    return room.leader_id == actor.user_id


def _require_control(room: Room, actor: Actor) -> Member:
    m = _member(room, actor)
    if room.control_mode == LEADER_ONLY and not _is_leader(room, actor) and not m.can_control:
        raise RequestError(
            ErrorCode.FORBIDDEN, "only the leader and members allowed to control may do this"
        )
    return m


def _require_leader(room: Room, actor: Actor, *, admin_ok: bool) -> None:
    if _is_leader(room, actor) or (admin_ok and actor.is_admin):
        return
    raise RequestError(ErrorCode.FORBIDDEN, "only the room's leader may do this")


def _is_stale(room: Room, seq: int | None) -> bool:
    return seq is not None and seq < room.command_seq


def _check_max_participants(value: int, s: Settings) -> None:
    if not 1 <= value <= s.max_participants_limit:
        raise RequestError(
            ErrorCode.INVALID_MESSAGE,
            f"invalid 'max_participants': must be between 1 and {s.max_participants_limit}",
        )


def _clean_name(name: str, s: Settings) -> str:
    cleaned = " ".join(name.split())
    if not cleaned or len(cleaned) > s.max_name_chars:
        raise RequestError(
            ErrorCode.INVALID_MESSAGE, f"invalid 'name': 1 to {s.max_name_chars} characters"
        )
    return cleaned


# --------------------------------------------------------------------------- transitions


def _state_reply(ctx: _Ctx, applied: bool = True) -> dict[str, Any]:
    return {"state": ctx.room.state_view(ctx.settings), "applied": applied}


def _unchanged(ctx: _Ctx) -> dict[str, Any]:
    """The answer to a duplicate or stale request: the current state, nothing written."""
    ctx.changed = False
    return _state_reply(ctx, applied=False)


def _start_playing(ctx: _Ctx, by: str | None) -> None:
    room = ctx.room
    when = ctx.now + lead_ms(room, ctx.settings)
    room.state = PLAYING
    room.anchor_ms = when
    ctx.command("play", when, by)
    ctx.publish_state()


def _resume_if_unblocked(ctx: _Ctx, by: str | None) -> None:
    """A waiting room starts as soon as nobody blocks; otherwise its waiting_on is republished."""
    if ctx.room.state != WAITING:
        return
    if _waiting_on(ctx.room, ctx.settings):
        ctx.publish_state()
    else:
        _start_playing(ctx, by)


def _stop(ctx: _Ctx, new_state: str, position: float, by: str | None) -> None:
    room = ctx.room
    room.state = new_state
    room.position = round(position, 3)
    room.anchor_ms = ctx.now
    ctx.command("pause", ctx.now, by)
    ctx.publish_state()


def _end(ctx: _Ctx, reason: str, by: str | None = None) -> None:
    room = ctx.room
    room.ended = True
    room.ended_reason = reason
    ctx.log("end", by, reason=reason)
    ctx.publish("syncplay.ended", {"room_id": room.room_id, "reason": reason})
    channel = channel_of(room.room_id)
    for m in _by_seniority(room.members.values()):
        if m.session_id is not None:
            ctx.effects.append(Unsubscribe(m.user_id, m.session_id, channel))
    ctx.effects.append(RoomEnded(room.room_id, reason))


def _remove_member(ctx: _Ctx, user_id: str, reason: str) -> None:
    room = ctx.room
    m = room.members[user_id]
    left = m.view(room.leader_id)
    left["reason"] = reason
    del room.members[user_id]
    ctx.publish("syncplay.member_left", left)
    if m.session_id is not None:
        ctx.effects.append(Unsubscribe(user_id, m.session_id, channel_of(room.room_id)))
    ctx.log("leave", user_id, reason=reason)
    if not room.members:
        _end(ctx, "empty")
        return
    if room.leader_id == user_id:
        heir = sorted(
            room.members.values(), key=lambda x: (not x.connected, x.joined_at, x.user_id)
        )
        room.leader_id = heir[0].user_id
        ctx.log("leader", room.leader_id, reason="leader_left")
        ctx.publish_member(heir[0])
    _resume_if_unblocked(ctx, room.updated_by)


def _new_member(actor: Actor, now: float, rtt: float | None) -> Member:
    return Member(
        user_id=actor.user_id,
        username=actor.username,
        session_id=actor.session_id,
        joined_at=now,
        last_seen_at=now,
        not_ready_since=now,
        rtt_ms=rtt,
        # A seat reserved over HTTP has no connection yet: it gets the reconnect grace.
        connected=actor.session_id is not None,
        disconnected_at=None if actor.session_id is not None else now,
    )


# --------------------------------------------------------------------------- operations


def _create(
    actor: Actor, req: _CreateReq, now: float, settings: Settings, ids: IdSource
) -> Outcome:
    name = _clean_name(req.name, settings)
    max_p = settings.max_participants if req.max_participants is None else req.max_participants
    _check_max_participants(max_p, settings)
    pw_hash = hash_password(req.password, ids.salt(), settings) if req.password else None
    room = Room(
        room_id=ids.new_id(),
        name=name,
        content={"type": req.content.type, "id": req.content.id},
        public=req.public,
        password_hash=pw_hash,
        max_participants=max_p,
        control_mode=req.control_mode,
        leader_id=actor.user_id,
        created_at=now,
        created_by=actor.user_id,
        anchor_ms=now,
        updated_at=now,
        updated_by=actor.user_id,
        last_activity_at=now,
    )
    room.members[actor.user_id] = _new_member(actor, now, None)
    ctx = _Ctx(room, now, settings, ids)
    if actor.session_id is not None:
        ctx.effects.append(Subscribe(actor.user_id, actor.session_id, channel_of(room.room_id)))
    ctx.log("create", actor.user_id)
    ctx.log("join", actor.user_id)
    return ctx.outcome(
        {"room": room.view(), "members": room.members_view(), "state": room.state_view(settings)}
    )


def _join(ctx: _Ctx, actor: Actor, req: _JoinReq) -> dict[str, Any]:
    room, now = ctx.room, ctx.now
    channel = channel_of(room.room_id)
    m = room.members.get(actor.user_id)
    if m is not None and actor.session_id is None:
        # An HTTP join of a member changes nothing: its connection, if any, stays.
        ctx.changed = False
        return {
            "room": room.view(),
            "members": room.members_view(),
            "state": room.state_view(ctx.settings),
        }
    if m is not None:
        # Already a member: this is a reconnect (or a second device taking over).
        old = m.session_id
        was_connected = m.connected
        m.session_id = actor.session_id
        m.connected = actor.session_id is not None
        m.disconnected_at = None if m.connected else now
        if req.rtt_ms is not None:
            m.rtt_ms = req.rtt_ms
        if old is not None and old != actor.session_id:
            ctx.effects.append(Unsubscribe(m.user_id, old, channel))
        if actor.session_id is not None and (old != actor.session_id or not was_connected):
            ctx.effects.append(Subscribe(m.user_id, actor.session_id, channel))
        if was_connected != m.connected:
            ctx.publish_member(m)
            _resume_if_unblocked(ctx, room.updated_by)
        return {
            "room": room.view(),
            "members": room.members_view(),
            "state": room.state_view(ctx.settings),
        }

    invite: Invite | None = None
    if req.invite_code is not None:
        code = req.invite_code.replace("-", "").replace(" ", "").upper()
        invite = room.invites.get(code)
        if invite is None or invite.expires_at <= now:
            raise RequestError(ErrorCode.NOT_FOUND, "unknown or expired invitation code")
        if invite.user_id is not None and invite.user_id != actor.user_id:
            raise RequestError(ErrorCode.FORBIDDEN, "this invitation is for another user")
    personal = invite is not None and invite.user_id == actor.user_id
    if actor.user_id in room.banned and not personal and not actor.is_admin:
        raise RequestError(ErrorCode.FORBIDDEN, "you were removed from this room")
    if (
        invite is None
        and not actor.is_admin
        and room.password_hash is not None
        and not (req.password and verify_password(req.password, room.password_hash))
    ):
        raise RequestError(ErrorCode.FORBIDDEN, "wrong or missing room password")
    if len(room.members) >= room.max_participants:
        raise RequestError(ErrorCode.CONFLICT, "the room is full")

    if actor.user_id in room.banned:
        room.banned.remove(actor.user_id)
    m = _new_member(actor, now, req.rtt_ms)
    room.members[actor.user_id] = m
    if actor.session_id is not None:
        ctx.effects.append(Subscribe(actor.user_id, actor.session_id, channel))
    ctx.publish("syncplay.member_joined", m.view(room.leader_id))
    ctx.log("join", actor.user_id, invite=invite.code if invite else None)
    if room.state == WAITING:
        ctx.publish_state()
    return {
        "room": room.view(),
        "members": room.members_view(),
        "state": room.state_view(ctx.settings),
    }


def _leave(ctx: _Ctx, actor: Actor, req: _RoomReq) -> dict[str, Any]:
    if actor.user_id not in ctx.room.members:
        ctx.changed = False
        return {"room_id": ctx.room.room_id, "left": False}
    _remove_member(ctx, actor.user_id, "left")
    return {"room_id": ctx.room.room_id, "left": True}


def _end_op(ctx: _Ctx, actor: Actor, req: _RoomReq) -> dict[str, Any]:
    _require_leader(ctx.room, actor, admin_ok=True)
    reason = "ended_by_leader" if _is_leader(ctx.room, actor) else "ended_by_admin"
    _end(ctx, reason, actor.user_id)
    return {"room_id": ctx.room.room_id, "ended": True}


def _update(ctx: _Ctx, actor: Actor, req: _UpdateReq) -> dict[str, Any]:
    room, s = ctx.room, ctx.settings
    _require_leader(room, actor, admin_ok=False)
    given = req.model_fields_set
    name = _clean_name(req.name, s) if req.name is not None else room.name
    if req.max_participants is not None:
        _check_max_participants(req.max_participants, s)
    grants = req.can_control or {}
    unknown = sorted(set(grants) - set(room.members))
    if unknown:
        raise RequestError(ErrorCode.NOT_FOUND, f"not a member of this room: {unknown[0]}")
    changed = name != room.name
    room.name = name
    if req.public is not None and req.public != room.public:
        room.public, changed = req.public, True
    if "password" in given and (req.password or room.password_hash is not None):
        room.password_hash = (
            hash_password(req.password, ctx.ids.salt(), s) if req.password else None
        )
        changed = True
    if req.max_participants is not None and req.max_participants != room.max_participants:
        room.max_participants, changed = req.max_participants, True
    if req.control_mode is not None and req.control_mode != room.control_mode:
        room.control_mode, changed = req.control_mode, True
    if changed:
        ctx.publish("syncplay.room_updated", {"room": room.view()})
        ctx.log("update", actor.user_id)
    granted = False
    for uid in sorted(grants):
        m = room.members[uid]
        if m.can_control != grants[uid]:
            m.can_control = grants[uid]
            ctx.publish_member(m)
            granted = True
    ctx.changed = changed or granted
    return {"room": room.view()}


def _invite(ctx: _Ctx, actor: Actor, req: _InviteReq) -> dict[str, Any]:
    room, now = ctx.room, ctx.now
    _member(room, actor)
    if req.user_id in room.banned and not (_is_leader(room, actor) or actor.is_admin):
        raise RequestError(ErrorCode.FORBIDDEN, "only the leader may invite a removed user back")
    code = ctx.ids.invite_code()
    for _ in range(8):
        if code not in room.invites:
            break
        code = ctx.ids.invite_code()
    else:
        raise RequestError(ErrorCode.INTERNAL, "could not draw a fresh invitation code")
    _prune_invites(room, now)
    while len(room.invites) >= ctx.settings.max_invites:
        del room.invites[next(iter(room.invites))]  # insertion order: the oldest
    inv = Invite(code, actor.user_id, now, now + ctx.settings.invite_ttl_ms, req.user_id)
    room.invites[code] = inv
    ctx.log("invite", actor.user_id, for_user=req.user_id)
    return {
        "code": code,
        "room_id": room.room_id,
        "expires_at": inv.expires_at,
        "user_id": req.user_id,
    }


def _kick(ctx: _Ctx, actor: Actor, req: _UserReq) -> dict[str, Any]:
    room = ctx.room
    _require_leader(room, actor, admin_ok=True)
    if req.user_id == actor.user_id:
        raise RequestError(
            ErrorCode.INVALID_MESSAGE, "you cannot kick yourself: use syncplay.leave"
        )
    target = room.members.get(req.user_id)
    if target is None:
        raise RequestError(ErrorCode.NOT_FOUND, "no such member in this room")
    if target.session_id is not None:
        kicked = {"room_id": room.room_id, "by": actor.user_id}
        ctx.effects.append(Direct(target.user_id, target.session_id, "syncplay.kicked", kicked))
    if target.user_id not in room.banned:
        room.banned.append(target.user_id)
    _remove_member(ctx, target.user_id, "kicked")
    return {"room_id": room.room_id, "user_id": target.user_id}


def _transfer(ctx: _Ctx, actor: Actor, req: _UserReq) -> dict[str, Any]:
    room = ctx.room
    _require_leader(room, actor, admin_ok=True)
    target = room.members.get(req.user_id)
    if target is None:
        raise RequestError(ErrorCode.NOT_FOUND, "no such member in this room")
    if room.leader_id == target.user_id:
        ctx.changed = False
    else:
        old = room.members.get(room.leader_id or "")
        room.leader_id = target.user_id
        if old is not None:
            ctx.publish_member(old)
        ctx.publish_member(target)
        ctx.log("leader", target.user_id, by=actor.user_id)
    return {"room_id": room.room_id, "leader_id": room.leader_id}


def _chat(ctx: _Ctx, actor: Actor, req: _ChatReq) -> dict[str, Any]:
    room, now, s = ctx.room, ctx.now, ctx.settings
    _member(room, actor)
    text = req.message
    if not text.strip() or len(text) > s.chat_max_chars:
        raise RequestError(
            ErrorCode.INVALID_MESSAGE, f"invalid 'message': 1 to {s.chat_max_chars} characters"
        )
    recent = [t for t in room.chat_times.get(actor.user_id, []) if now - t < 60_000.0]
    if len(recent) >= s.chat_per_minute:
        raise RequestError(
            ErrorCode.RATE_LIMITED, f"at most {s.chat_per_minute} chat messages a minute"
        )
    recent.append(now)
    room.chat_times[actor.user_id] = recent
    msg = {
        "message_id": ctx.ids.new_id(),
        "user_id": actor.user_id,
        "username": actor.username,
        "message": text,
        "timestamp": now,
    }
    room.chat.append(msg)
    if len(room.chat) > s.chat_history:
        del room.chat[: len(room.chat) - s.chat_history]
    ctx.publish("syncplay.chat", dict(msg))
    return {"message_id": msg["message_id"], "timestamp": now}


def _play(ctx: _Ctx, actor: Actor, req: _ControlReq) -> dict[str, Any]:
    room = ctx.room
    _require_control(room, actor)
    if _is_stale(room, req.command_seq) or room.state in (PLAYING, WAITING):
        return _unchanged(ctx)
    if _waiting_on(room, ctx.settings):
        room.state = WAITING
        room.updated_at = ctx.now
        room.updated_by = actor.user_id
        ctx.log("wait", actor.user_id, waiting_on=_waiting_on(room, ctx.settings))
        ctx.publish_state()
    else:
        _start_playing(ctx, actor.user_id)
    return _state_reply(ctx)


def _pause(ctx: _Ctx, actor: Actor, req: _PauseReq) -> dict[str, Any]:
    room = ctx.room
    _require_control(room, actor)
    if _is_stale(room, req.command_seq) or room.state == PAUSED:
        return _unchanged(ctx)
    here = room.position_at(ctx.now)
    _stop(ctx, PAUSED, here if req.position is None else req.position, actor.user_id)
    return _state_reply(ctx)


def _seek(ctx: _Ctx, actor: Actor, req: _SeekReq) -> dict[str, Any]:
    room, now = ctx.room, ctx.now
    _require_control(room, actor)
    target = round(req.position, 3)
    last = room.last_command
    duplicate = (
        last is not None
        and last["command"] == "seek"
        and abs(last["position"] - target) < _EPS_POS
        and now < last["when"] + ctx.settings.duplicate_window_ms
    )
    standing_there = room.state != PLAYING and abs(room.position - target) < _EPS_POS
    if _is_stale(room, req.command_seq) or duplicate or standing_there:
        return _unchanged(ctx)
    when = now + lead_ms(room, ctx.settings)
    room.position = target
    room.anchor_ms = when
    if room.state == IDLE:
        room.state = PAUSED
    ctx.command("seek", when, actor.user_id)
    ctx.publish_state()
    return _state_reply(ctx)


def _rate(ctx: _Ctx, actor: Actor, req: _RateReq) -> dict[str, Any]:
    room, now = ctx.room, ctx.now
    _require_control(room, actor)
    if _is_stale(room, req.command_seq) or abs(req.rate - room.rate) < 1e-9:
        return _unchanged(ctx)
    # A start still pending keeps its schedule; a running timeline is re-anchored at now.
    if room.state != PLAYING or now >= room.anchor_ms:
        room.position = round(room.position_at(now), 3)
        room.anchor_ms = now
    room.rate = req.rate
    ctx.command("rate", room.anchor_ms, actor.user_id)
    ctx.publish_state()
    return _state_reply(ctx)


def _set_content(ctx: _Ctx, actor: Actor, req: _SetContentReq) -> dict[str, Any]:
    room, now = ctx.room, ctx.now
    _require_control(room, actor)
    content = {"type": req.content.type, "id": req.content.id}
    if _is_stale(room, req.command_seq) or content == room.content:
        return _unchanged(ctx)
    room.content = content
    room.state = IDLE
    room.position = 0.0
    room.anchor_ms = now
    room.updated_at = now
    room.updated_by = actor.user_id
    for m in room.members.values():
        m.is_ready = m.is_buffering = m.wait_timed_out = False
        m.first_load = True
        m.wait_timeouts = 0
        m.not_ready_since = now
    ctx.log("content", actor.user_id, content=content)
    ctx.publish("syncplay.room_updated", {"room": room.view()})
    # Everyone is loading the new content: members' views must say so.
    for m in _by_seniority(room.members.values()):
        ctx.publish_member(m)
    ctx.publish_state()
    return _state_reply(ctx)


def _buffering(ctx: _Ctx, actor: Actor, req: _PositionReq) -> dict[str, Any]:
    room, now, s = ctx.room, ctx.now, ctx.settings
    m = _player(room, actor)
    if m.is_buffering:
        return _unchanged(ctx)
    if req.position is not None:
        m.position = req.position
    was_ready = m.is_ready
    m.is_buffering = True
    m.is_ready = False
    if m.not_ready_since is None:
        m.not_ready_since = now
    ctx.log("buffer_start", m.user_id, position=req.position)
    ctx.publish_member(m)
    if room.state == PLAYING and was_ready and _blocks(m, s):
        # Stop where the stalled member is, but never more than the threshold behind, so one
        # confused player cannot throw everyone far back.
        timeline = room.position_at(now)
        stop_at = timeline
        if req.position is not None and now > room.anchor_ms:
            stop_at = min(timeline, max(req.position, timeline - s.sync_threshold_s))
        _stop(ctx, WAITING, stop_at, m.user_id)
    elif room.state == WAITING:
        ctx.publish_state()
    return _state_reply(ctx)


def _ready(ctx: _Ctx, actor: Actor, req: _PositionReq) -> dict[str, Any]:
    room = ctx.room
    m = _player(room, actor)
    if m.is_ready and not m.is_buffering:
        return _unchanged(ctx)
    if req.position is not None:
        m.position = req.position
    m.is_ready = True
    m.is_buffering = m.wait_timed_out = m.first_load = False
    m.not_ready_since = None
    ctx.log("buffer_end", m.user_id, position=req.position)
    ctx.publish_member(m)
    _resume_if_unblocked(ctx, m.user_id)
    return _state_reply(ctx)


def _ignore_wait(ctx: _Ctx, actor: Actor, req: _IgnoreWaitReq) -> dict[str, Any]:
    m = _player(ctx.room, actor)
    if m.ignore_wait == req.ignore:
        return _unchanged(ctx)
    m.ignore_wait = req.ignore
    ctx.log("ignore_wait", m.user_id, ignore=req.ignore)
    ctx.publish_member(m)
    _resume_if_unblocked(ctx, m.user_id)
    return _state_reply(ctx)


def _report(ctx: _Ctx, actor: Actor, req: _ReportReq) -> dict[str, Any]:
    """Judge a member's report; store it only when that matters.

    Reports arrive every 5 s from every member, so most of them must not cost a write: one is
    stored when presence needs refreshing (``presence_refresh_ms``), when the RTT moved enough
    to change the lead, or when the hint bookkeeping changes.
    """
    room, now, s = ctx.room, ctx.now, ctx.settings
    m = _player(room, actor)
    rtt = m.rtt_ms if req.rtt_ms is None else req.rtt_ms
    reply: dict[str, Any] = {"in_sync": True, "offset_seconds": None}
    hint: dict[str, Any] | None = None
    streak = m.sync_streak
    settling = now - max(room.anchor_ms, room.updated_at) < s.sync_grace_ms
    judged = not (
        room.state == IDLE or req.is_buffering or settling or _is_stale(room, req.command_seq)
    )
    if judged:
        should_play = room.state == PLAYING
        measured_at = now - (rtt or 0.0) / 2.0 if req.is_playing else now
        offset = req.position - room.position_at(measured_at)
        in_sync = abs(offset) <= s.sync_threshold_s and req.is_playing == should_play
        reply = {"in_sync": in_sync, "offset_seconds": round(offset, 3)}
        if in_sync:
            streak = 0
        else:
            backoff = s.sync_hint_interval_ms * 2 ** min(m.sync_streak, 20)
            if m.last_sync_at is None or now - m.last_sync_at >= min(
                s.sync_hint_max_interval_ms, backoff
            ):
                streak += 1
                hint = {
                    "room_id": room.room_id,
                    "target_position": round(room.position_at(now), 3),
                    "should_be_playing": should_play,
                    "offset_seconds": round(offset, 3),
                    "at": now,
                }
    rtt_moved = req.rtt_ms is not None and (
        m.rtt_ms is None or abs(req.rtt_ms - m.rtt_ms) > max(20.0, 0.25 * m.rtt_ms)
    )
    stale_presence = now - m.last_seen_at >= s.presence_refresh_ms or not m.connected
    if not (hint or rtt_moved or stale_presence or streak != m.sync_streak):
        ctx.changed = False
        return reply
    m.position = req.position
    m.is_playing = req.is_playing
    m.rtt_ms = rtt
    m.sync_streak = streak
    if hint is not None:
        m.last_sync_at = now
        ctx.effects.append(Direct(m.user_id, m.session_id, "syncplay.sync", hint))
    return reply


_Op = Callable[[_Ctx, Actor, Any], dict[str, Any]]

_OPS: Final[dict[str, tuple[type[_Req], _Op | None]]] = {
    "create": (_CreateReq, None),
    "join": (_JoinReq, _join),
    "leave": (_RoomReq, _leave),
    "end": (_RoomReq, _end_op),
    "update": (_UpdateReq, _update),
    "invite": (_InviteReq, _invite),
    "kick": (_UserReq, _kick),
    "transfer": (_UserReq, _transfer),
    "chat": (_ChatReq, _chat),
    "play": (_ControlReq, _play),
    "pause": (_PauseReq, _pause),
    "seek": (_SeekReq, _seek),
    "rate": (_RateReq, _rate),
    "set_content": (_SetContentReq, _set_content),
    "buffering": (_PositionReq, _buffering),
    "ready": (_PositionReq, _ready),
    "ignore_wait": (_IgnoreWaitReq, _ignore_wait),
    "report": (_ReportReq, _report),
}

#: Every request :func:`handle` serves (``syncplay.list`` is :func:`list_rooms`).
REQUEST_TYPES: Final = tuple(f"syncplay.{name}" for name in _OPS)

# Requests that do not count as activity for the idle timeout: players send them by themselves.
_PASSIVE: Final = frozenset({"report"})


# --------------------------------------------------------------------------- entry points


def handle(
    room: Room | None,
    request_type: str,
    data: Mapping[str, Any],
    actor: Actor,
    now_ms: float,
    *,
    settings: Settings = DEFAULT_SETTINGS,
    ids: IdSource = SECURE_IDS,
) -> Outcome:
    """Apply one ``syncplay.*`` request (with or without the ``syncplay.`` prefix).

    ``room`` is the room named by ``data["room_id"]`` (for a join by invitation code only:
    the room the store found for the code), or None when it does not exist. ``create`` ignores
    it and returns the new room in ``Outcome.room``. Raises :class:`RequestError` (room
    untouched) for unknown types, bad data (the message names the field), missing rights and
    unknown rooms. Admins may ``end`` and ``kick`` in any room, and join without a password.
    """
    name = request_type.removeprefix("syncplay.")
    spec = _OPS.get(name)
    if spec is None:
        raise RequestError(ErrorCode.UNKNOWN_TYPE, f"unknown request type {request_type!r}")
    model, op = spec
    req = _validate(model, data, name)
    if op is None:
        return _create(actor, req, now_ms, settings, ids)
    rid = getattr(req, "room_id", None)
    if room is None or room.ended or (rid is not None and rid != room.room_id):
        raise RequestError(ErrorCode.NOT_FOUND, "no such room")
    ctx = _Ctx(room, now_ms, settings, ids)
    # A member marked away is back when its own connection speaks again; it counts as
    # connected for the request itself (readiness, lead), and stays so only if that succeeds.
    m = room.members.get(actor.user_id)
    back = (
        m is not None
        and not m.connected
        and actor.session_id is not None
        and actor.session_id == m.session_id
    )
    if m is not None and back:
        m.connected = True
    try:
        reply = op(ctx, actor, req)
    except BaseException:
        if m is not None and back:
            m.connected = False
        raise
    if m is not None and back and not ctx.changed:
        m.connected = False
    if not ctx.changed:
        return ctx.outcome(reply, changed=False)
    if not room.ended:
        if name not in _PASSIVE:
            room.last_activity_at = now_ms
        if m is not None and actor.user_id in room.members:
            m.last_seen_at = now_ms
            if back:
                m.disconnected_at = None
                ctx.publish_member(m)
                _resume_if_unblocked(ctx, room.updated_by)
    return ctx.outcome(reply)


def disconnect(
    room: Room,
    user_id: str,
    session_id: str,
    now_ms: float,
    *,
    settings: Settings = DEFAULT_SETTINGS,
) -> Outcome:
    """The node saw ``session_id`` close. The member stops blocking and, unless it joins again
    within ``reconnect_grace_ms``, :func:`tick` removes it. A stale session is ignored."""
    ctx = _Ctx(room, now_ms, settings, SECURE_IDS)
    m = room.members.get(user_id)
    if room.ended or m is None or m.session_id != session_id or m.disconnected_at is not None:
        return ctx.outcome({}, changed=False)
    m.connected = False
    m.disconnected_at = now_ms
    ctx.log("disconnect", user_id)
    ctx.publish_member(m)
    _resume_if_unblocked(ctx, room.updated_by)
    return ctx.outcome({})


def tick(room: Room, now_ms: float, *, settings: Settings = DEFAULT_SETTINGS) -> Outcome:
    """Apply every timeout due at ``now_ms``: idle end, silent and disconnected members,
    buffering timeouts (then a waiting room starts), expired invitations, old chat-rate
    entries; and record ``Room.due_at`` when it differs from :func:`next_deadline`.
    Idempotent; ``changed`` is False when nothing was due and ``due_at`` was right."""
    ctx = _Ctx(room, now_ms, settings, SECURE_IDS)
    if room.ended:
        return ctx.outcome({}, changed=False)
    s = settings
    changed = False
    if now_ms - room.last_activity_at >= s.idle_end_ms:
        _end(ctx, "idle")
        return ctx.outcome({})

    for m in _by_seniority(list(room.members.values())):
        silent = now_ms - m.last_seen_at
        if s.member_remove_ms > 0 and silent >= s.member_remove_ms:
            _remove_member(ctx, m.user_id, "timeout")
        elif m.disconnected_at is not None and now_ms - m.disconnected_at >= s.reconnect_grace_ms:
            _remove_member(ctx, m.user_id, "disconnected")
        elif m.connected and s.member_stale_ms > 0 and silent >= s.member_stale_ms:
            m.connected = False
            ctx.log("stale", m.user_id)
            ctx.publish_member(m)
            _resume_if_unblocked(ctx, room.updated_by)
        else:
            continue
        changed = True
        if room.ended:
            return ctx.outcome({})

    timed_out = [
        m
        for m in _by_seniority(room.members.values())
        if _blocks(m, s)
        and m.not_ready_since is not None
        and now_ms >= m.not_ready_since + _wait_timeout(m, s)
    ]
    if timed_out:
        changed = True
        for m in timed_out:
            m.wait_timed_out = True
            m.wait_timeouts += 1
            ctx.log("wait_timeout", m.user_id, first_load=m.first_load)
            ctx.publish_member(m)
        ctx.publish(
            "syncplay.wait_timeout",
            {"room_id": room.room_id, "user_ids": [m.user_id for m in timed_out], "at": now_ms},
        )
        _resume_if_unblocked(ctx, room.updated_by)

    if any(i.expires_at <= now_ms for i in room.invites.values()):
        _prune_invites(room, now_ms)
        changed = True
    for uid, times in list(room.chat_times.items()):
        if not times or now_ms - times[-1] >= 60_000.0:
            del room.chat_times[uid]
            changed = True
    # A recorded deadline that is wrong (never recorded, or other settings) is corrected by
    # a write, so the store's index cannot keep pointing at a room with nothing due.
    if not changed and room.due_at != next_deadline(room, s):
        changed = True
    return ctx.outcome({}, changed=changed)


def _prune_invites(room: Room, now_ms: float) -> None:
    for code in [c for c, i in room.invites.items() if i.expires_at <= now_ms]:
        del room.invites[code]


def next_deadline(room: Room, settings: Settings = DEFAULT_SETTINGS) -> float | None:
    """The earliest time :func:`tick` has something to do (None for an ended room).

    Invitation expiry and chat-rate housekeeping are not deadlines: they never block anyone.
    """
    if room.ended:
        return None
    s = settings
    due = [room.last_activity_at + s.idle_end_ms]
    for m in room.members.values():
        if s.member_remove_ms > 0:
            due.append(m.last_seen_at + s.member_remove_ms)
        if m.disconnected_at is not None:
            due.append(m.disconnected_at + s.reconnect_grace_ms)
        if m.connected and s.member_stale_ms > 0:
            due.append(m.last_seen_at + s.member_stale_ms)
        if _blocks(m, s) and m.not_ready_since is not None:
            due.append(m.not_ready_since + _wait_timeout(m, s))
    return min(due)


def list_rooms(rooms: Iterable[Room], actor: Actor) -> dict[str, Any]:
    """The ``syncplay.list`` answer: public rooms, rooms ``actor`` is in, every room for admins."""
    shown = [
        r
        for r in rooms
        if not r.ended and (r.public or actor.is_admin or actor.user_id in r.members)
    ]
    shown.sort(key=lambda r: (r.created_at, r.room_id))
    return {"rooms": [r.view() for r in shown]}


def chat_history(
    room: Room, actor: Actor, *, limit: int = 100, before: float | None = None
) -> dict[str, Any]:
    """The room's last chat messages (oldest first), for members and admins."""
    if actor.user_id not in room.members and not actor.is_admin:
        raise RequestError(ErrorCode.FORBIDDEN, "you are not a member of this room")
    msgs = [c for c in room.chat if before is None or c["timestamp"] < before]
    return {"messages": [dict(c) for c in msgs[-max(0, limit) :]] if limit > 0 else []}
