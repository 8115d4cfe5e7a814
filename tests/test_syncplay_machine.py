"""The SyncPlay room engine: every request, every transition, timeouts and invariants."""

from __future__ import annotations

import itertools
import json
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from revenge_ws.codes import ErrorCode
from revenge_ws.exceptions import ConfigError, RequestError
from revenge_ws.syncplay.machine import (
    INVITE_ALPHABET,
    REQUEST_TYPES,
    SECURE_IDS,
    STATES,
    Actor,
    Direct,
    Outcome,
    Publish,
    Room,
    RoomEnded,
    Settings,
    Subscribe,
    Unsubscribe,
    chat_history,
    disconnect,
    handle,
    hash_password,
    lead_ms,
    list_rooms,
    next_deadline,
    tick,
    verify_password,
)
from revenge_ws.syncplay.model import blocks

T0 = 1_700_000_000_000.0
FAST = Settings(scrypt_n=16, scrypt_r=1)
HOUR = 3_600_000.0

ROOM_KEYS = {
    "room_id",
    "name",
    "content",
    "public",
    "has_password",
    "max_participants",
    "control_mode",
    "leader_id",
    "state",
    "member_count",
    "created_at",
}
STATE_KEYS = {
    "room_id",
    "state",
    "position",
    "rate",
    "updated_at",
    "updated_by",
    "waiting_on",
    "command_seq",
}
COMMAND_KEYS = {"room_id", "command", "position", "rate", "when", "issued_by", "command_seq"}
MEMBER_KEYS = {
    "user_id",
    "username",
    "is_leader",
    "can_control",
    "is_ready",
    "is_buffering",
    "rtt_ms",
}
SYNC_KEYS = {"room_id", "target_position", "should_be_playing", "offset_seconds", "at"}


class SeededIds:
    """A deterministic IdSource."""

    def __init__(self, seed: int = 0, codes: list[str] | None = None) -> None:
        self.rng = random.Random(seed)
        self.n = 0
        self.codes = list(codes or [])

    def new_id(self) -> str:
        self.n += 1
        return f"id{self.n}"

    def invite_code(self) -> str:
        if self.codes:
            return self.codes.pop(0)
        return "".join(self.rng.choice(INVITE_ALPHABET) for _ in range(8))

    def salt(self) -> bytes:
        return self.rng.randbytes(16)


def who(uid: str, *, session: str | None = "default", admin: bool = False) -> Actor:
    return Actor(uid, uid.title(), f"s-{uid}" if session == "default" else session, admin)


def published(out: Outcome, mtype: str | None = None) -> list[dict[str, Any]]:
    return [e.data for e in out.effects if isinstance(e, Publish) and mtype in (None, e.type)]


def types(out: Outcome) -> list[str]:
    return [e.type for e in out.effects if isinstance(e, Publish)]


def commands(out: Outcome) -> list[dict[str, Any]]:
    return published(out, "syncplay.command")


def directs(out: Outcome) -> list[Direct]:
    return [e for e in out.effects if isinstance(e, Direct)]


def expect(code: ErrorCode, fn: Any, *args: Any, **kwargs: Any) -> RequestError:
    with pytest.raises(RequestError) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, info.value.message
    return info.value


class World:
    """One room and a fake clock."""

    def __init__(self, settings_: Settings = FAST, **create: Any) -> None:
        self.s = settings_
        self.now = T0
        self.ids = SeededIds()
        data = {"name": "Movie night", "content": {"type": "movie", "id": "m1"}, "public": True}
        data.update(create)
        self.created = handle(
            None, "syncplay.create", data, who("alice"), self.now, settings=self.s, ids=self.ids
        )
        assert self.created.room is not None
        self.room: Room = self.created.room

    def do(self, uid: str, rtype: str, *, actor: Actor | None = None, **data: Any) -> Outcome:
        data.setdefault("room_id", self.room.room_id)
        return handle(
            self.room,
            f"syncplay.{rtype}",
            data,
            actor or who(uid),
            self.now,
            settings=self.s,
            ids=self.ids,
        )

    def fails(self, code: ErrorCode, uid: str, rtype: str, **data: Any) -> RequestError:
        before = self.room.to_dict()
        err = expect(code, self.do, uid, rtype, **data)
        assert self.room.to_dict() == before, "a refused request must not change the room"
        return err

    def advance(self, ms: float) -> None:
        self.now += ms

    def tick(self) -> Outcome:
        return tick(self.room, self.now, settings=self.s)

    def join(self, *uids: str, ready: bool = True, rtt: float | None = None) -> None:
        for uid in uids:
            extra: dict[str, Any] = {} if rtt is None else {"rtt_ms": rtt}
            self.do(uid, "join", **extra)
            if ready:
                self.do(uid, "ready", position=0.0)

    def playing(self, *uids: str) -> Outcome:
        """alice plus ``uids`` ready, and the room playing."""
        self.do("alice", "ready", position=0.0)
        self.join(*uids)
        out = self.do("alice", "play")
        assert self.room.state == "playing"
        return out


# --------------------------------------------------------------------------- create / views


def test_create_makes_the_creator_a_subscribed_leader() -> None:
    w = World()
    out = w.created
    assert set(out.reply) == {"room", "members", "state"}
    assert set(out.reply["room"]) == ROOM_KEYS
    assert out.reply["room"]["leader_id"] == "alice"
    assert out.reply["room"]["max_participants"] == 50
    assert out.reply["room"]["control_mode"] == "shared"
    assert out.reply["room"]["has_password"] is False
    assert out.reply["state"]["state"] == "idle"
    assert set(out.reply["state"]) >= STATE_KEYS
    (member,) = out.reply["members"]
    assert set(member) >= MEMBER_KEYS
    assert member["is_leader"]
    assert not member["is_ready"]
    assert out.effects[0] == Subscribe("alice", "s-alice", f"playback:{w.room.room_id}")
    assert out.changed
    assert w.room.version == 1
    assert out.next_deadline is not None


def test_create_hashes_the_password_and_normalizes_the_name() -> None:
    w = World(
        password="s3cret", name="  Friday   night ", max_participants=3, control_mode="leader_only"
    )
    assert w.room.password_hash is not None
    assert "s3cret" not in w.room.password_hash
    assert w.room.view()["has_password"] is True
    assert w.room.name == "Friday night"
    assert w.room.max_participants == 3
    assert w.room.control_mode == "leader_only"


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "   "}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"content": {"type": "song", "id": "x"}}, "content.type"),
        ({"content": {"type": "movie"}}, "content.id"),
        ({"public": "yes"}, "public"),
        ({"max_participants": 0}, "max_participants"),
        ({"max_participants": 1001}, "max_participants"),
        ({"max_participants": 2.5}, "max_participants"),
        ({"control_mode": "anarchy"}, "control_mode"),
        ({"password": "p" * 300}, "password"),
    ],
)
def test_create_refuses_bad_data_naming_the_field(patch: dict[str, Any], field: str) -> None:
    data = {"name": "n", "content": {"type": "movie", "id": "m"}, "public": True} | patch
    err = expect(
        ErrorCode.INVALID_MESSAGE,
        handle,
        None,
        "syncplay.create",
        data,
        who("a"),
        T0,
        settings=FAST,
    )
    assert field in err.message


