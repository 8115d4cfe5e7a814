"""SyncPlay's data: the room, its members and invitations, the settings, and the derived
facts every part reads (who blocks, the lead). Plain data with JSON round-trips; the rules
that change it are the engine's (:mod:`revenge_ws.syncplay.machine`), and the room stores
(:mod:`revenge_ws.syncplay.store`, :mod:`revenge_ws.syncplay.redis_store`) keep it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final

from ..exceptions import ConfigError

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
EPS_POS: Final = 0.0005  # positions are kept to 3 decimals
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

    def expired(self, now_ms: float) -> bool:
        return self.expires_at <= now_ms


def invite_key(code: str) -> str:
    """An invitation code as stored: as typed or read aloud, without dashes or spaces, in
    upper case."""
    return code.replace("-", "").replace(" ", "").upper()


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
            "waiting_on": waiting_on(self, settings) if self.state == WAITING else [],
            "command_seq": self.command_seq,
            "when": self.anchor_ms,
        }

    def live_invite(self, code: str, now_ms: float) -> Invite | None:
        """The invitation ``code`` (as typed) names in this room, unless it has expired."""
        invite = self.invites.get(invite_key(code))
        return None if invite is None or invite.expired(now_ms) else invite

    def members_view(self) -> list[dict[str, Any]]:
        return [m.view(self.leader_id) for m in by_seniority(self.members.values())]

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


def by_seniority(members: Iterable[Member]) -> list[Member]:
    return sorted(members, key=lambda m: (m.joined_at, m.user_id))


def blocks(m: Member, s: Settings) -> bool:
    return (
        m.connected
        and not m.is_ready
        and not m.ignore_wait
        and not m.wait_timed_out
        and m.wait_timeouts < s.max_wait_timeouts
    )


def waiting_on(room: Room, s: Settings) -> list[str]:
    return [m.user_id for m in by_seniority(room.members.values()) if blocks(m, s)]


def wait_timeout(m: Member, s: Settings) -> float:
    return s.buffering_timeout_first_ms if m.first_load else s.buffering_timeout_rebuffer_ms


def lead_ms(room: Room, settings: Settings = DEFAULT_SETTINGS) -> float:
    """How far ahead ``play``/``seek`` are scheduled (see the module docstring)."""
    worst = max(
        (m.rtt_ms for m in room.members.values() if m.connected and m.rtt_ms is not None),
        default=0.0,
    )
    return min(settings.max_lead_ms, max(settings.min_lead_ms, 2.0 * worst))
