"""The media server's live channels end to end: notifications (SQLite and PostgreSQL),
transcoding, library coalescing, user data debounce, activity."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from .helpers import Hub, make_settings, running_hub, start_hub_process


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hub.db'}"
    dsn: str = request.getfixturevalue("pg_database")
    return dsn


@pytest.fixture
async def shub(store_url: str) -> AsyncIterator[Hub]:
    settings = make_settings(
        {
            "REVENGE_STORE_URL": store_url,
            "REVENGE_CHANNELS_LIBRARY_COALESCE_WINDOW": "0.3",
            "REVENGE_CHANNELS_USER_DATA_DEBOUNCE": "0.2",
        }
    )
    async with running_hub(settings) as hub:
        yield hub


def uid() -> str:
    return "u" + uuid.uuid4().hex[:10]


async def notify(hub: Hub, **body: Any) -> tuple[int, Any]:
    return await hub.request("POST", "/api/v1/realtime/notify", json=body)


async def next_of(ws: Any, mtype: str, timeout: float = 5.0) -> dict[str, Any]:
    for _ in range(50):
        msg: dict[str, Any] = await ws.recv(timeout)
        if msg["type"] == mtype:
            return msg
    raise AssertionError(f"no {mtype}")


async def test_notification_push_ack_and_redelivery(shub: Hub) -> None:
    user = uid()
    ws = await shub.connect(user)
    status, body = await notify(
        shub, user_id=user, notification_type="content.new_movie", title="Dune", content_id="m1"
    )
    assert status == 200 and len(body["ids"]) == 1 and body["pushed"] == 1
    msg = await next_of(ws, "notification")
    assert msg["channel"] == f"notifications:{user}" and msg["data"]["id"] == body["ids"][0]
    assert msg["data"]["title"] == "Dune" and msg["data"]["read"] is False
    # De-duplicated within 5 minutes on (type, content_id): stored once, pushed once.
    status, again = await notify(
        shub, user_id=user, notification_type="content.new_movie", title="Dune", content_id="m1"
    )
    assert again["ids"] == body["ids"] and again["created"] == [] and again["pushed"] == 0
    # Not acked: a reconnect redelivers it.
    await ws.close()
    ws2 = await shub.connect(user)
    redelivered = await next_of(ws2, "notification")
    assert redelivered["data"]["id"] == body["ids"][0] and "seq" not in redelivered
    ack = await ws2.request("notification.ack", {"ids": body["ids"]})
    assert ack["data"] == {"ids": body["ids"]}
    await ws2.close()
    ws3 = await shub.connect(user)
    pong = await ws3.request("ping", {"t0": 0})
    assert pong["type"] == "pong"  # nothing redelivered before the pong


async def test_notification_isolation_list_read(shub: Hub) -> None:
    alice, bob = uid(), uid()
    _, a = await notify(
        shub, user_id=alice, notification_type="server.storage_warning", title="t1", priority="high"
    )
    _, b = await notify(
        shub, user_ids=[alice, bob], notification_type="content.new_episode", title="t2"
    )
    ws = await shub.connect(bob)
    err = await ws.request("notification.ack", {"ids": a["ids"]})
    assert err["data"]["code"] == "NOT_FOUND"
    err = await ws.request("notification.read", {"ids": a["ids"]})
    assert err["data"]["code"] == "NOT_FOUND"
    listing = await ws.request("notification.list", {})
    assert [i["id"] for i in listing["data"]["items"]] == [b["ids"][1]]
    assert listing["data"]["unread_count"] == 1
    wa = await shub.connect(alice)
    listing = await wa.request("notification.list", {"unread_only": True, "limit": 1})
    assert len(listing["data"]["items"]) == 1 and listing["data"]["unread_count"] == 2
    assert (await wa.request("notification.read", {"ids": [a["ids"][0]]}))["type"] == "ack"
    assert (await wa.request("notification.read_all"))["data"]["count"] == 1
    bad = await wa.request("notification.list", {"limit": "x"})
    assert bad["data"]["code"] == "INVALID_MESSAGE"
    bad = await wa.request("notification.ack", {"ids": []})
    assert bad["data"]["code"] == "INVALID_MESSAGE"


async def test_notification_rest_and_preferences(shub: Hub) -> None:
    user = uid()
    tok = {"Authorization": f"Bearer {shub.token(user)}"}
    _, n = await notify(
        shub, user_id=user, notification_type="playback.resume_reminder", title="Resume?"
    )
    status, page = await shub.request(
        "GET", "/api/v1/notifications?unread=true&limit=10", headers=tok
    )
    assert status == 200 and page["unread_count"] == 1
    status, one = await shub.request(
        "PATCH", f"/api/v1/notifications/{n['ids'][0]}/read", headers=tok
    )
    assert status == 200 and one["read"] is True
    status, err = await shub.request("PATCH", "/api/v1/notifications/nope/read", headers=tok)
    assert status == 404 and err["error"]["code"] == "NOT_FOUND"
    status, _ = await shub.request("POST", "/api/v1/notifications/read-all", headers=tok)
    assert status == 200
    assert (await shub.request("GET", "/api/v1/notifications", headers={}))[0] == 401
    # Mute a type in-app: still stored and listed, not pushed.
    status, prefs = await shub.request(
        "PUT",
        "/api/v1/notifications/preferences",
        headers=tok,
        json={"preferences": {"content.new_album": False}},
    )
    assert status == 200 and prefs["preferences"] == {"content.new_album": False}
    ws = await shub.connect(user)
    _, muted = await notify(
        shub, user_id=user, notification_type="content.new_album", title="muted"
    )
    assert muted["pushed"] == 0
    _, loud = await notify(shub, user_id=user, notification_type="content.new_movie", title="loud")
    msg = await next_of(ws, "notification")
    assert msg["data"]["id"] == loud["ids"][0]
    got = await ws.request("notification.preferences", {"preferences": {"content.new_album": None}})
    assert got["data"]["preferences"] == {}


async def test_notify_validation(shub: Hub) -> None:
    for body in [
        {"notification_type": "x", "title": "t"},
        {"user_id": "a", "user_ids": ["b"], "notification_type": "x", "title": "t"},
        {"user_id": "a", "notification_type": "x", "title": "t", "priority": "urgent"},
        {"user_id": "a", "notification_type": "", "title": "t"},
    ]:
        status, err = await notify(shub, **body)
        assert (status, err["error"]["code"]) == (400, "INVALID_MESSAGE"), body


def test_notifications_survive_a_restart(tmp_path: Path) -> None:
    """A real process with a SQLite file: notifications not yet acknowledged come back."""
    import aiohttp

    db = tmp_path / "hub.db"
    env = {"REVENGE_STORE_URL": f"sqlite:///{db}"}
    hp = start_hub_process(env)
    port = hp.port
    settings = make_settings()
    from revenge_ws.auth import mint_token

    token = mint_token(settings.jwt, "carol")

    async def send() -> list[str]:
        async with aiohttp.ClientSession() as s:
            ids = []
            for i in range(20):
                async with s.post(
                    f"{hp.url}/api/v1/realtime/notify",
                    headers={"Authorization": "Bearer test-api-key-0123456789"},
                    json={
                        "user_id": "carol",
                        "notification_type": "content.new_movie",
                        "title": f"m{i}",
                    },
                ) as r:
                    ids += (await r.json())["ids"]
            return ids

    async def receive(url: str) -> list[str]:
        async with (
            aiohttp.ClientSession() as s,
            s.ws_connect(f"{url}/api/v1/ws?token={token}") as ws,
        ):
            got = []
            for _ in range(40):
                msg = await ws.receive_json(timeout=5)
                if msg["type"] == "notification":
                    got.append(msg["data"]["id"])
                    if len(got) == 20:
                        break
            return got

    try:
        ids = asyncio.run(send())
    finally:
        assert hp.stop() == 0
    hp2 = start_hub_process(env, port=port)
    try:
        assert asyncio.run(receive(hp2.url)) == ids
    finally:
        assert hp2.stop() == 0


async def test_transcode_owner_autosubscribe_latest_and_end(hub_with: Any) -> None:
    async with hub_with({"REVENGE_CHANNELS_TRANSCODE_RETENTION": "0.3"}) as hub:
        owner = await hub.connect("alice")
        other = await hub.connect("bob")
        event = {
            "user_id": "alice",
            "type": "transcode.progress",
            "data": {"progress": 10.0, "status": "encoding"},
        }
        status, body = await hub.request("POST", "/api/v1/realtime/transcode/j1", json=event)
        assert status == 200 and body["seq"] == 1
        added = await next_of(owner, "subscription.added")
        assert added["data"]["channel"] == "transcode:j1"
        first = await next_of(owner, "transcode.progress")
        assert first["data"] == {"job_id": "j1", "progress": 10.0, "status": "encoding"}
        # Another user may not subscribe; a second owner is a conflict.
        ack = await other.request("subscribe", {"channels": ["transcode:j1"]})
        assert ack["data"]["errors"][0]["code"] == "FORBIDDEN"
        status, err = await hub.request(
            "POST", "/api/v1/realtime/transcode/j1", json={**event, "user_id": "bob"}
        )
        assert (status, err["error"]["code"]) == (409, "CONFLICT")
        # A late subscriber (another device of the owner) gets the latest value in its ack.
        await hub.request(
            "POST", "/api/v1/realtime/transcode/j1", json={**event, "data": {"progress": 55.5}}
        )
        late = await hub.connect("alice")
        ack = await late.request("subscribe", {"channels": ["transcode:j1"]})
        assert ack["data"]["subscriptions"][0]["latest"]["data"]["progress"] == 55.5
        status, _ = await hub.request(
            "POST",
            "/api/v1/realtime/transcode/j1",
            json={**event, "type": "transcode.complete", "data": {}},
        )
        assert status == 200
        assert (await next_of(late, "transcode.complete"))["seq"] == 3
        ended = await next_of(late, "subscription.ended", timeout=5)
        assert ended["data"]["channel"] == "transcode:j1"
        status, err = await hub.request(
            "POST", "/api/v1/realtime/transcode/j1", json={**event, "type": "transcode.bogus"}
        )
        assert status == 400


async def test_transcode_endpoint_for_the_owner(hub: Hub) -> None:
    await hub.request(
        "POST",
        "/api/v1/realtime/transcode/j9",
        json={"user_id": "alice", "type": "transcode.progress", "data": {"progress": 1}},
    )
    ws = await hub.connect("alice", path="/api/v1/ws/transcode/j9")
    subs = {s["channel"]: s for s in ws.welcome["data"]["subscriptions"]}
    assert subs["transcode:j9"]["latest"]["data"]["progress"] == 1


async def test_library_coalescing(shub: Hub) -> None:
    ws = await shub.connect(uid(), libraries=["lib1"])
    await ws.request("subscribe", {"channels": ["library:lib1"]})
    events = [
        {"kind": "added", "item_id": "a"},
        {"kind": "added", "item_id": "b"},
        {"kind": "updated", "item_id": "a"},
        {"kind": "updated", "item_id": "c"},
        {"kind": "removed", "item_id": "b"},
        {"kind": "removed", "item_id": "d"},
        {"kind": "updated", "item_id": "d"},
    ]
    for e in events:
        status, _ = await shub.request(
            "POST", "/api/v1/realtime/library/lib1/events", json={"events": [e]}
        )
        assert status == 200
    msg = await next_of(ws, "library.changed")
    assert msg["data"] == {"library_id": "lib1", "added": ["a"], "updated": ["c"], "removed": ["d"]}
    status, _ = await shub.request(
        "POST", "/api/v1/realtime/library/lib1/events", json={"events": []}
    )
    assert status == 400


async def test_user_data_debounce(shub: Hub) -> None:
    user = uid()
    ws = await shub.connect(user)
    for items in (["i1"], ["i2", "i1"], ["i3"]):
        status, _ = await shub.request(
            "POST", f"/api/v1/realtime/user/{user}/data_changed", json={"item_ids": items}
        )
        assert status == 200
    msg = await next_of(ws, "user.data_changed")
    assert msg["data"] == {"user_id": user, "item_ids": ["i1", "i2", "i3"]}
    assert (await ws.request("ping", {"t0": 0}))["type"] == "pong"


async def test_shutdown_tells_admins_and_flushes_batches(hub_with: Any) -> None:
    async with hub_with({"REVENGE_CHANNELS_LIBRARY_COALESCE_WINDOW": "60"}) as hub:
        admin = await hub.connect("root", role="admin")
        await admin.request("subscribe", {"channels": ["library:l9"]})
        status, _ = await hub.request(
            "POST",
            "/api/v1/realtime/library/l9/events",
            json={"events": [{"kind": "added", "item_id": "x"}]},
        )
        assert status == 200
        hub.stop.set()
        seen: list[str] = []
        for _ in range(10):
            msg = await admin.ws.receive(timeout=10)
            if msg.type.name != "TEXT":
                break
            seen.append(msg.json()["type"])
        assert "library.changed" in seen and "server.shutdown" in seen
        assert admin.ws.close_code == 1012