def test_handle_routing_and_envelope_errors() -> None:
    w = World()
    expect(ErrorCode.UNKNOWN_TYPE, handle, w.room, "syncplay.dance", {}, who("alice"), T0)
    err = expect(ErrorCode.INVALID_MESSAGE, handle, w.room, "syncplay.play", [1], who("alice"), T0)
    assert "'data'" in err.message
    err = expect(ErrorCode.INVALID_MESSAGE, handle, w.room, "syncplay.play", {}, who("alice"), T0)
    assert "room_id" in err.message
    expect(
        ErrorCode.NOT_FOUND, handle, None, "syncplay.play", {"room_id": "nope"}, who("alice"), T0
    )
    expect(ErrorCode.NOT_FOUND, w.do, "alice", "play", room_id="other")
    # The prefix is optional, and every listed type is served.
    out = handle(w.room, "ready", {"room_id": w.room.room_id}, who("alice"), T0)
    assert out.reply["applied"] is True
    assert "syncplay.report" in REQUEST_TYPES
    assert "syncplay.create" in REQUEST_TYPES


def test_settings_are_validated() -> None:
    for bad in (
        {"max_participants": 0},
        {"max_participants": 2000},
        {"min_lead_ms": 0},
        {"min_lead_ms": 6000},
        {"sync_threshold_s": 0},
        {"scrypt_n": 12},
        {"chat_history": 0},
        {"presence_refresh_ms": 30_000},
    ):
        with pytest.raises(ConfigError):
            Settings(**bad)


def test_passwords_hash_and_verify() -> None:
    h = hash_password("pw", b"salt" * 4, FAST)
    assert verify_password("pw", h)
    assert not verify_password("PW", h)
    for broken in (
        "",
        "scrypt$x$1$1$00$00",
        "bcrypt$16$1$1$00$00",
        "scrypt$16$1$1$zz$00",
        "scrypt$3000000$1$1$00$00",
    ):
        assert not verify_password("pw", broken)
    assert SECURE_IDS.new_id() != SECURE_IDS.new_id()
    assert len(SECURE_IDS.salt()) == 16
    code = SECURE_IDS.invite_code()
    assert len(code) == 8
    assert set(code) <= set(INVITE_ALPHABET)


# --------------------------------------------------------------------------- join


def test_join_subscribes_then_announces() -> None:
    w = World()
    out = w.do("bob", "join", rtt_ms=80.0)
    assert set(out.reply) == {"room", "members", "state"}
    assert out.reply["room"]["member_count"] == 2
    assert isinstance(out.effects[0], Subscribe)
    assert out.effects[0].session_id == "s-bob"
    (joined,) = published(out, "syncplay.member_joined")
    assert joined["user_id"] == "bob"
    assert joined["is_ready"] is False
    assert joined["rtt_ms"] == 80.0
    assert [m["user_id"] for m in out.reply["members"]] == ["alice", "bob"]


def test_join_again_is_idempotent_and_a_new_connection_takes_over() -> None:
    w = World()
    w.do("bob", "join")
    again = w.do("bob", "join")
    assert again.effects == []
    moved = w.do("bob", "join", actor=who("bob", session="s-bob-tv"))
    assert moved.effects[:2] == [
        Unsubscribe("bob", "s-bob", f"playback:{w.room.room_id}"),
        Subscribe("bob", "s-bob-tv", f"playback:{w.room.room_id}"),
    ]
    assert w.room.members["bob"].session_id == "s-bob-tv"
    # The old connection no longer speaks for bob's player.
    err = w.fails(ErrorCode.CONFLICT, "bob", "ready")
    assert "join" in err.message
    # An HTTP join of a member changes nothing.
    http = w.do("bob", "join", actor=who("bob", session=None))
    assert http.effects == []
    assert w.room.members["bob"].session_id == "s-bob-tv"


def test_join_password_rules() -> None:
    w = World(password="pw")
    w.fails(ErrorCode.FORBIDDEN, "bob", "join")
    w.fails(ErrorCode.FORBIDDEN, "bob", "join", password="nope")
    w.do("bob", "join", password="pw")
    w.do("root", "join", actor=who("root", admin=True))
    assert set(w.room.members) == {"alice", "bob", "root"}


def test_join_full_room_is_a_conflict() -> None:
    w = World(max_participants=2)
    w.do("bob", "join")
    w.fails(ErrorCode.CONFLICT, "carol", "join")


def test_join_unknown_or_ended_room() -> None:
    w = World()
    expect(ErrorCode.NOT_FOUND, handle, None, "syncplay.join", {"room_id": "x"}, who("bob"), T0)
    expect(ErrorCode.INVALID_MESSAGE, w.do, "bob", "join", room_id=None)
    w.do("alice", "end")
    expect(ErrorCode.NOT_FOUND, w.do, "bob", "join")


def test_invitations_admit_without_password() -> None:
    w = World(password="pw")
    code = w.do("alice", "invite").reply["code"]
    assert len(code) == 8
    assert set(code) <= set(INVITE_ALPHABET)
    out = handle(
        w.room, "syncplay.join", {"invite_code": code.lower()}, who("bob"), w.now, settings=FAST
    )
    assert "bob" in w.room.members
    assert out.reply["room"]["room_id"] == w.room.room_id
    spaced = code[:4] + "-" + code[4:]
    w.do("carol", "join", invite_code=spaced)
    w.fails(ErrorCode.NOT_FOUND, "dave", "join", invite_code="ZZZZZZZZ")
    w.advance(24 * HOUR)
    w.fails(ErrorCode.NOT_FOUND, "dave", "join", invite_code=code)


def test_personal_invitations_and_bans() -> None:
    w = World()
    w.join("bob", "carol")
    personal = w.do("alice", "invite", user_id="dave").reply
    assert personal["user_id"] == "dave"
    assert personal["expires_at"] == w.now + 24 * HOUR
    w.fails(ErrorCode.FORBIDDEN, "erin", "join", invite_code=personal["code"])
    w.do("dave", "join", invite_code=personal["code"])

    w.do("alice", "kick", user_id="bob")
    w.fails(ErrorCode.FORBIDDEN, "bob", "join")
    open_code = w.do("carol", "invite").reply["code"]
    w.fails(ErrorCode.FORBIDDEN, "bob", "join", invite_code=open_code)
    w.fails(ErrorCode.FORBIDDEN, "carol", "invite", user_id="bob")
    back = w.do("alice", "invite", user_id="bob").reply["code"]
    w.do("bob", "join", invite_code=back)
    assert "bob" in w.room.members
    assert "bob" not in w.room.banned
    w.fails(ErrorCode.FORBIDDEN, "zed", "invite")


