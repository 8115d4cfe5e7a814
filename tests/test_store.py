"""The notification store contract (protocol §5/§9), run against SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from revenge_ws.codes import ErrorCode
from revenge_ws.exceptions import ConfigError, RequestError, StoreError, StoreUnavailable
from revenge_ws.store import Notification, NotificationStore, open_store, redact_url, sqlite_path
from revenge_ws.store.base import (
    DEFAULT_DEDUPE_WINDOW_MS,
    OutboxEvent,
    ms_to_rfc3339,
    new_id,
    parse_rfc3339,
)
from revenge_ws.store.postgres import PostgresNotificationStore
from revenge_ws.store.sqlite import SQLiteNotificationStore

from .store_fixtures import Backend, backend, pg_database, store, unreachable_store

# Re-exported so pytest finds them in this module; see store_fixtures.
__all__ = ["backend", "pg_database", "store", "unreachable_store"]

T0 = 1_700_000_000_000  # 2023-11-14T22:13:20Z, in the past of any test run
DAY = 86_400_000
WIRE_KEYS = {
    "action_url",
    "body",
    "content_id",
    "created_at",
    "icon_url",
    "id",
    "notification_type",
    "priority",
    "read",
    "title",
}


async def notify(
    s: NotificationStore, users: list[str] | str = "alice", **fields: Any
) -> list[tuple[Notification, bool]]:
    fields.setdefault("notification_type", "content.new_movie")
    fields.setdefault("title", "New movie")
    fields.setdefault("now_ms", T0)
    return await s.create_many([users] if isinstance(users, str) else users, **fields)


async def one(s: NotificationStore, user: str = "alice", **fields: Any) -> Notification:
    [(n, created)] = await notify(s, user, **fields)
    assert created
    return n


# -- creating ------------------------------------------------------------------------------


async def test_create_stores_every_field(store: NotificationStore) -> None:
    assert isinstance(store, NotificationStore)
    n = await one(
        store,
        notification_type="content.new_episode",
        title="S01E02 is here",
        body="Watch it now",
        priority="high",
        content_id="ep-2",
        icon_url="https://img.example/ep-2.png",
        action_url="/play/ep-2",
        now_ms=T0 + 123,
    )
    assert (n.user_id, n.notification_type, n.title, n.body, n.priority) == (
        "alice",
        "content.new_episode",
        "S01E02 is here",
        "Watch it now",
        "high",
    )
    assert (n.content_id, n.icon_url, n.action_url) == (
        "ep-2",
        "https://img.example/ep-2.png",
        "/play/ep-2",
    )
    assert n.created_at == T0 + 123
    assert not n.read
    assert n.read_at is None
    assert not n.acked
    assert n.dedupe_key is None
    assert len(n.id) == 26
    assert await store.get("alice", n.id) == n

    wire = n.to_wire()
    assert set(wire) == WIRE_KEYS
    assert wire["created_at"] == "2023-11-14T22:13:20.123Z"
    assert wire["read"] is False
    assert wire["id"] == n.id


async def test_create_defaults(store: NotificationStore) -> None:
    n = await one(store, now_ms=float(T0) + 0.75)
    assert (n.body, n.priority, n.content_id, n.icon_url, n.action_url) == (
        None,
        "normal",
        None,
        None,
        None,
    )
    assert n.created_at == T0
    stored = await store.get("alice", n.id)
    assert stored == n


async def test_create_without_now_uses_the_clock(store: NotificationStore) -> None:
    before = datetime.now(UTC)
    [(n, _)] = await store.create_many(["alice"], notification_type="t", title="x")
    created = datetime.fromisoformat(str(n.to_wire()["created_at"]).replace("Z", "+00:00"))
    assert before - timedelta(seconds=1) <= created <= datetime.now(UTC) + timedelta(seconds=1)


async def test_dedupe_window_boundary(store: NotificationStore) -> None:
    first = await one(store, content_id="movie-1", now_ms=T0)
    [(again, created)] = await notify(store, content_id="movie-1", now_ms=T0 + 299_999)
    assert not created
    assert again == first
    [(later, created)] = await notify(store, content_id="movie-1", now_ms=T0 + 300_000)
    assert created
    assert later.id != first.id
    # The window now runs from the newest one.
    [(last, created)] = await notify(store, content_id="movie-1", now_ms=T0 + 300_001)
    assert not created
    assert last.id == later.id
    assert [n.id for n in await store.pending("alice")] == [first.id, later.id]


async def test_no_dedupe_without_content_id_or_key(store: NotificationStore) -> None:
    a = await one(store)
    b = await one(store)
    assert a.id != b.id
    assert len(await store.pending("alice")) == 2


async def test_dedupe_scope_is_type_and_content_unless_a_key(store: NotificationStore) -> None:
    movie = await one(store, content_id="m1")
    # Same content, other type: not a duplicate.
    other_type = await one(store, notification_type="playback.resume_reminder", content_id="m1")
    # The publisher's key replaces (type, content_id) entirely.
    keyed = await one(store, content_id="m1", dedupe_key="digest-42")
    assert keyed.dedupe_key == "digest-42"
    [(same_key, created)] = await notify(
        store,
        notification_type="server.backup_complete",
        content_id="other",
        dedupe_key="digest-42",
    )
    assert not created
    assert same_key.id == keyed.id
    # A key that happens to look like a (type, content) pair never matches one.
    await one(store, dedupe_key="content.new_movie\x1fm1")
    assert len({movie.id, other_type.id, keyed.id}) == 3
    assert len(await store.pending("alice")) == 4


async def test_dedupe_window_zero_disables_dedupe(backend: Backend) -> None:
    s = await backend.open(dedupe_window_ms=0)
    await one(s, content_id="m1")
    await one(s, content_id="m1")
    assert len(await s.pending("alice")) == 2


async def test_create_many_for_several_users(store: NotificationStore) -> None:
    alice_first = await one(store, "alice", content_id="m1")
    result = await notify(store, ["bob", "alice", "carol", "bob"], content_id="m1", now_ms=T0 + 10)
    assert [(n.user_id, created) for n, created in result] == [
        ("bob", True),
        ("alice", False),
        ("carol", True),
    ]
    assert result[1][0] == alice_first
    assert len({n.id for n, _ in result}) == 3
    for user in ("alice", "bob", "carol"):
        assert len(await store.pending(user)) == 1
    assert await store.create_many([], notification_type="t", title="x") == []


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"priority": "urgent"}, ValueError),
        ({"notification_type": ""}, ValueError),
        ({"title": None}, ValueError),
        ({"users": "alice"}, TypeError),
        ({"users": [""]}, ValueError),
        ({"users": ["bob", 7]}, ValueError),
        ({"now_ms": -1}, ValueError),
    ],
)
async def test_create_rejects_bad_arguments(
    store: NotificationStore, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    fields: dict[str, Any] = {"notification_type": "t", "title": "x", "now_ms": T0}
    fields.update(kwargs)  # a copy: parametrize shares the dict between backends
    users = fields.pop("users", ["bob"])
    with pytest.raises(error):
        await store.create_many(users, **fields)
    assert await store.pending("bob") == []


async def test_create_many_is_all_or_nothing(
    backend: Backend, store: NotificationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every row gets the same id: the second insert violates the primary key.
    for minter in ("revenge_ws.store.base.new_id", f"{backend.module}.new_id"):
        monkeypatch.setattr(minter, lambda ms: "01J00000000000000000000000", raising=False)
    with pytest.raises(StoreError) as info:
        await notify(store, ["u1", "u2"], dedupe_key="k")
    assert not isinstance(info.value, StoreUnavailable)
    monkeypatch.undo()
    assert await store.pending("u1") == []
    assert await store.pending("u2") == []
    # Nothing of the failed call survives, not even its claim on the dedupe key.
    result = await notify(store, ["u1", "u2"], dedupe_key="k")
    assert [created for _, created in result] == [True, True]


# -- delivery: pending and ack -------------------------------------------------------------


async def test_pending_is_oldest_first_until_acked(store: NotificationStore) -> None:
    c = await one(store, title="c", now_ms=T0 + 2)
    a = await one(store, title="a", now_ms=T0)
    b1 = await one(store, title="b1", now_ms=T0 + 1)
    b2 = await one(store, title="b2", now_ms=T0 + 1)  # same millisecond: creation order
    await one(store, "bob")
    assert [n.title for n in await store.pending("alice")] == ["a", "b1", "b2", "c"]
    assert [n.title for n in await store.pending("alice", limit=2)] == ["a", "b1"]

    assert await store.ack("alice", [b1.id, a.id, "nope", a.id]) == [b1.id, a.id]
    assert [n.id for n in await store.pending("alice")] == [b2.id, c.id]
    # Idempotent: acking again answers the ids again.
    assert await store.ack("alice", [a.id]) == [a.id]
    got = await store.get("alice", a.id)
    assert got is not None
    assert got.acked
    assert not got.read
    assert await store.ack("alice", []) == []
    assert await store.ack("alice", [None, 3]) == []  # type: ignore[list-item]
    with pytest.raises(TypeError):
        await store.ack("alice", a.id)
    with pytest.raises(ValueError, match="limit"):
        await store.pending("alice", limit=0)


async def test_pending_can_leave_out_muted_types(store: NotificationStore) -> None:
    await one(store, notification_type="content.new_movie", now_ms=T0)
    reminder = await one(store, notification_type="playback.resume_reminder", now_ms=T0 + 1)
    muted = await store.pending("alice", exclude_types=["content.new_movie"])
    assert [n.id for n in muted] == [reminder.id]


async def test_pending_of_many_users_in_one_query(store: NotificationStore) -> None:
    """What a reconnect storm reads: each user's oldest unacknowledged notifications, up to
    the limit per user, muted types left out, and an entry for users with none."""
    for i in range(3):
        await one(store, "alice", title=f"a{i}", now_ms=T0 + i)
    await one(store, "bob", notification_type="content.new_movie", now_ms=T0)
    kept = await one(store, "bob", notification_type="playback.resume_reminder", now_ms=T0 + 1)
    await store.set_preferences("bob", {"content.new_movie": False})
    acked = await one(store, "carol", now_ms=T0)
    await store.ack("carol", [acked.id])
    users = ["alice", "bob", "carol", "dave", "alice"]
    got = await store.pending_many(users, limit=2)
    assert {u: [n.title for n in notes] for u, notes in got.items()} == {
        "alice": ["a0", "a1"],
        "bob": [kept.title],
        "carol": [],
        "dave": [],
    }
    assert [n.id for n in got["bob"]] == [kept.id]
    many = [f"u{i}" for i in range(1200)]  # more users than one query takes
    await one(store, "u1199", title="last")
    got = await store.pending_many([*many, "alice"])
    assert len(got) == 1201 and [n.title for n in got["u1199"]] == ["last"]
    assert len(got["alice"]) == 3
    with pytest.raises(ValueError, match="limit"):
        await store.pending_many(["alice"], limit=0)


async def test_many_ids_in_one_ack(store: NotificationStore) -> None:
    created = [await one(store, now_ms=T0 + i) for i in range(3)]
    ids = [n.id for n in created] + [f"01J{i:023d}" for i in range(1200)]
    assert await store.ack("alice", ids) == [n.id for n in created]
    assert await store.pending("alice") == []


async def test_another_users_notifications_are_out_of_reach(store: NotificationStore) -> None:
    secret = await one(store, "alice", title="for alice")
    mine = await one(store, "bob", title="for bob")
    assert await store.ack("bob", [secret.id, mine.id]) == [mine.id]
    assert await store.mark_read("bob", [secret.id]) == []
    assert await store.get("bob", secret.id) is None
    assert await store.read_all("bob", now_ms=T0) == 1
    items, unread = await store.list_notifications("bob")
    assert [n.id for n in items] == [mine.id]
    assert unread == 0
    with pytest.raises(RequestError) as info:
        await store.list_notifications("bob", before=secret.id)
    assert info.value.code is ErrorCode.NOT_FOUND
    # Alice's notification is untouched.
    got = await store.get("alice", secret.id)
    assert got is not None
    assert not got.acked
    assert not got.read
    assert [n.id for n in await store.pending("alice")] == [secret.id]


# -- reading -------------------------------------------------------------------------------


async def test_mark_read_and_read_all(store: NotificationStore) -> None:
    a = await one(store, now_ms=T0)
    b = await one(store, now_ms=T0 + 1)
    c = await one(store, now_ms=T0 + 2)
    assert await store.mark_read("alice", [a.id, "missing"], now_ms=T0 + 100) == [a.id]
    got = await store.get("alice", a.id)
    assert got is not None
    assert got.read
    assert got.read_at == T0 + 100
    assert got.acked  # reading it proves delivery: no redelivery
    assert got.to_wire()["read"] is True
    assert [n.id for n in await store.pending("alice")] == [b.id, c.id]
    # The first read time is kept.
    assert await store.mark_read("alice", [a.id], now_ms=T0 + 999) == [a.id]
    got = await store.get("alice", a.id)
    assert got is not None
    assert got.read_at == T0 + 100
    assert await store.mark_read("alice", []) == []

    _, unread = await store.list_notifications("alice")
    assert unread == 2
    assert await store.read_all("alice", now_ms=T0 + 200) == 2
    assert await store.read_all("alice") == 0
    items, unread = await store.list_notifications("alice", unread_only=True)
    assert (items, unread) == ([], 0)
    got = await store.get("alice", c.id)
    assert got is not None
    assert got.read_at == T0 + 200
    assert await store.pending("alice") == []

    d = await one(store, now_ms=T0 + 300)
    start = time.time() * 1000
    assert await store.mark_read("alice", [d.id]) == [d.id]  # default time: the clock
    got = await store.get("alice", d.id)
    assert got is not None
    assert got.read_at is not None
    assert start - 1 <= got.read_at <= time.time() * 1000 + 1


async def test_list_pages_newest_first_without_gaps(store: NotificationStore) -> None:
    # Three per millisecond, so pages must break ties on the id.
    created = [await one(store, title=str(i), now_ms=T0 + i // 3) for i in range(25)]
    await one(store, "bob", now_ms=T0 + 5)
    expected = [n.id for n in sorted(created, key=lambda n: (n.created_at, n.id), reverse=True)]
    assert expected[:3] == [created[24].id, created[23].id, created[22].id]

    seen: list[str] = []
    before: str | None = None
    while True:
        items, unread = await store.list_notifications("alice", limit=7, before=before)
        assert unread == 25
        if not items:
            break
        assert len(items) <= 7
        seen += [n.id for n in items]
        before = items[-1].id
    assert seen == expected

    everything, _ = await store.list_notifications("alice", limit=200)
    assert [n.id for n in everything] == expected


async def test_list_unread_only_and_count(store: NotificationStore) -> None:
    created = [await one(store, now_ms=T0 + i) for i in range(6)]
    await store.mark_read("alice", [created[1].id, created[4].id], now_ms=T0 + 10)
    items, unread = await store.list_notifications("alice", unread_only=True)
    assert [n.id for n in items] == [created[i].id for i in (5, 3, 2, 0)]
    assert unread == 4
    items, unread = await store.list_notifications(
        "alice", unread_only=True, limit=2, before=created[3].id
    )
    assert [n.id for n in items] == [created[2].id, created[0].id]
    # A read notification is still a valid cursor for an unread-only listing.
    items, _ = await store.list_notifications("alice", unread_only=True, before=created[4].id)
    assert [n.id for n in items] == [created[i].id for i in (3, 2, 0)]
    items, unread = await store.list_notifications("alice", limit=1)
    assert [n.id for n in items] == [created[5].id]
    assert unread == 4


async def test_list_before_a_time(store: NotificationStore) -> None:
    created = [await one(store, now_ms=T0 + i * 1000) for i in range(5)]
    items, _ = await store.list_notifications("alice", before=ms_to_rfc3339(T0 + 3000))
    assert [n.id for n in items] == [created[2].id, created[1].id, created[0].id]
    # Any offset works: the same instant written in another zone.
    items, _ = await store.list_notifications("alice", before="2023-11-14T23:13:22.500+01:00")
    assert [n.id for n in items] == [created[2].id, created[1].id, created[0].id]


@pytest.mark.parametrize(
    ("limit", "before", "code"),
    [
        (0, None, ErrorCode.INVALID_MESSAGE),
        (201, None, ErrorCode.INVALID_MESSAGE),
        (True, None, ErrorCode.INVALID_MESSAGE),
        ("5", None, ErrorCode.INVALID_MESSAGE),
        (10, "yesterday", ErrorCode.INVALID_MESSAGE),
        (10, "2027-01-15T08:00:00", ErrorCode.INVALID_MESSAGE),  # no offset
        (10, "2027-01-15", ErrorCode.INVALID_MESSAGE),
        (10, "01J00000000000000000000000", ErrorCode.NOT_FOUND),
    ],
)
async def test_list_rejects_bad_arguments(
    store: NotificationStore, limit: Any, before: str | None, code: ErrorCode
) -> None:
    with pytest.raises(RequestError) as info:
        await store.list_notifications("alice", limit=limit, before=before)
    assert info.value.code is code


async def test_list_limit_bounds_are_inclusive(store: NotificationStore) -> None:
    await one(store)
    assert len((await store.list_notifications("alice", limit=1))[0]) == 1
    assert len((await store.list_notifications("alice", limit=200))[0]) == 1


# -- preferences ---------------------------------------------------------------------------


async def test_preferences(store: NotificationStore) -> None:
    assert await store.get_preferences("alice") == {}
    await store.set_preferences("alice", {"content.new_movie": False, "server.error": True})
    assert await store.get_preferences("alice") == {
        "content.new_movie": False,
        "server.error": True,
    }
    # Merged, and None goes back to the default.
    await store.set_preferences(
        "alice", {"content.new_movie": True, "user.login_new_device": False, "server.error": None}
    )
    assert await store.get_preferences("alice") == {
        "content.new_movie": True,
        "user.login_new_device": False,
    }
    await store.set_preferences("alice", {})
    assert await store.get_preferences("bob") == {}
    with pytest.raises(ValueError, match="true, false or null"):
        await store.set_preferences("alice", {"x": "yes"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="notification type"):
        await store.set_preferences("alice", {"": False})
    assert len(await store.get_preferences("alice")) == 2


async def test_muted_type_is_still_stored_and_listed(store: NotificationStore) -> None:
    await store.set_preferences("alice", {"content.new_movie": False})
    n = await one(store)
    items, unread = await store.list_notifications("alice")
    assert [i.id for i in items] == [n.id]
    assert unread == 1


# -- retention -----------------------------------------------------------------------------


async def test_cleanup_keeps_critical_for_a_year(store: NotificationStore) -> None:
    now = T0 + 800 * DAY
    old_normal = await one(store, now_ms=now - 91 * DAY)
    young_normal = await one(store, now_ms=now - 89 * DAY)
    exactly_90 = await one(store, priority="low", now_ms=now - 90 * DAY)
    old_critical = await one(store, priority="critical", now_ms=now - 364 * DAY)
    ancient_critical = await one(store, priority="critical", now_ms=now - 366 * DAY)
    ancient_high = await one(store, "bob", priority="high", now_ms=now - 366 * DAY)
    await store.read_all("alice", now_ms=now)

    assert await store.cleanup(now_ms=now) == 3
    items, _ = await store.list_notifications("alice")
    assert {n.id for n in items} == {young_normal.id, exactly_90.id, old_critical.id}
    for gone in (old_normal, ancient_critical):
        assert await store.get("alice", gone.id) is None
    assert await store.get("bob", ancient_high.id) is None
    assert await store.cleanup(now_ms=now) == 0
    # The default clock is the wall clock: what was just created stays.
    fresh = await one(store, now_ms=None)
    await store.cleanup()
    assert await store.get("alice", fresh.id) == fresh


async def test_cleanup_retention_is_configurable(backend: Backend) -> None:
    s = await backend.open(retention_days=1, critical_retention_days=2)
    now = T0 + 10 * DAY
    await one(s, now_ms=now - DAY - 1)
    kept = await one(s, priority="critical", now_ms=now - DAY - 1)
    await one(s, priority="critical", now_ms=now - 2 * DAY - 1)
    assert await s.cleanup(now_ms=now) == 2
    assert [n.id for n in (await s.list_notifications("alice"))[0]] == [kept.id]


async def test_cleanup_then_create_with_an_expired_key(store: NotificationStore) -> None:
    first = await one(store, dedupe_key="k", now_ms=T0)
    await store.cleanup(now_ms=T0 + 400 * DAY)
    assert await store.get("alice", first.id) is None
    again = await one(store, dedupe_key="k", now_ms=T0 + 400 * DAY)
    assert again.id != first.id


# -- the outbox ----------------------------------------------------------------------------


def event(n: int, topic: str = "playback", at: int = T0) -> OutboxEvent:
    return OutboxEvent(f"e{n:04d}", topic, at + n, f'{{"n": {n}}}')


async def test_outbox_claims_oldest_first_and_deletes_delivered(store: NotificationStore) -> None:
    assert await store.outbox_stats("playback") == (0, None)
    await store.outbox_add([event(3), event(1), event(2), event(9, topic="other")])
    assert await store.outbox_stats("playback") == (3, T0 + 1)
    claimed = await store.outbox_claim("playback", 2, 60_000, now_ms=T0 + 10)
    assert claimed == [event(1), event(2)]
    # Held: a second claim gets only what is left.
    assert await store.outbox_claim("playback", 10, 60_000, now_ms=T0 + 11) == [event(3)]
    assert await store.outbox_claim("playback", 10, 60_000, now_ms=T0 + 12) == []
    assert await store.outbox_delete(["e0001", "e0002", "nope"]) == 2
    assert await store.outbox_delete(["e0001"]) == 0
    assert await store.outbox_delete([]) == 0
    # Held events still count: they are not delivered yet.
    assert await store.outbox_stats("playback") == (1, T0 + 3)
    assert await store.outbox_stats("other") == (1, T0 + 9)


async def test_outbox_release_and_lease_end_make_events_claimable_again(
    store: NotificationStore,
) -> None:
    await store.outbox_add([event(1), event(2)])
    assert len(await store.outbox_claim("playback", 10, 1000, now_ms=T0 + 100)) == 2
    await store.outbox_release(["e0001"])
    assert await store.outbox_claim("playback", 10, 1000, now_ms=T0 + 101) == [event(1)]
    # The lease of e0002 (taken at T0 + 100 for 1 s) ends at T0 + 1100.
    assert await store.outbox_claim("playback", 10, 1000, now_ms=T0 + 1099) == []
    assert await store.outbox_claim("playback", 10, 1000, now_ms=T0 + 1100) == [event(2)]
    await store.outbox_release([])  # nothing to do


async def test_outbox_add_is_idempotent_and_atomic(store: NotificationStore) -> None:
    await store.outbox_add([event(1)])
    changed = OutboxEvent("e0001", "playback", T0 + 500, '{"n": "changed"}')
    await store.outbox_add([changed, event(2), event(2)])
    assert await store.outbox_claim("playback", 10, 0, now_ms=T0) == [event(1), event(2)]
    with pytest.raises(ValueError, match="event_id"):
        await store.outbox_add([event(3), OutboxEvent("", "playback", T0, "{}")])
    with pytest.raises(ValueError, match="out of range"):
        await store.outbox_add([OutboxEvent("x", "playback", -1, "{}")])
    assert await store.outbox_stats("playback") == (2, T0 + 1)
    with pytest.raises(ValueError, match="limit"):
        await store.outbox_claim("playback", 0, 1000)
    with pytest.raises(ValueError, match="lease_ms"):
        await store.outbox_claim("playback", 1, -1)


async def test_outbox_many_events_in_one_call(store: NotificationStore) -> None:
    many = [event(n) for n in range(1200)]  # more than one statement's bound parameters
    await store.outbox_add(many)
    claimed = await store.outbox_claim("playback", 1200, 60_000, now_ms=T0 + 2000)
    assert claimed == many
    await store.outbox_release([e.event_id for e in many])
    assert await store.outbox_delete([e.event_id for e in many[:1100]]) == 1100
    assert await store.outbox_claim("playback", 500, 60_000, now_ms=T0 + 2000) == many[1100:]


async def test_outbox_survives_close_and_reopen(backend: Backend) -> None:
    first = await backend.open()
    await first.outbox_add([event(1), event(2)])
    await first.outbox_claim("playback", 1, 1000, now_ms=T0)
    await first.close()
    second = await backend.open()
    assert await second.outbox_stats("playback") == (2, T0 + 1)
    # The claim of the closed store holds until its lease ends.
    assert await second.outbox_claim("playback", 10, 1000, now_ms=T0 + 1) == [event(2)]
    assert await second.outbox_claim("playback", 10, 1000, now_ms=T0 + 1000) == [event(1)]


async def test_concurrent_claims_never_share_an_event(backend: Backend) -> None:
    """Two stores on one database (two hub nodes) claiming at once split the events."""
    a, b = await backend.open(), await backend.open()
    await a.outbox_add([event(n) for n in range(200)])
    claims = await asyncio.gather(
        *(s.outbox_claim("playback", 7, 60_000, now_ms=T0 + 500) for s in [a, b] * 20)
    )
    ids = [e.event_id for claim in claims for e in claim]
    assert len(ids) == len(set(ids)) == 200


async def test_an_older_schema_gains_the_outbox(backend: Backend) -> None:
    s = await backend.open()
    await one(s)
    await s.close()
    # As a version-1 database (before the outbox) looks.
    await backend.execute("DROP TABLE {s}outbox")
    await backend.execute("UPDATE {s}schema_version SET version = 1")
    s = await backend.open()
    assert len(await s.pending("alice")) == 1
    await s.outbox_add([event(1)])
    assert await s.outbox_stats("playback") == (1, T0 + 1)


# -- durability, concurrency, lifecycle ----------------------------------------------------


async def test_everything_survives_close_and_reopen(backend: Backend) -> None:
    first = await backend.open()
    a = await one(first, content_id="m1", now_ms=T0)
    b = await one(first, now_ms=T0 + 1)
    await first.ack("alice", [a.id])
    await first.set_preferences("alice", {"content.new_movie": False})
    await first.close()

    second = await backend.open()
    assert await second.get("alice", a.id) == Notification(**{**_fields(a), "acked": True})
    assert [n.id for n in await second.pending("alice")] == [b.id]
    assert await second.get_preferences("alice") == {"content.new_movie": False}
    # The dedupe window also survives.
    [(dup, created)] = await notify(second, content_id="m1", now_ms=T0 + 1000)
    assert not created
    assert dup.id == a.id


def _fields(n: Notification) -> dict[str, Any]:
    return {f: getattr(n, f) for f in Notification.__dataclass_fields__}


async def test_concurrent_creates_with_one_key_make_one_row(backend: Backend) -> None:
    # Two stores = two connections (two pools for PostgreSQL): the database itself must
    # arbitrate, not a lock inside one store object.
    stores = [await backend.open(), await backend.open()]
    users = ["u1", "u2", "u3", "u4"]

    async def publish(i: int) -> list[tuple[Notification, bool]]:
        order = users if i % 2 else list(reversed(users))  # opposite lock orders
        return await notify(stores[i % 2], order, dedupe_key="scan-done", now_ms=T0 + i)

    results = await asyncio.gather(*(publish(i) for i in range(12)))
    for user in users:
        answers = [(n, created) for result in results for n, created in result if n.user_id == user]
        assert len(answers) == 12
        assert sum(created for _, created in answers) == 1
        assert len({n.id for n, _ in answers}) == 1
        assert len(await stores[0].pending(user)) == 1


async def test_concurrent_calls_on_one_store(store: NotificationStore) -> None:
    results = await asyncio.gather(
        *(notify(store, ["a", "b"], content_id="c1", now_ms=T0 + i) for i in range(8)),
        *(store.pending("a") for _ in range(4)),
        *(store.list_notifications("b") for _ in range(4)),
    )
    creates: list[list[tuple[Notification, bool]]] = results[:8]  # type: ignore[assignment]
    assert sum(created for r in creates for _, created in r) == 2
    assert len(await store.pending("a")) == 1


async def test_lifecycle_and_ping(backend: Backend) -> None:
    s = backend.make()
    with pytest.raises(StoreUnavailable):
        await s.ping()
    with pytest.raises(StoreUnavailable):
        await s.pending("alice")
    await s.start()
    await s.start()  # no-op
    await s.ping()
    await s.close()
    await s.close()  # idempotent
    with pytest.raises(StoreUnavailable):
        await s.ping()
    with pytest.raises(StoreUnavailable):
        await notify(s)
    # A closed store can be started again.
    await s.start()
    await s.ping()
    await s.close()


async def test_unreachable_database_is_unavailable(unreachable_store: NotificationStore) -> None:
    with pytest.raises(StoreUnavailable) as info:
        await unreachable_store.start()
    assert "hunter2" not in str(info.value)
    with pytest.raises(StoreUnavailable):
        await unreachable_store.ping()
    with pytest.raises(StoreUnavailable):
        await unreachable_store.list_notifications("alice")


async def test_write_lock_held_elsewhere_is_unavailable_then_recovers(backend: Backend) -> None:
    s = await backend.open(**backend.fast_fail)
    async with backend.write_locked():
        with pytest.raises(StoreUnavailable):
            await notify(s)
    await s.ping()
    assert len(await notify(s)) == 1
    assert len(await s.pending("alice")) == 1


async def test_schema_is_versioned(backend: Backend) -> None:
    s = await backend.open()
    await one(s)
    await s.close()
    # Reopening an up-to-date schema migrates nothing and keeps the data.
    s = await backend.open()
    assert len(await s.pending("alice")) == 1
    await s.close()
    await backend.execute("UPDATE {s}schema_version SET version = 99")
    newer = backend.make()
    with pytest.raises(StoreError, match="newer") as info:
        await newer.start()
    assert not isinstance(info.value, StoreUnavailable)
    with pytest.raises(StoreUnavailable):
        await newer.ping()


async def test_cancelled_call_leaves_the_store_usable(store: NotificationStore) -> None:
    for _ in range(5):
        task = asyncio.create_task(notify(store, [f"u{i}" for i in range(50)]))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await store.ping()
    n = await one(store, "zed")
    assert await store.get("zed", n.id) == n


# -- backend-specific behaviour ------------------------------------------------------------


@pytest.mark.postgres
async def test_postgres_dropped_connections_are_unavailable_then_recover(
    pg_database: str,
) -> None:
    import asyncpg

    s = PostgresNotificationStore(pg_database, schema="t_dropped", max_size=2)
    await s.start()
    try:
        admin = await asyncpg.connect(pg_database)
        try:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'revenge-ws' AND datname = current_database()"
            )
        finally:
            await admin.close()
        with contextlib.suppress(StoreUnavailable):
            await s.ping()  # the pool may notice the dead socket only when using it
        await s.ping()
    finally:
        await s.close()


@pytest.mark.postgres
async def test_postgres_error_mapping(pg_database: str) -> None:
    import asyncpg

    s = PostgresNotificationStore(pg_database)
    s._asyncpg = asyncpg
    unavailable = [
        ConnectionRefusedError(111, "refused"),
        TimeoutError(),
        asyncpg.exceptions.TooManyConnectionsError("too many"),
        asyncpg.exceptions.AdminShutdownError("shutdown"),
        asyncpg.exceptions.ConnectionDoesNotExistError("gone"),
        asyncpg.exceptions.InterfaceError("pool is closing"),
        asyncpg.exceptions.InternalClientError("cannot switch to state 11"),
    ]
    for exc in unavailable:
        assert isinstance(s._map(exc, "op"), StoreUnavailable), exc
    failed = [
        asyncpg.exceptions.UniqueViolationError("dup"),
        asyncpg.exceptions.InvalidPasswordError("bad password"),
        asyncpg.exceptions._base.DataError("bad value"),
        RuntimeError("other"),
    ]
    for exc in failed:
        mapped = s._map(exc, "op")
        assert type(mapped) is StoreError, exc


async def test_postgres_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="schema"):
        PostgresNotificationStore("postgresql://h/db", schema="Robert'); DROP")
    with pytest.raises(ValueError, match="min_size"):
        PostgresNotificationStore("postgresql://h/db", min_size=5, max_size=2)
    with pytest.raises(ValueError, match="retention"):
        PostgresNotificationStore("postgresql://h/db", retention_days=0)
    with pytest.raises(ValueError, match="dedupe"):
        SQLiteNotificationStore(":memory:", dedupe_window_ms=-1)


async def test_sqlite_uses_wal_and_full_sync(tmp_path: Path) -> None:
    s = SQLiteNotificationStore(tmp_path / "deep" / "dir" / "n.db")
    await s.start()
    try:
        assert "deep" in repr(s)
        await one(s)
    finally:
        await s.close()
    with sqlite3.connect(tmp_path / "deep" / "dir" / "n.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(2,)]
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert {"notifications_pending", "notifications_dedupe", "outbox_oldest"} <= indexes
    conn.close()


async def test_sqlite_directory_that_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    s = SQLiteNotificationStore(tmp_path / "file" / "sub" / "n.db")
    with pytest.raises(StoreUnavailable, match="cannot create"):
        await s.start()


# -- open_store and URLs -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///:memory:", ":memory:"),
        ("sqlite:///revenge-ws.db", "revenge-ws.db"),
        ("sqlite:///data/ws.db", "data/ws.db"),
        ("sqlite:////var/lib/revenge/ws.db", "/var/lib/revenge/ws.db"),
        ("SQLITE:///my%20notes.db", "my notes.db"),
    ],
)
def test_sqlite_urls(url: str, path: str) -> None:
    assert sqlite_path(url) == path
    s = open_store(url)
    assert isinstance(s, SQLiteNotificationStore)
    assert s.path == path


@pytest.mark.parametrize(
    "url",
    ["postgresql://u:hunter2@db:5432/media", "postgres://u:hunter2@db/media?sslmode=require"],
)
def test_postgres_urls(url: str) -> None:
    s = open_store(url, max_size=3, retention_days=30)
    assert isinstance(s, PostgresNotificationStore)
    assert s.retention_days == 30
    assert "hunter2" not in repr(s)


@pytest.mark.parametrize(
    "url",
    [
        "mysql://root:hunter2@db/media",
        "redis://:hunter2@localhost:6379/0",
        "hunter2",
        "",
        "sqlite://relative.db",
        "sqlite:///",
        "sqlite:///ws.db?mode=ro&password=hunter2",
    ],
)
def test_bad_store_urls(url: str) -> None:
    with pytest.raises(ConfigError, match="REVENGE_STORE_URL") as info:
        open_store(url)
    assert "hunter2" not in str(info.value) or url == "hunter2"


async def test_open_store_memory_end_to_end() -> None:
    s = open_store("sqlite:///:memory:", retention_days=7)
    await s.start()
    try:
        await one(s)
        assert len(await s.pending("alice")) == 1
    finally:
        await s.close()


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("postgresql://u:hunter2@db:5432/x", "postgresql://u:***@db:5432/x"),
        ("postgresql://u@db/x", "postgresql://u@db/x"),
        ("redis://:hunter2@cache:6379/0", "redis://:***@cache:6379/0"),
        ("postgresql://u:p@ss/w0rd@db/x", "postgresql://u:***@db/x"),
        ("postgresql://u:a@h1:5432,h2:5433/x", "postgresql://u:***@h1:5432,h2:5433/x"),
        (
            "postgresql://db/x?user=u&password=hunter2&sslmode=require",
            "postgresql://db/x?user=u&password=***&sslmode=require",
        ),
        ("postgresql://db/x?sslpassword=hunter2", "postgresql://db/x?sslpassword=***"),
        ("host=db user=u password=hunter2 dbname=x", "host=db user=u password=*** dbname=x"),
        ("host=db password='hun ter2'", "host=db password=***"),
        ("https://example.com/a?token=abc#frag", "https://example.com/a?token=***#frag"),
        ("sqlite:///var/lib/ws.db", "sqlite:///var/lib/ws.db"),
        ("", ""),
    ],
)
def test_redact_url(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


# -- ids and times -------------------------------------------------------------------------


def test_ids_sort_in_creation_order() -> None:
    same_ms = [new_id(T0) for _ in range(100)]
    assert same_ms == sorted(same_ms)
    assert len(set(same_ms)) == 100
    assert new_id(T0 - 1) < new_id(T0) < new_id(T0 + 1)
    with pytest.raises(ValueError, match="out of range"):
        new_id(-1)


def test_rfc3339_round_trip() -> None:
    assert ms_to_rfc3339(T0 + 7) == "2023-11-14T22:13:20.007Z"
    assert parse_rfc3339("2023-11-14T22:13:20.007Z") == T0 + 7
    assert parse_rfc3339("2023-11-14t23:13:20+01:00") == T0
    for bad in ("2027-01-15", "2027-01-15T08:00:00", "2027-13-45T08:00:00Z", "soon"):
        with pytest.raises(ValueError, match=r"RFC 3339|month|day|range"):
            parse_rfc3339(bad)


def test_wire_format_is_exactly_the_contract() -> None:
    n = Notification(
        id=new_id(T0),
        user_id="alice",
        notification_type="server.error",
        title="Disk failing",
        body=None,
        priority="critical",
        content_id=None,
        icon_url=None,
        action_url="/admin/storage",
        created_at=T0,
        read=True,
        read_at=T0 + 5,
        acked=True,
        dedupe_key="disk-1",
    )
    assert n.to_wire() == {
        "id": n.id,
        "notification_type": "server.error",
        "title": "Disk failing",
        "body": None,
        "priority": "critical",
        "content_id": None,
        "icon_url": None,
        "action_url": "/admin/storage",
        "created_at": "2023-11-14T22:13:20.000Z",
        "read": True,
    }


def test_dedupe_window_default_is_five_minutes() -> None:
    assert DEFAULT_DEDUPE_WINDOW_MS == 300_000
    assert isinstance(open_store("sqlite:///:memory:"), NotificationStore)
