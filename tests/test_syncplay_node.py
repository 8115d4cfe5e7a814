"""SyncPlay on a real hub: WebSocket requests, the playback endpoint, REST, timeouts."""

from __future__ import annotations

from typing import Any

from .helpers import WS, Hub
from .test_ws import upgrade


async def next_of(ws: WS, mtype: str, timeout: float = 5.0) -> dict[str, Any]:
    for _ in range(100):
        msg = await ws.recv(timeout)
        if msg["type"] == mtype:
            return msg
    raise AssertionError(f"no {mtype}")


CONTENT = {"type": "movie", "id": "m1"}


async def create(ws: WS, **extra: Any) -> dict[str, Any]:
    ack = await ws.request(
        "syncplay.create", {"name": "Movie night", "content": CONTENT, "public": True, **extra}
    )
    assert ack["type"] == "ack", ack
    return ack["data"]["room"]


async def test_create_join_play_sync(hub: Hub) -> None:
    leader = await hub.connect("alice", name="Alice")
    guest = await hub.connect("bob", name="Bob")
    room = await create(leader)
    assert room["leader_id"] == "alice" and room["member_count"] == 1
    rid = room["room_id"]
    joined = await guest.request("syncplay.join", {"room_id": rid})
    assert joined["type"] == "ack" and {m["user_id"] for m in joined["data"]["members"]} == {
        "alice",
        "bob",
    }
    assert (await next_of(leader, "syncplay.member_joined"))["data"]["user_id"] == "bob"
    for ws in (leader, guest):
        await ws.request("syncplay.ready", {"room_id": rid, "position": 0.0})
    ack = await leader.request("syncplay.play", {"room_id": rid})
    assert ack["type"] == "ack"
    cmds = [await next_of(ws, "syncplay.command") for ws in (leader, guest)]
    assert cmds[0]["data"] == cmds[1]["data"]
    cmd = cmds[0]["data"]
    assert cmd["command"] == "play" and cmd["when"] > 0 and cmd["command_seq"] >= 1
    assert cmds[0]["channel"] == f"playback:{rid}" and cmds[1]["seq"] == cmds[0]["seq"]
    ack = await guest.request("syncplay.seek", {"room_id": rid, "position": 42.0})
    seek = (await next_of(leader, "syncplay.command"))["data"]
    assert (
        seek["command"] == "seek"
        and seek["position"] == 42.0
        and seek["command_seq"] > cmd["command_seq"]
    )
    # Chat, limits and the REST views.
    chat = await guest.request("syncplay.chat", {"room_id": rid, "message": "hi"})
    assert chat["type"] == "ack"
    assert (await next_of(leader, "syncplay.chat"))["data"]["message"] == "hi"
    too_long = await guest.request("syncplay.chat", {"room_id": rid, "message": "x" * 1001})
    assert too_long["data"]["code"] == "INVALID_MESSAGE"
    tok = {"Authorization": f"Bearer {hub.token('bob')}"}
    status, rooms = await hub.request("GET", "/api/v1/syncplay/rooms", headers=tok)
    assert status == 200 and [r["room_id"] for r in rooms["rooms"]] == [rid]
    status, parts = await hub.request(
        "GET", f"/api/v1/syncplay/rooms/{rid}/participants", headers=tok
    )
    assert status == 200 and len(parts["members"]) == 2
    status, hist = await hub.request("GET", f"/api/v1/syncplay/rooms/{rid}/chat", headers=tok)
    assert status == 200 and hist["messages"][-1]["message"] == "hi"
    status, one = await hub.request("GET", f"/api/v1/syncplay/rooms/{rid}", headers=tok)
    assert (
        status == 200
        and one["room"]["room_id"] == rid
        and one["state"]["state"] in ("playing", "waiting")
    )