def test_invitations_are_bounded_and_pruned() -> None:
    w = World(Settings(scrypt_n=16, max_invites=3))
    codes = [w.do("alice", "invite").reply["code"] for _ in range(5)]
    assert list(w.room.invites) == codes[2:]
    w.advance(24 * HOUR)
    w.do("alice", "chat", message="still here")
    assert w.tick().changed
    assert w.room.invites == {}


def test_invite_code_collisions_draw_again() -> None:
    w = World()
    w.ids.codes = ["AAAAAAAA", "AAAAAAAA", "BBBBBBBB"]
    assert w.do("alice", "invite").reply["code"] == "AAAAAAAA"
    assert w.do("alice", "invite").reply["code"] == "BBBBBBBB"
    w.ids.codes = ["AAAAAAAA"] * 9
    w.fails(ErrorCode.INTERNAL, "alice", "invite")


# --------------------------------------------------------------- leave / end / kick / transfer


def test_leader_leaving_passes_leadership_to_the_longest_present() -> None:
    w = World()
    w.advance(1)
    w.join("bob")
    w.advance(1)
    w.join("carol")
    out = w.do("alice", "leave")
    assert out.reply == {"room_id": w.room.room_id, "left": True}
    (left,) = published(out, "syncplay.member_left")
    assert left["user_id"] == "alice"
    assert left["is_leader"]
    assert left["reason"] == "left"
    assert Unsubscribe("alice", "s-alice", f"playback:{w.room.room_id}") in out.effects
    assert w.room.leader_id == "bob"
    assert any(
        d["user_id"] == "bob" and d["is_leader"] for d in published(out, "syncplay.member_updated")
    )
    assert w.do("alice", "leave").reply["left"] is False


def test_heir_prefers_connected_members() -> None:
    w = World()
    w.advance(1)
    w.join("bob")
    w.advance(1)
    w.join("carol")
    disconnect(w.room, "bob", "s-bob", w.now, settings=FAST)
    w.do("alice", "leave")
    assert w.room.leader_id == "carol"


def test_last_member_leaving_ends_the_room() -> None:
    w = World()
    out = w.do("alice", "leave")
    assert w.room.ended
    assert w.room.ended_reason == "empty"
    assert published(out, "syncplay.ended") == [{"room_id": w.room.room_id, "reason": "empty"}]
    assert out.effects[-1] == RoomEnded(w.room.room_id, "empty")
    assert out.next_deadline is None
    expect(ErrorCode.NOT_FOUND, w.do, "alice", "play")


def test_end_by_leader_or_admin_only() -> None:
    w = World()
    w.join("bob")
    w.fails(ErrorCode.FORBIDDEN, "bob", "end")
    out = w.do("root", "end", actor=who("root", admin=True))
    assert published(out, "syncplay.ended")[0]["reason"] == "ended_by_admin"
    unsubs = [e.user_id for e in out.effects if isinstance(e, Unsubscribe)]
    assert unsubs == ["alice", "bob"]
    assert types(out)[-1] == "syncplay.ended"
    assert isinstance(out.effects[-1], RoomEnded)
    w2 = World()
    assert published(w2.do("alice", "end"), "syncplay.ended")[0]["reason"] == "ended_by_leader"


def test_kick_rules() -> None:
    w = World()
    w.join("bob", "carol")
    w.fails(ErrorCode.FORBIDDEN, "bob", "kick", user_id="carol")
    w.fails(ErrorCode.INVALID_MESSAGE, "alice", "kick", user_id="alice")
    w.fails(ErrorCode.NOT_FOUND, "alice", "kick", user_id="zed")
    w.fails(ErrorCode.INVALID_MESSAGE, "alice", "kick")
    out = w.do("alice", "kick", user_id="bob")
    assert directs(out) == [
        Direct("bob", "s-bob", "syncplay.kicked", {"room_id": w.room.room_id, "by": "alice"})
    ]
    assert published(out, "syncplay.member_left")[0]["reason"] == "kicked"
    assert "bob" in w.room.banned
    # An admin may kick the leader: leadership passes on.
    w.do("root", "kick", actor=who("root", admin=True), user_id="alice")
    assert w.room.leader_id == "carol"


def test_transfer_leadership() -> None:
    w = World()
    w.join("bob")
    w.fails(ErrorCode.FORBIDDEN, "bob", "transfer", user_id="bob")
    w.fails(ErrorCode.NOT_FOUND, "alice", "transfer", user_id="zed")
    out = w.do("alice", "transfer", user_id="bob")
    assert out.reply == {"room_id": w.room.room_id, "leader_id": "bob"}
    updates = {d["user_id"]: d["is_leader"] for d in published(out, "syncplay.member_updated")}
    assert updates == {"alice": False, "bob": True}
    assert types(w.do("bob", "transfer", user_id="bob")) == []


# --------------------------------------------------------------------------- update


def test_update_settings_leader_only() -> None:
    w = World(password="pw")
    w.do("bob", "join", password="pw")
    w.fails(ErrorCode.FORBIDDEN, "bob", "update", name="mine")
    out = w.do(
        "alice",
        "update",
        name="Renamed",
        public=False,
        password=None,
        max_participants=10,
        control_mode="leader_only",
        can_control={"bob": True},
    )
    room = out.reply["room"]
    assert room["name"] == "Renamed"
    assert room["public"] is False
    assert room["has_password"] is False
    assert room["max_participants"] == 10
    assert room["control_mode"] == "leader_only"
    assert types(out) == ["syncplay.room_updated", "syncplay.member_updated"]
    assert w.room.members["bob"].can_control
    w.do("alice", "update", password="new")
    assert w.room.password_hash is not None
    assert verify_password("new", w.room.password_hash)
    assert types(w.do("alice", "update", name="Renamed")) == []
    w.fails(ErrorCode.NOT_FOUND, "alice", "update", can_control={"zed": True})
    w.fails(ErrorCode.INVALID_MESSAGE, "alice", "update", max_participants=5000)
    w.fails(ErrorCode.INVALID_MESSAGE, "alice", "update", name="   ")


# --------------------------------------------------------------------------- chat


def test_chat_publishes_and_keeps_history() -> None:
    w = World(Settings(scrypt_n=16, chat_history=3))
    w.join("bob")
    out = w.do("bob", "chat", message="hi")
    (msg,) = published(out, "syncplay.chat")
    assert set(msg) == {"message_id", "user_id", "username", "message", "timestamp"}
    assert msg["username"] == "Bob"
    assert out.reply["message_id"] == msg["message_id"]
    for i in range(4):
        w.do("alice", "chat", message=f"m{i}")
    assert [c["message"] for c in w.room.chat] == ["m1", "m2", "m3"]
    assert [c["message"] for c in chat_history(w.room, who("bob"), limit=2)["messages"]] == [
        "m2",
        "m3",
    ]
    assert chat_history(w.room, who("bob"), limit=0)["messages"] == []
    before = chat_history(w.room, who("root", admin=True), before=w.room.chat[-1]["timestamp"] + 1)
    assert len(before["messages"]) == 3
    expect(ErrorCode.FORBIDDEN, chat_history, w.room, who("zed"))


