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

Layout
------
The room's data is in :mod:`~revenge_ws.syncplay.model` (rooms, members, invitations,
settings), what a call yields in :mod:`~revenge_ws.syncplay.effects`, request validation in
:mod:`~revenge_ws.syncplay.validation`, ids, codes, salts and passwords in
:mod:`~revenge_ws.syncplay.ids`; this module re-exports their public names. What remains here
is the rules: one operation per request type over a shared context (the room, the clock, the
id source, the effects so far), the checks and transitions they share, and the entry points.
It stays one module of ~1,000 lines, a tenth of it this description, because it is one
concern, the room's state machine: every operation goes through the same checks and
transitions, and the guarantees above must hold across all of them at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from ..codes import ErrorCode
from ..exceptions import RequestError
from .effects import Actor, Direct, Effect, Outcome, Publish, RoomEnded, Subscribe, Unsubscribe
from .ids import SECURE_IDS, IdSource, SecureIds, hash_password, verify_password
from .model import (
    CONTROL_MODES,
    DEFAULT_SETTINGS,
    EPS_POS,
    IDLE,
    INVITE_ALPHABET,
    LEADER_ONLY,
    PAUSED,
    PLAYING,
    STATES,
    WAITING,
    Invite,
    Member,
    Room,
    Settings,
    blocks,
    by_seniority,
    channel_of,
    lead_ms,
    wait_timeout,
    waiting_on,
)
from .validation import (
    ChatReq,
    ControlReq,
    CreateReq,
    IgnoreWaitReq,
    InviteReq,
    JoinReq,
    PauseReq,
    PositionReq,
    RateReq,
    ReportReq,
    Req,
    RoomReq,
    SeekReq,
    SetContentReq,
    UpdateReq,
    UserReq,
    validate,
)

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
    if waiting_on(ctx.room, ctx.settings):
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
    for m in by_seniority(room.members.values()):
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


def _create(actor: Actor, req: CreateReq, now: float, settings: Settings, ids: IdSource) -> Outcome:
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


def _join(ctx: _Ctx, actor: Actor, req: JoinReq) -> dict[str, Any]:
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
        invite = room.live_invite(req.invite_code, now)
        if invite is None:
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


def _leave(ctx: _Ctx, actor: Actor, req: RoomReq) -> dict[str, Any]:
    if actor.user_id not in ctx.room.members:
        ctx.changed = False
        return {"room_id": ctx.room.room_id, "left": False}
    _remove_member(ctx, actor.user_id, "left")
    return {"room_id": ctx.room.room_id, "left": True}


def _end_op(ctx: _Ctx, actor: Actor, req: RoomReq) -> dict[str, Any]:
    _require_leader(ctx.room, actor, admin_ok=True)
    reason = "ended_by_leader" if _is_leader(ctx.room, actor) else "ended_by_admin"
    _end(ctx, reason, actor.user_id)
    return {"room_id": ctx.room.room_id, "ended": True}


def _update(ctx: _Ctx, actor: Actor, req: UpdateReq) -> dict[str, Any]:
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


def _invite(ctx: _Ctx, actor: Actor, req: InviteReq) -> dict[str, Any]:
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


def _kick(ctx: _Ctx, actor: Actor, req: UserReq) -> dict[str, Any]:
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


def _transfer(ctx: _Ctx, actor: Actor, req: UserReq) -> dict[str, Any]:
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


def _chat(ctx: _Ctx, actor: Actor, req: ChatReq) -> dict[str, Any]:
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


def _play(ctx: _Ctx, actor: Actor, req: ControlReq) -> dict[str, Any]:
    room = ctx.room
    _require_control(room, actor)
    if _is_stale(room, req.command_seq) or room.state in (PLAYING, WAITING):
        return _unchanged(ctx)
    if waiting_on(room, ctx.settings):
        room.state = WAITING
        room.updated_at = ctx.now
        room.updated_by = actor.user_id
        ctx.log("wait", actor.user_id, waiting_on=waiting_on(room, ctx.settings))
        ctx.publish_state()
    else:
        _start_playing(ctx, actor.user_id)
    return _state_reply(ctx)


def _pause(ctx: _Ctx, actor: Actor, req: PauseReq) -> dict[str, Any]:
    room = ctx.room
    _require_control(room, actor)
    if _is_stale(room, req.command_seq) or room.state == PAUSED:
        return _unchanged(ctx)
    here = room.position_at(ctx.now)
    _stop(ctx, PAUSED, here if req.position is None else req.position, actor.user_id)
    return _state_reply(ctx)