async def test_refusals(hub: Hub) -> None:
    a = await hub.connect("alice")
    b = await hub.connect("bob")
    c = await hub.connect("carol")
    room = await create(a, public=False, password="s3cret", max_participants=2)
    rid = room["room_id"]
    assert room["has_password"] is True
    assert (await b.request("syncplay.join", {"room_id": rid}))["data"]["code"] == "FORBIDDEN"
    assert (await b.request("syncplay.join", {"room_id": rid, "password": "nope"}))["data"][
        "code"
    ] == "FORBIDDEN"
    assert (await b.request("syncplay.join", {"room_id": "nope"}))["data"]["code"] == "NOT_FOUND"
    assert (await b.request("syncplay.join", {"room_id": rid, "password": "s3cret"}))[
        "type"
    ] == "ack"
    assert (await c.request("syncplay.join", {"room_id": rid, "password": "s3cret"}))["data"][
        "code"
    ] == "CONFLICT"
    # Not a member: may not subscribe to the room's channel, may not control it.
    ack = await c.request("subscribe", {"channels": [f"playback:{rid}"]})
    assert ack["data"]["errors"][0]["code"] == "FORBIDDEN"
    assert (await c.request("syncplay.play", {"room_id": rid}))["data"]["code"] in (
        "FORBIDDEN",
        "NOT_FOUND",
    )
    assert (await c.request("syncplay.seek", {"room_id": rid}))["data"]["code"] == "INVALID_MESSAGE"
    # Invitation admits without the password (and the code lookup works over REST).
    code = (await a.request("syncplay.invite", {"room_id": rid}))["data"]["code"]
    assert len(code) == 8
    status, inv = await hub.request(
        "GET",
        f"/api/v1/syncplay/invitations/{code}",
        headers={"Authorization": f"Bearer {hub.token('carol')}"},
    )
    assert status == 200 and inv["room"]["room_id"] == rid
    await b.request("syncplay.leave", {"room_id": rid})
    assert (await c.request("syncplay.join", {"invite_code": code}))["type"] == "ack"
    # leader_only: members cannot control.
    upd = await a.request("syncplay.update", {"room_id": rid, "control_mode": "leader_only"})
    assert upd["type"] == "ack"
    assert (await c.request("syncplay.pause", {"room_id": rid}))["data"]["code"] == "FORBIDDEN"


async def test_one_room_per_connection_and_disconnect(hub: Hub) -> None:
    a = await hub.connect("alice")
    b = await hub.connect("bob")
    r1 = (await create(a))["room_id"]
    r2 = (await create(b))["room_id"]
    await a.request("syncplay.join", {"room_id": r2})
    status, _body = await hub.request(
        "GET",
        f"/api/v1/syncplay/rooms/{r1}",
        headers={"Authorization": f"Bearer {hub.token('zed')}"},
    )
    assert status == 404  # alice left r1 by joining r2; empty rooms end
    await a.close()
    upd = await next_of(b, "syncplay.member_updated")
    assert upd["data"]["user_id"] == "alice"


async def test_playback_endpoint(hub: Hub) -> None:
    a = await hub.connect("alice")
    rid = (await create(a, password="pw"))["room_id"]
    assert (await upgrade(hub, f"/api/v1/ws/playback/nope?token={hub.token('bob')}"))[0] == 404
    assert (await upgrade(hub, f"/api/v1/ws/playback/{rid}?token={hub.token('bob')}"))[0] == 403
    bob = await hub.connect("bob", path=f"/api/v1/ws/playback/{rid}?password=pw&x=1")
    joined = await next_of(bob, "syncplay.joined")
    assert joined["data"]["room"]["room_id"] == rid
    assert (await next_of(a, "syncplay.member_joined"))["data"]["user_id"] == "bob"