def test_chat_length_and_membership() -> None:
    w = World()
    w.do("alice", "chat", message="x" * 1000)
    w.fails(ErrorCode.INVALID_MESSAGE, "alice", "chat", message="x" * 1001)
    w.fails(ErrorCode.INVALID_MESSAGE, "alice", "chat", message="   ")
    w.fails(ErrorCode.INVALID_MESSAGE, "alice", "chat", message="")
    w.fails(ErrorCode.FORBIDDEN, "zed", "chat", message="hi")


def test_chat_rate_limit_is_per_user_per_minute() -> None:
    w = World()
    w.join("bob")
    for _ in range(60):
        w.do("alice", "chat", message="spam")
        w.advance(100)
    err = w.fails(ErrorCode.RATE_LIMITED, "alice", "chat", message="one more")
    assert err.retryable
    w.do("bob", "chat", message="I still can")
    w.advance(55_000)  # the first messages are now over a minute old
    w.do("alice", "chat", message="again")
    w.advance(61_000)
    w.tick()
    assert w.room.chat_times == {}


# --------------------------------------------------------------------------- play / readiness


def test_play_waits_for_members_that_are_not_ready() -> None:
    w = World()
    w.join("bob", ready=False)
    out = w.do("bob", "play")
    assert w.room.state == "waiting"
    assert commands(out) == []
    (state,) = published(out, "syncplay.state")
    assert state["waiting_on"] == ["alice", "bob"]
    assert state["updated_by"] == "bob"
    assert w.do("alice", "play").reply["applied"] is False  # duplicate

    out = w.do("alice", "ready", position=0.0)
    assert published(out, "syncplay.state")[0]["waiting_on"] == ["bob"]
    w.advance(250)
    out = w.do("bob", "ready", position=0.0)
    (cmd,) = commands(out)
    assert set(cmd) == COMMAND_KEYS
    assert cmd["command"] == "play"
    assert cmd["when"] >= w.now + 500
    assert cmd["issued_by"] == "bob"
    assert w.room.state == "playing"
    assert out.reply["state"]["state"] == "playing"


def test_play_when_everyone_is_ready_schedules_with_the_lead() -> None:
    w = World()
    w.do("alice", "ready", position=0.0)
    w.join("bob", rtt=400.0)
    out = w.do("alice", "play")
    (cmd,) = commands(out)
    assert cmd["when"] == w.now + 800.0  # 2 x the worst RTT
    assert cmd["command_seq"] == 1
    assert w.room.command_seq == 1
    assert types(out) == ["syncplay.command", "syncplay.state"]
    assert out.reply["state"]["when"] == cmd["when"]
    again = w.do("bob", "play")
    assert again.reply["applied"] is False
    assert again.effects == []


def test_lead_is_bounded() -> None:
    w = World()
    assert lead_ms(w.room, FAST) == 500.0
    w.room.members["alice"].rtt_ms = 10_000.0
    assert lead_ms(w.room, FAST) == 5_000.0
    w.room.members["alice"].connected = False
    assert lead_ms(w.room, FAST) == 500.0


def test_ignore_wait_unblocks_and_can_be_undone() -> None:
    w = World()
    w.do("alice", "ready")
    w.join("bob", ready=False)
    w.do("alice", "play")
    out = w.do("bob", "ignore_wait", ignore=True)
    assert commands(out)[0]["command"] == "play"
    assert w.do("bob", "ignore_wait", ignore=True).reply["applied"] is False
    w.do("bob", "ignore_wait", ignore=False)
    assert not w.room.members["bob"].ignore_wait
    assert w.room.state == "playing"


def test_new_member_into_a_playing_room_does_not_stop_it() -> None:
    w = World()
    w.playing()
    w.advance(5_000)
    out = w.do("bob", "join")
    assert w.room.state == "playing"
    assert commands(out) == []
    w.do("bob", "buffering", position=0.0)  # first load: catches up instead of stopping everyone
    assert w.room.state == "playing"
    assert w.do("bob", "buffering", position=1.0).reply["applied"] is False
    w.do("bob", "ready", position=5.0)
    assert w.room.state == "playing"
    assert w.room.members["bob"].is_ready


def test_a_new_member_joining_a_waiting_room_is_waited_for() -> None:
    w = World()
    w.join("bob", ready=False)
    w.do("alice", "ready")
    w.do("alice", "play")
    out = w.do("carol", "join")
    assert published(out, "syncplay.state")[0]["waiting_on"] == ["bob", "carol"]


# --------------------------------------------------------------- pause / seek / rate / content


def test_pause_from_playing_freezes_the_timeline() -> None:
    w = World()
    w.playing("bob")
    w.advance(500 + 10_000)
    out = w.do("bob", "pause")
    (cmd,) = commands(out)
    assert cmd["command"] == "pause"
    assert cmd["when"] == w.now
    assert cmd["position"] == 10.0
    assert w.room.state == "paused"
    assert w.room.position_at(w.now + 99_999) == 10.0
    assert w.do("alice", "pause", position=3.0).reply["applied"] is False
    out = w.do("alice", "play")
    assert commands(out)[0]["position"] == 10.0


def test_pause_with_explicit_position_and_from_other_states() -> None:
    w = World()
    out = w.do("alice", "pause", position=42.5)  # idle -> paused
    assert w.room.state == "paused"
    assert commands(out)[0]["position"] == 42.5
    w.join("bob", ready=False)
    w.do("alice", "ready")
    w.do("alice", "play")
    assert w.room.state == "waiting"
    out = w.do("bob", "pause", position=40.0)
    assert w.room.state == "paused"
    assert commands(out)[0]["position"] == 40.0
    w.fails(ErrorCode.INVALID_MESSAGE, "alice", "pause", position=-1.0)
    w.fails(ErrorCode.INVALID_MESSAGE, "alice", "pause", position=float("inf"))


def test_seek_while_playing_is_scheduled() -> None:
    w = World()
    w.playing("bob")
    w.advance(3_000)
    out = w.do("bob", "seek", position=600.0)
    (cmd,) = commands(out)
    assert cmd["command"] == "seek"
    assert cmd["position"] == 600.0
    assert cmd["when"] == w.now + 500
    assert w.room.state == "playing"
    assert w.room.position_at(w.now + 100) == 600.0  # stands still until `when`
    assert w.room.position_at(cmd["when"] + 2_000) == pytest.approx(602.0)
    w.advance(200)
    assert w.do("alice", "seek", position=600.0).reply["applied"] is False  # duplicate
    w.advance(5_000)
    assert commands(w.do("alice", "seek", position=600.0))  # a real second seek later