def _seek(ctx: _Ctx, actor: Actor, req: SeekReq) -> dict[str, Any]:
    room, now = ctx.room, ctx.now
    _require_control(room, actor)
    target = round(req.position, 3)
    last = room.last_command
    duplicate = (
        last is not None
        and last["command"] == "seek"
        and abs(last["position"] - target) < EPS_POS
        and now < last["when"] + ctx.settings.duplicate_window_ms
    )
    standing_there = room.state != PLAYING and abs(room.position - target) < EPS_POS
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


def _rate(ctx: _Ctx, actor: Actor, req: RateReq) -> dict[str, Any]:
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


def _set_content(ctx: _Ctx, actor: Actor, req: SetContentReq) -> dict[str, Any]:
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
    for m in by_seniority(room.members.values()):
        ctx.publish_member(m)
    ctx.publish_state()
    return _state_reply(ctx)


def _buffering(ctx: _Ctx, actor: Actor, req: PositionReq) -> dict[str, Any]:
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
    if room.state == PLAYING and was_ready and blocks(m, s):
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


def _ready(ctx: _Ctx, actor: Actor, req: PositionReq) -> dict[str, Any]:
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


def _ignore_wait(ctx: _Ctx, actor: Actor, req: IgnoreWaitReq) -> dict[str, Any]:
    m = _player(ctx.room, actor)
    if m.ignore_wait == req.ignore:
        return _unchanged(ctx)
    m.ignore_wait = req.ignore
    ctx.log("ignore_wait", m.user_id, ignore=req.ignore)
    ctx.publish_member(m)
    _resume_if_unblocked(ctx, m.user_id)
    return _state_reply(ctx)


def _report(ctx: _Ctx, actor: Actor, req: ReportReq) -> dict[str, Any]:
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

_OPS: Final[dict[str, tuple[type[Req], _Op | None]]] = {
    "create": (CreateReq, None),
    "join": (JoinReq, _join),
    "leave": (RoomReq, _leave),
    "end": (RoomReq, _end_op),
    "update": (UpdateReq, _update),
    "invite": (InviteReq, _invite),
    "kick": (UserReq, _kick),
    "transfer": (UserReq, _transfer),
    "chat": (ChatReq, _chat),
    "play": (ControlReq, _play),
    "pause": (PauseReq, _pause),
    "seek": (SeekReq, _seek),
    "rate": (RateReq, _rate),
    "set_content": (SetContentReq, _set_content),
    "buffering": (PositionReq, _buffering),
    "ready": (PositionReq, _ready),
    "ignore_wait": (IgnoreWaitReq, _ignore_wait),
    "report": (ReportReq, _report),
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
    req = validate(model, data, name)
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
    ids: IdSource = SECURE_IDS,
) -> Outcome:
    """The node saw ``session_id`` close. The member stops blocking and, unless it joins again
    within ``reconnect_grace_ms``, :func:`tick` removes it. A stale session is ignored."""
    ctx = _Ctx(room, now_ms, settings, ids)
    m = room.members.get(user_id)
    if room.ended or m is None or m.session_id != session_id or m.disconnected_at is not None:
        return ctx.outcome({}, changed=False)
    m.connected = False
    m.disconnected_at = now_ms
    ctx.log("disconnect", user_id)
    ctx.publish_member(m)
    _resume_if_unblocked(ctx, room.updated_by)
    return ctx.outcome({})


def tick(
    room: Room,
    now_ms: float,
    *,
    settings: Settings = DEFAULT_SETTINGS,
    ids: IdSource = SECURE_IDS,
) -> Outcome:
    """Apply every timeout due at ``now_ms``: idle end, silent and disconnected members,
    buffering timeouts (then a waiting room starts), expired invitations, old chat-rate
    entries; and record ``Room.due_at`` when it differs from :func:`next_deadline`.
    Idempotent; ``changed`` is False when nothing was due and ``due_at`` was right."""
    ctx = _Ctx(room, now_ms, settings, ids)
    if room.ended:
        return ctx.outcome({}, changed=False)
    s = settings
    changed = False
    if now_ms - room.last_activity_at >= s.idle_end_ms:
        _end(ctx, "idle")
        return ctx.outcome({})

    for m in by_seniority(list(room.members.values())):
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
        for m in by_seniority(room.members.values())
        if blocks(m, s)
        and m.not_ready_since is not None
        and now_ms >= m.not_ready_since + wait_timeout(m, s)
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

    if any(i.expired(now_ms) for i in room.invites.values()):
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
    for code in [c for c, i in room.invites.items() if i.expired(now_ms)]:
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
        if blocks(m, s) and m.not_ready_since is not None:
            due.append(m.not_ready_since + wait_timeout(m, s))
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