async def test_rest_room_lifecycle(hub: Hub) -> None:
    tok = {"Authorization": f"Bearer {hub.token('alice')}"}
    status, made = await hub.request(
        "POST",
        "/api/v1/syncplay/rooms",
        headers=tok,
        json={"name": "R", "content": CONTENT, "public": True},
    )
    assert status == 200, made
    rid = made["room"]["room_id"]
    btok = {"Authorization": f"Bearer {hub.token('bob')}"}
    assert (await hub.request("POST", f"/api/v1/syncplay/rooms/{rid}/join", headers=btok, json={}))[
        0
    ] == 200
    status, inv = await hub.request(
        "POST", f"/api/v1/syncplay/rooms/{rid}/invitations", headers=tok, json={}
    )
    assert status == 200 and len(inv["code"]) == 8
    status, upd = await hub.request(
        "PUT", f"/api/v1/syncplay/rooms/{rid}", headers=btok, json={"name": "x"}
    )
    assert status == 403 and upd["error"]["code"] == "FORBIDDEN"
    assert (
        await hub.request(
            "POST", f"/api/v1/syncplay/rooms/{rid}/chat", headers=btok, json={"message": "yo"}
        )
    )[0] == 200
    assert (await hub.request("POST", f"/api/v1/syncplay/rooms/{rid}/leave", headers=btok))[
        0
    ] == 200
    assert (await hub.request("DELETE", f"/api/v1/syncplay/rooms/{rid}", headers=tok))[0] == 200
    assert (await hub.request("GET", f"/api/v1/syncplay/rooms/{rid}", headers=tok))[0] == 404
    status, err = await hub.request("POST", "/api/v1/syncplay/rooms", headers=tok, data=b"{bad")
    assert status == 400 and err["error"]["code"] == "INVALID_JSON"
    assert (await hub.request("GET", "/api/v1/syncplay/rooms", headers={}))[0] == 401


async def test_buffering_timeout_unfreezes(hub_with: Any) -> None:
    async with hub_with(
        {"REVENGE_SYNCPLAY_BUFFERING_TIMEOUT_FIRST": "1", "REVENGE_SYNCPLAY_BUFFERING_TIMEOUT": "1"}
    ) as hub:
        a = await hub.connect("alice")
        b = await hub.connect("bob")
        rid = (await create(a))["room_id"]
        await b.request("syncplay.join", {"room_id": rid})
        await a.request("syncplay.ready", {"room_id": rid, "position": 0})
        await a.request("syncplay.play", {"room_id": rid})
        state = await next_of(a, "syncplay.state")
        assert state["data"]["state"] == "waiting" and state["data"]["waiting_on"] == ["bob"]
        # bob never reports ready: after the timeout everyone is told and the room plays.
        timeout = await next_of(a, "syncplay.wait_timeout", timeout=8)
        assert timeout["data"]["user_ids"] == ["bob"]
        cmd = await next_of(a, "syncplay.command", timeout=5)
        assert cmd["data"]["command"] == "play"


async def test_user_watching_for_public_rooms(hub: Hub) -> None:
    w = await hub.connect("watcher")
    await w.request("subscribe", {"channels": ["activity"]})
    a = await hub.connect("alice")
    rid = (await create(a))["room_id"]
    for _ in range(10):
        msg = await next_of(w, "activity.user_watching")
        if msg["data"]["user_id"] == "alice":
            break
    assert msg["data"]["room_id"] == rid and msg["data"]["content"] == CONTENT


async def test_refused_join_keeps_the_room_and_leaving_ends_the_subscription(hub: Hub) -> None:
    a = await hub.connect("alice")
    b = await hub.connect("bob")
    mine = (await create(a))["room_id"]
    locked = (await create(b, password="pw"))["room_id"]
    refused = await a.request("syncplay.join", {"room_id": locked, "password": "wrong"})
    assert refused["data"]["code"] == "FORBIDDEN"
    # Still in its own room: it still controls it.
    assert (await a.request("syncplay.pause", {"room_id": mine}))["type"] == "ack"
    await b.request("syncplay.invite", {"room_id": locked})
    c = await hub.connect("carol")
    await c.request("syncplay.join", {"room_id": mine})
    left = await c.request("syncplay.leave", {"room_id": mine})
    assert left["type"] == "ack"
    member_left = await next_of(c, "syncplay.member_left")
    assert member_left["data"]["user_id"] == "carol"
    ended = await next_of(c, "subscription.ended")
    assert ended["data"] == {"channel": f"playback:{mine}", "reason": "left"}