def test_seek_while_idle_or_paused() -> None:
    w = World()
    out = w.do("alice", "seek", position=12.0)
    assert w.room.state == "paused"
    assert commands(out)[0]["when"] >= w.now + 500
    w.advance(5_000)
    assert w.do("alice", "seek", position=12.0).reply["applied"] is False
    w.fails(ErrorCode.INVALID_MESSAGE, "alice", "seek")


def test_rate_changes_reanchor_the_timeline() -> None:
    w = World()
    w.playing()
    start = w.room.anchor_ms
    w.advance(500 + 4_000)
    out = w.do("alice", "rate", rate=2.0)
    (cmd,) = commands(out)
    assert cmd["command"] == "rate"
    assert cmd["position"] == 4.0
    assert cmd["when"] == w.now
    assert w.room.position_at(w.now + 1_000) == pytest.approx(6.0)
    assert w.do("alice", "rate", rate=2.0).reply["applied"] is False
    for bad in (0.2, 2.5, "fast"):
        w.fails(ErrorCode.INVALID_MESSAGE, "alice", "rate", rate=bad)
    assert start < w.room.anchor_ms


def test_rate_change_before_a_scheduled_start_keeps_the_schedule() -> None:
    w = World()
    w.playing()
    when = w.room.anchor_ms
    w.advance(100)
    cmd = commands(w.do("alice", "rate", rate=0.5))[0]
    assert cmd["when"] == when
    assert w.room.anchor_ms == when
    assert cmd["position"] == 0.0


def test_set_content_resets_the_room() -> None:
    w = World()
    w.playing("bob")
    out = w.do("bob", "set_content", content={"type": "episode", "id": "e7"})
    # Every member is told it is loading the new content (not ready).
    assert types(out) == [
        "syncplay.room_updated",
        "syncplay.member_updated",
        "syncplay.member_updated",
        "syncplay.state",
    ]
    assert w.room.state == "idle"
    assert w.room.position == 0.0
    assert w.room.content == {"type": "episode", "id": "e7"}
    assert all(not m.is_ready and m.first_load for m in w.room.members.values())
    assert (
        w.do("alice", "set_content", content={"type": "episode", "id": "e7"}).reply["applied"]
        is False
    )
    w.fails(ErrorCode.INVALID_MESSAGE, "alice", "set_content", content={"type": "book", "id": "b"})


def test_leader_only_mode_guards_playback_controls() -> None:
    w = World(control_mode="leader_only")
    w.join("bob", "carol")
    for rtype, data in (
        ("play", {}),
        ("pause", {}),
        ("seek", {"position": 5.0}),
        ("rate", {"rate": 1.5}),
        ("set_content", {"content": {"type": "movie", "id": "m2"}}),
    ):
        w.fails(ErrorCode.FORBIDDEN, "bob", rtype, **data)
        w.fails(ErrorCode.FORBIDDEN, "zed", rtype, **data)
    w.do("alice", "update", can_control={"carol": True})
    w.do("carol", "seek", position=5.0)
    w.do("alice", "ready")
    w.do("alice", "play")
    assert w.room.state == "playing"
    # Buffering is not a control: anyone may report it.
    w.do("bob", "buffering", position=5.0)


def test_stale_command_seq_is_answered_with_the_current_state() -> None:
    w = World()
    w.playing("bob")
    seen = w.room.command_seq
    w.do("alice", "seek", position=30.0)
    w.advance(2_000)
    out = w.do("bob", "pause", command_seq=seen)
    assert out.reply["applied"] is False
    assert out.effects == []
    assert out.reply["state"]["command_seq"] == seen + 1
    out = w.do("bob", "pause", command_seq=seen + 1)
    assert w.room.state == "paused"
    assert commands(out)[0]["command_seq"] == seen + 2
    w.fails(ErrorCode.INVALID_MESSAGE, "bob", "pause", command_seq=-1)


# --------------------------------------------------------------------------- buffering and timeouts


def test_rebuffering_pauses_everyone_until_ready() -> None:
    w = World()
    w.playing("bob", "carol")
    w.advance(500 + 20_000)
    out = w.do("bob", "buffering", position=19.5)
    (cmd,) = commands(out)
    assert cmd["command"] == "pause"
    assert cmd["position"] == 19.5
    assert cmd["issued_by"] == "bob"
    assert w.room.state == "waiting"
    assert published(out, "syncplay.state")[0]["waiting_on"] == ["bob"]
    assert any(
        d["user_id"] == "bob" and d["is_buffering"]
        for d in published(out, "syncplay.member_updated")
    )
    w.advance(2_000)
    out = w.do("bob", "ready", position=19.5)
    (cmd,) = commands(out)
    assert cmd["command"] == "play"
    assert cmd["position"] == 19.5
    assert cmd["when"] >= w.now + 500
    kinds = [e["event"] for e in w.room.log]
    assert "buffer_start" in kinds
    assert "buffer_end" in kinds


def test_buffering_position_is_clamped_to_the_threshold() -> None:
    w = World()
    w.playing("bob")
    w.advance(500 + 60_000)
    out = w.do("bob", "buffering", position=1.0)
    assert commands(out)[0]["position"] == 58.0  # never more than 2 s back
    w2 = World()
    w2.playing("bob")
    w2.advance(100)  # before the scheduled start
    assert commands(w2.do("bob", "buffering", position=50.0))[0]["position"] == 0.0


def test_rebuffer_timeout_ignores_the_member_and_resumes() -> None:
    w = World()
    w.playing("bob")
    w.advance(10_000)
    w.do("bob", "buffering", position=9.0)
    assert w.room.state == "waiting"
    assert next_deadline(w.room, FAST) == w.now + 10_000
    w.advance(9_999)
    assert commands(w.tick()) == []
    assert w.room.state == "waiting"
    w.advance(1)
    out = w.tick()
    assert out.changed
    (timeout,) = published(out, "syncplay.wait_timeout")
    assert timeout["user_ids"] == ["bob"]
    assert commands(out)[0]["command"] == "play"
    assert w.room.state == "playing"
    assert w.room.members["bob"].wait_timed_out
    # bob's late `ready` brings it back without disturbing the room.
    out = w.do("bob", "ready", position=9.0)
    assert commands(out) == []
    assert not w.room.members["bob"].wait_timed_out


def test_first_load_timeout_is_longer() -> None:
    w = World(Settings(scrypt_n=16, member_stale_ms=0, member_remove_ms=0))
    w.do("alice", "ready")
    w.join("bob", ready=False)
    w.do("alice", "play")
    w.advance(59_999)
    w.tick()
    assert w.room.state == "waiting"
    w.advance(1)
    assert commands(w.tick())[0]["command"] == "play"


def test_a_flaky_member_stops_blocking_after_repeated_timeouts() -> None:
    w = World()
    w.playing("bob")
    for _ in range(3):
        w.advance(5_000)
        w.do("bob", "buffering")
        assert w.room.state == "waiting"
        w.advance(10_000)
        w.tick()
        assert w.room.state == "playing"
        w.do("bob", "ready")
    w.advance(5_000)
    w.do("bob", "buffering")
    assert w.room.state == "playing"
    assert not blocks(w.room.members["bob"], FAST)


def test_tick_is_a_noop_when_nothing_is_due() -> None:
    w = World()
    w.playing("bob")
    version = w.room.version
    out = w.tick()
    assert not out.changed
    assert out.effects == []
    assert w.room.version == version


# --------------------------------------------------------------------------- presence


def test_silent_members_stop_blocking_then_are_removed() -> None:
    w = World()
    w.do("alice", "ready")
    w.join("bob", ready=False)
    w.do("alice", "play")
    w.advance(20_000)
    w.do("alice", "report", position=0.0, is_playing=False)
    w.advance(10_000)  # bob silent for 30 s
    out = w.tick()
    assert not w.room.members["bob"].connected
    assert commands(out)[0]["command"] == "play"
    # bob speaks again from its own connection: it is back.
    out = w.do("bob", "report", position=0.0, is_playing=False)
    assert w.room.members["bob"].connected
    assert any(
        d["user_id"] == "bob" and d["is_connected"]
        for d in published(out, "syncplay.member_updated")
    )
    w.advance(120_000)
    w.do("alice", "chat", message="still here")
    out = w.tick()
    assert "bob" not in w.room.members
    assert published(out, "syncplay.member_left")[0]["reason"] == "timeout"


def test_a_member_back_from_silence_counts_for_its_own_request() -> None:
    w = World()
    w.do("alice", "report", position=0.0, is_playing=False, rtt_ms=400.0)
    w.advance(30_000)
    w.do("alice", "chat", message="keep the room active")  # alice is back at once
    w.join("bob")
    w.advance(30_000)
    w.tick()
    assert not w.room.members["bob"].connected
    w.do("bob", "report", position=0.0, is_playing=False, rtt_ms=1_000.0)
    assert w.room.members["bob"].connected
    disconnect(w.room, "bob", "s-bob", w.now, settings=FAST)
    w.advance(1_000)
    # A refused request does not bring a member back either.
    w.fails(ErrorCode.INVALID_MESSAGE, "bob", "seek", position=-1.0)
    assert not w.room.members["bob"].connected
    cmd = commands(w.do("bob", "seek", position=5.0))[0]
    assert cmd["when"] == w.now + 2_000  # bob's own RTT counts: it is connected again
    assert w.room.members["bob"].connected


class NoIds:
    """An id source that fails the test if anything draws from it."""

    def new_id(self) -> str:
        raise AssertionError("new_id drawn")

    def invite_code(self) -> str:
        raise AssertionError("invite_code drawn")

    def salt(self) -> bytes:
        raise AssertionError("salt drawn")


def test_disconnect_and_tick_use_the_injected_id_source() -> None:
    """``disconnect`` and ``tick`` take the id source like ``handle``: with one that must
    never be drawn from, a disconnect, the grace, the removal and the leader hand-over run."""
    w = World()
    w.join("bob")
    assert disconnect(w.room, "alice", "s-alice", w.now, settings=FAST, ids=NoIds()).changed
    w.advance(FAST.reconnect_grace_ms)
    out = tick(w.room, w.now, settings=FAST, ids=NoIds())
    assert "alice" not in w.room.members and w.room.leader_id == "bob"
    assert published(out, "syncplay.member_left")[0]["reason"] == "disconnected"


def test_disconnect_grace_then_removal_and_reconnect() -> None:
    w = World()
    w.join("bob")
    w.do("alice", "transfer", user_id="bob")
    out = disconnect(w.room, "bob", "s-bob", w.now, settings=FAST)
    assert out.changed
    assert not w.room.members["bob"].connected
    assert not disconnect(w.room, "bob", "s-bob", w.now, settings=FAST).changed
    assert not disconnect(w.room, "bob", "s-other", w.now, settings=FAST).changed
    assert not disconnect(w.room, "zed", "s-zed", w.now, settings=FAST).changed
    w.advance(20_000)
    out = w.do("bob", "join", actor=who("bob", session="s-bob-2"))
    assert w.room.members["bob"].connected
    assert w.room.leader_id == "bob"
    assert Subscribe("bob", "s-bob-2", f"playback:{w.room.room_id}") in out.effects
    disconnect(w.room, "bob", "s-bob-2", w.now, settings=FAST)
    w.advance(29_999)
    w.do("alice", "chat", message="keep alive")
    w.tick()
    assert "bob" in w.room.members
    w.advance(1)
    out = w.tick()
    assert "bob" not in w.room.members
    assert w.room.leader_id == "alice"
    assert published(out, "syncplay.member_left")[0]["reason"] == "disconnected"


def test_http_join_reserves_a_seat_for_the_reconnect_grace() -> None:
    w = World()
    out = w.do("bob", "join", actor=who("bob", session=None))
    assert not any(isinstance(e, Subscribe) for e in out.effects)
    assert not w.room.members["bob"].connected
    w.do("bob", "join")
    assert w.room.members["bob"].connected
    assert w.room.members["bob"].session_id == "s-bob"


def test_everyone_timing_out_ends_the_room() -> None:
    w = World()
    w.join("bob")
    w.advance(120_000)
    out = w.tick()
    assert w.room.ended
    assert isinstance(out.effects[-1], RoomEnded)
    assert not tick(w.room, w.now + 1, settings=FAST).changed
    assert next_deadline(w.room, FAST) is None


def test_idle_rooms_end_after_a_day() -> None:
    w = World(Settings(scrypt_n=16, member_remove_ms=0, member_stale_ms=0))
    w.playing()
    w.advance(23 * HOUR)
    w.do("alice", "report", position=1.0, is_playing=True)  # reports are not activity
    w.advance(HOUR - 1)
    assert not w.tick().changed
    w.advance(1)
    out = w.tick()
    assert w.room.ended
    assert published(out, "syncplay.ended")[0]["reason"] == "idle"


def test_next_deadline_is_the_earliest_timeout() -> None:
    w = World()
    assert next_deadline(w.room, FAST) == T0 + 30_000  # alice goes stale first
    w.do("alice", "ready")
    w.join("bob", ready=False)
    w.advance(10_000)
    w.do("alice", "report", position=0.0, is_playing=False)
    w.do("bob", "report", position=0.0, is_playing=False)
    assert next_deadline(w.room, FAST) == w.now + 30_000
    quiet = Settings(scrypt_n=16, member_stale_ms=0, member_remove_ms=0)
    assert next_deadline(w.room, quiet) == T0 + 60_000  # bob's first load
    disconnect(w.room, "bob", "s-bob", w.now, settings=quiet)
    assert next_deadline(w.room, quiet) == w.now + 30_000  # bob's reconnect grace


# --------------------------------------------------------------------------- drift


def test_report_in_sync_and_out_of_sync() -> None:
    w = World()
    w.playing("bob")
    w.advance(500 + 10_000)
    ok = w.do("bob", "report", position=10.5, is_playing=True, is_buffering=False, rtt_ms=0.0)
    assert ok.reply == {"in_sync": True, "offset_seconds": 0.5}
    assert ok.effects == []
    out = w.do("bob", "report", position=15.0, is_playing=True, is_buffering=False, rtt_ms=0.0)
    assert out.reply["in_sync"] is False
    (hint,) = directs(out)
    assert hint.type == "syncplay.sync"
    assert hint.session_id == "s-bob"
    assert set(hint.data) == SYNC_KEYS
    assert hint.data == {
        "room_id": w.room.room_id,
        "target_position": 10.0,
        "should_be_playing": True,
        "offset_seconds": 5.0,
        "at": w.now,
    }


def test_routine_reports_are_not_written() -> None:
    w = World()
    w.playing("bob")
    w.advance(500 + 10_000)
    version = w.room.version
    first = w.do("bob", "report", position=10.0, is_playing=True, rtt_ms=100.0)
    assert first.changed  # presence refresh (and a first RTT)
    w.advance(5_000)
    routine = w.do("bob", "report", position=15.0, is_playing=True, rtt_ms=110.0)
    assert not routine.changed
    assert routine.reply == {"in_sync": True, "offset_seconds": 0.055}
    assert w.room.version == version + 1
    assert w.room.members["bob"].rtt_ms == 100.0
    w.advance(1_000)
    assert w.do("bob", "report", position=16.0, is_playing=True, rtt_ms=300.0).changed
    assert w.room.members["bob"].rtt_ms == 300.0
    w.advance(10_000)
    assert w.do("bob", "report", position=26.0, is_playing=True).changed  # presence is due


def test_report_compensates_half_the_rtt() -> None:
    w = World()
    w.playing("bob")
    w.advance(500 + 10_000)
    # Sent 1 s ago at 9.0 (rtt 2 s): it is on time.
    out = w.do("bob", "report", position=9.0, is_playing=True, rtt_ms=2_000.0)
    assert out.reply == {"in_sync": True, "offset_seconds": 0.0}
    assert w.room.members["bob"].rtt_ms == 2_000.0


def test_sync_hints_back_off_so_they_never_loop() -> None:
    w = World()
    w.playing("bob")
    w.advance(500 + 10_000)
    sent = []
    for _ in range(40):
        w.advance(500)
        out = w.do("bob", "report", position=0.0, is_playing=True, rtt_ms=0.0)
        sent += [w.now for _ in directs(out)]
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert gaps == sorted(gaps)
    assert gaps[0] >= 1_500
    assert gaps[1] >= 3_000
    assert len(sent) <= 5
    # Back in sync resets the backoff.
    timeline = w.room.position_at(w.now)
    w.do("bob", "report", position=timeline, is_playing=True, rtt_ms=0.0)
    w.advance(60_000)
    out = w.do("bob", "report", position=0.0, is_playing=True, rtt_ms=0.0)
    assert directs(out)
    w.advance(1_000)
    assert not directs(w.do("bob", "report", position=0.0, is_playing=True, rtt_ms=0.0))


def test_play_state_mismatch_gets_a_hint() -> None:
    w = World()
    w.playing("bob")
    w.advance(2_000)
    w.do("alice", "pause", position=1.5)
    w.advance(2_000)
    out = w.do("bob", "report", position=1.5, is_playing=True)
    (hint,) = directs(out)
    assert hint.data["should_be_playing"] is False
    assert hint.data["target_position"] == 1.5


def test_reports_not_judged_while_settling_buffering_stale_or_idle() -> None:
    w = World()
    assert w.do("alice", "report", position=99.0, is_playing=True).reply["in_sync"]  # idle
    w.playing("bob")
    w.advance(1_000)  # within a second of the scheduled start
    assert not directs(w.do("bob", "report", position=99.0, is_playing=True))
    w.advance(5_000)
    assert not directs(w.do("bob", "report", position=99.0, is_playing=False, is_buffering=True))
    old = w.room.command_seq - 1
    assert not directs(w.do("bob", "report", position=99.0, is_playing=True, command_seq=old))
    w.fails(ErrorCode.INVALID_MESSAGE, "bob", "report", position=1.0)
    w.fails(ErrorCode.INVALID_MESSAGE, "bob", "report", position=1.0, is_playing=True, rtt_ms=-5.0)
    w.fails(ErrorCode.FORBIDDEN, "zed", "report", position=1.0, is_playing=True)


# --------------------------------------------------------------------------- storage, listing, log


def test_room_round_trips_through_json() -> None:
    w = World(password="pw")
    w.do("alice", "ready")
    for uid in ("bob", "carol"):
        w.do(uid, "join", password="pw", rtt_ms=50.0)
        w.do(uid, "ready")
    w.do("alice", "play")
    w.do("bob", "chat", message="hello")
    w.do("alice", "invite", user_id="dave")
    w.do("alice", "kick", user_id="carol")
    w.do("bob", "buffering", position=0.2)
    blob = json.dumps(w.room.to_dict(), allow_nan=False)
    back = Room.from_dict(json.loads(blob))
    assert back == w.room
    assert back.to_dict() == w.room.to_dict()
    extra = json.loads(blob)
    extra["future_field"] = 1
    extra["members"]["bob"]["future_field"] = 2
    assert Room.from_dict(extra) == w.room
    with pytest.raises(ValueError, match="schema"):
        Room.from_dict({**w.room.to_dict(), "schema": 99})


def test_version_grows_on_every_mutation() -> None:
    w = World()
    versions = [w.room.version]
    w.join("bob")
    versions.append(w.room.version)
    w.do("alice", "ready")
    versions.append(w.room.version)
    w.do("alice", "play")
    versions.append(w.room.version)
    assert versions == sorted(set(versions))


def test_event_log_is_bounded() -> None:
    w = World(Settings(scrypt_n=16, event_log_size=5))
    w.playing("bob")
    for i in range(10):
        w.do("alice", "seek", position=float(i + 1))
    assert len(w.room.log) == 5
    assert w.room.log[-1]["event"] == "seek"
    assert w.room.log[-1]["position"] == 10.0


def test_list_rooms_shows_public_own_and_all_for_admins() -> None:
    a = World()
    b = World(public=False)
    b.room.room_id = "private"
    ended = World()
    ended.do("alice", "end")
    rooms = [b.room, a.room, ended.room]
    assert [r["room_id"] for r in list_rooms(rooms, who("zed"))["rooms"]] == [a.room.room_id]
    assert len(list_rooms(rooms, who("alice"))["rooms"]) == 2
    assert len(list_rooms(rooms, who("root", admin=True))["rooms"]) == 2
    assert set(list_rooms(rooms, who("zed"))["rooms"][0]) == ROOM_KEYS


# --------------------------------------------------------------------------- properties

USERS = ["alice", "bob", "carol", "dave"]
PROP = Settings(scrypt_n=16, scrypt_r=1)

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
    st.lists(st.integers(), max_size=2),
)


def mostly(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Valid values most of the time, garbage now and then."""
    return st.integers(0, 9).flatmap(lambda i: junk if i == 0 else good)


position = mostly(st.floats(0, 7_200))
seq = st.integers(0, 8)

REQUIRED: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "seek": {"position": position},
    "rate": {"rate": mostly(st.floats(0.1, 2.5))},
    "set_content": {
        "content": st.fixed_dictionaries(
            {"type": mostly(st.just("movie")), "id": st.sampled_from(["a", "b"])}
        )
    },
    "ignore_wait": {"ignore": mostly(st.booleans())},
    "report": {"position": position, "is_playing": mostly(st.booleans())},
    "kick": {"user_id": st.sampled_from(USERS)},
    "transfer": {"user_id": st.sampled_from(USERS)},
    "chat": {"message": st.text(max_size=5)},
}
OPTIONAL: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "join": {"password": st.sampled_from(["pw", "bad"]), "rtt_ms": mostly(st.floats(0, 3_000))},
    "update": {
        "control_mode": st.sampled_from(["shared", "leader_only", "x"]),
        "max_participants": st.integers(0, 5),
        "can_control": st.dictionaries(st.sampled_from(USERS), st.booleans(), max_size=2),
        "password": st.sampled_from(["pw", "", None]),
    },
    "invite": {"user_id": st.sampled_from(USERS)},
    "play": {"command_seq": seq},
    "pause": {"position": position, "command_seq": seq},
    "seek": {"command_seq": seq},
    "rate": {"command_seq": seq},
    "buffering": {"position": position},
    "ready": {"position": position},
    "report": {
        "is_buffering": st.booleans(),
        "rtt_ms": mostly(st.floats(0, 2_000)),
        "command_seq": seq,
    },
}
# Weighted by repetition: playback requests dominate, room-ending ones are rare.
KINDS = (
    ["play", "pause", "seek", "buffering", "ready", "report"] * 4
    + ["join", "rate", "ignore_wait", "chat", "set_content", "invite", "update"] * 2
    + ["leave", "kick", "transfer", "end"]
)


def _request(rtype: str) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(REQUIRED.get(rtype, {}), optional=OPTIONAL.get(rtype, {}))


step = st.one_of(
    st.tuples(
        st.just("advance"),
        st.sampled_from([0.0, 100.0, 600.0, 1_600.0, 5_000.0, 10_000.0, 31_000.0, 61_000.0]),
    ),
    st.tuples(st.just("tick"), st.just(0.0)),
    st.tuples(st.just("disconnect"), st.sampled_from(USERS)),
    st.sampled_from(KINDS).flatmap(
        lambda t: st.tuples(st.just(t), st.sampled_from(USERS), _request(t))
    ),
    st.sampled_from(KINDS).flatmap(
        lambda t: st.tuples(st.just(t), st.sampled_from(USERS), _request(t))
    ),
    st.sampled_from(KINDS).flatmap(
        lambda t: st.tuples(st.just(t), st.sampled_from(USERS), _request(t))
    ),
)


def _check_invariants(room: Room) -> None:
    assert room.state in STATES
    if room.ended:
        return
    assert room.leader_id in room.members
    if room.state == "waiting":
        assert any(blocks(m, PROP) for m in room.members.values()), "waiting on nobody"
    assert Room.from_dict(json.loads(json.dumps(room.to_dict(), allow_nan=False))) == room


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(step, min_size=5, max_size=60),
    password=st.sampled_from([None, "pw"]),
    mode=st.sampled_from(["shared", "leader_only"]),
    primed=st.booleans(),
)
def test_random_request_sequences_keep_every_invariant(
    steps: list[tuple[Any, ...]], password: str | None, mode: str, primed: bool
) -> None:
    now = T0
    ids = SeededIds(1)
    data = {
        "name": "r",
        "content": {"type": "movie", "id": "a"},
        "public": True,
        "control_mode": mode,
    }
    if password:
        data["password"] = password
    room = handle(None, "syncplay.create", data, who("alice"), now, settings=PROP, ids=ids).room
    assert room is not None
    for uid in ("bob", "carol"):
        join = {"room_id": room.room_id, "password": "pw"}
        handle(room, "syncplay.join", join, who(uid), now, settings=PROP, ids=ids)
    if primed:  # everyone ready and playing: the interesting half of the state space
        for uid in ("alice", "bob", "carol"):
            handle(room, "ready", {"room_id": room.room_id}, who(uid), now, settings=PROP)
        handle(room, "play", {"room_id": room.room_id}, who("alice"), now, settings=PROP)
        assert room.state == "playing"
    last_seq = room.command_seq
    for item in steps:
        kind = item[0]
        if kind == "advance":
            now += item[1]
            continue
        before = room.to_dict()
        try:
            if kind == "tick":
                out = tick(room, now, settings=PROP)
            elif kind == "disconnect":
                out = disconnect(room, item[1], f"s-{item[1]}", now, settings=PROP)
            else:
                payload = {"room_id": room.room_id, **item[2]}
                admin = item[1] == "dave"
                out = handle(
                    room,
                    f"syncplay.{kind}",
                    payload,
                    who(item[1], admin=admin),
                    now,
                    settings=PROP,
                    ids=ids,
                )
        except RequestError:
            assert room.to_dict() == before, f"{kind} refused but changed the room"
            continue
        if out.changed:
            assert room.version == before["version"] + 1
        else:
            assert room.to_dict() == before
        lead = lead_ms(room, PROP)
        for cmd in commands(out):
            assert cmd["command_seq"] == last_seq + 1
            last_seq = cmd["command_seq"]
            assert set(cmd) == COMMAND_KEYS
            if cmd["command"] in ("play", "seek"):
                assert now + PROP.min_lead_ms <= cmd["when"] <= now + PROP.max_lead_ms
                assert cmd["when"] >= now + lead
            elif cmd["command"] == "pause":
                assert cmd["when"] == now
            else:
                assert cmd["when"] >= now
        for d in directs(out):
            assert d.type in ("syncplay.sync", "syncplay.kicked")
        _check_invariants(room)
        if room.ended:
            assert isinstance(out.effects[-1], RoomEnded)
            break
    # No room freezes: once every deadline has passed, tick leaves nobody waiting.
    if not room.ended:
        deadline = next_deadline(room, PROP)
        assert deadline is not None
        tick(room, max(now, deadline) + PROP.buffering_timeout_first_ms, settings=PROP)
        assert room.ended or room.state != "waiting"
        _check_invariants(room)
