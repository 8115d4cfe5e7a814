"""Devices, now playing and remote control (contract v1.1 §13) on one real hub: raw
WebSocket clients on 127.0.0.1 speak the wire as a black-box client would."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from .helpers import WS, Hub

TV = {
    "device_id": "tv-1",
    "name": "Living room TV",
    "client": "revenge-tv",
    "version": "1.2",
    "capabilities": {"remote_control": True, "commands": ["pause", "unpause", "seek", "x-zoom"]},
}
PHONE = {"device_id": "phone-1", "name": "Phone", "client": "revenge-mobile", "version": "3"}
MOVIE = {"item_id": "m1", "title": "Heat", "state": "playing", "position": 12.5, "duration": 6000}


async def ack(ws: WS, mtype: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    reply = await ws.request(mtype, data)
    assert reply["type"] == "ack", reply
    return dict(reply["data"])


async def err(ws: WS, mtype: str, data: dict[str, Any] | None = None) -> str:
    reply = await ws.request(mtype, data)
    assert reply["type"] == "error", reply
    return str(reply["data"]["code"])


async def tv_and_phone(hub: Hub, user: str = "alice") -> tuple[WS, WS]:
    tv = await hub.connect(user)
    phone = await hub.connect(user)
    await ack(tv, "device.hello", TV)
    await ack(phone, "device.hello", PHONE)
    return tv, phone


async def test_hello_is_acked_with_the_device_and_listed(hub: Hub) -> None:
    tv = await hub.connect("alice")
    got = await ack(tv, "device.hello", TV)
    device = got["device"]
    assert device["device_id"] == "tv-1" and device["user_id"] == "alice"
    assert device["capabilities"]["commands"] == TV["capabilities"]["commands"]  # type: ignore[index]
    assert device["now_playing"] is None
    assert isinstance(device["connected_at"], int) and "session_id" not in device
    listed = await ack(tv, "devices.list")
    assert [d["device_id"] for d in listed["devices"]] == ["tv-1"]


@pytest.mark.parametrize(
    "data",
    [
        {},
        {**TV, "device_id": ""},
        {**TV, "device_id": "x" * 129},
        {**TV, "name": 5},
        {**TV, "capabilities": {"commands": "pause"}},
    ],
)
async def test_a_bad_hello_is_invalid_message(hub: Hub, data: dict[str, Any]) -> None:
    ws = await hub.connect("alice")
    assert await err(ws, "device.hello", data) == "INVALID_MESSAGE"


async def test_playback_update_reaches_the_users_other_connections(hub: Hub) -> None:
    tv, phone = await tv_and_phone(hub)
    assert await ack(tv, "playback.update", MOVIE) == {}
    while True:
        msg = await phone.recv_type("device.updated")
        device = msg["data"]["device"]
        if device["device_id"] == "tv-1" and device["now_playing"]:
            break
    assert msg["channel"] == "user:alice" and isinstance(msg["seq"], int)
    playing = device["now_playing"]
    assert playing["item_id"] == "m1" and playing["state"] == "playing"
    assert playing["position"] == 12.5 and playing["rate"] == 1.0
    # stopped clears now_playing
    await ack(tv, "playback.update", {**MOVIE, "state": "stopped"})
    while True:
        device = (await phone.recv_type("device.updated"))["data"]["device"]
        if device["device_id"] == "tv-1" and device["now_playing"] is None:
            break


async def test_device_updates_are_coalesced_to_the_newest_state(hub: Hub) -> None:
    tv, phone = await tv_and_phone(hub)
    for i in range(20):
        await ack(tv, "playback.update", {**MOVIE, "position": float(i)})
    positions = []
    while True:
        device = (await phone.recv_type("device.updated"))["data"]["device"]
        if device["device_id"] == "tv-1" and device["now_playing"]:
            positions.append(device["now_playing"]["position"])
            if positions[-1] == 19.0:
                break
    assert len(positions) < 20  # coalesced, and the last one is the newest state


async def test_playback_update_needs_a_hello_and_valid_fields(hub: Hub) -> None:
    ws = await hub.connect("alice")
    assert await err(ws, "playback.update", MOVIE) == "CONFLICT"
    await ack(ws, "device.hello", TV)
    for bad in (
        {**MOVIE, "state": "dancing"},
        {**MOVIE, "position": -1},
        {**MOVIE, "volume": 101},
        {k: v for k, v in MOVIE.items() if k != "item_id"},
        {**MOVIE, "rate": 9},
    ):
        assert await err(ws, "playback.update", bad) == "INVALID_MESSAGE"


async def test_the_newest_hello_takes_the_device_over(hub: Hub) -> None:
    old = await hub.connect("alice")
    new = await hub.connect("alice")
    await ack(old, "device.hello", TV)
    await ack(new, "device.hello", TV)
    ended = await old.recv_type("device.ended")
    assert ended["data"] == {"device_id": "tv-1", "reason": "replaced"}
    assert await err(old, "playback.update", MOVIE) == "CONFLICT"
    listed = (await ack(new, "devices.list"))["devices"]
    assert len(listed) == 1
    # closing the old connection does not remove the device the new one holds
    await old.close()
    await asyncio.sleep(0.2)
    assert len((await ack(new, "devices.list"))["devices"]) == 1


async def test_a_device_ends_with_its_connection(hub: Hub) -> None:
    tv, phone = await tv_and_phone(hub)
    await tv.close()
    removed = await phone.recv_type("device.removed")
    assert removed["data"] == {"device_id": "tv-1"} and removed["channel"] == "user:alice"
    assert [d["device_id"] for d in (await ack(phone, "devices.list"))["devices"]] == ["phone-1"]


async def test_a_second_hello_with_another_id_ends_the_first_device(hub: Hub) -> None:
    ws = await hub.connect("alice")
    watcher = await hub.connect("alice")
    await ack(ws, "device.hello", TV)
    await ack(ws, "device.hello", {**TV, "device_id": "tv-2"})
    removed = await watcher.recv_type("device.removed")
    assert removed["data"] == {"device_id": "tv-1"}
    assert [d["device_id"] for d in (await ack(ws, "devices.list"))["devices"]] == ["tv-2"]


# -- remote control ----------------------------------------------------------------------------
async def answer(tv: WS, *, ok: bool = True, **extra: Any) -> dict[str, Any]:
    """Read the next remote.command on ``tv`` and answer it."""
    cmd = await tv.recv_type("remote.command")
    result = {"command_id": cmd["data"]["command_id"], "ok": ok, **extra}
    assert await ack(tv, "remote.result", result) == {}
    return dict(cmd["data"])


async def test_a_phone_pauses_the_tv(hub: Hub) -> None:
    tv, phone = await tv_and_phone(hub)
    mid = await phone.send("remote.command", {"device_id": "tv-1", "command": "pause"})
    cmd = await answer(tv, state={"state": "paused", "position": 30.0})
    assert cmd["command"] == "pause" and cmd["args"] == {}
    assert cmd["from"] == {"user_id": "alice", "device_id": "phone-1"}
    reply = await phone.recv_type("ack")
    assert reply["id"] == mid
    assert reply["data"] == {
        "command_id": cmd["command_id"],
        "result": {"ok": True, "state": {"state": "paused", "position": 30.0}},
    }


async def test_the_connection_keeps_reading_while_its_command_waits(hub: Hub) -> None:
    tv, phone = await tv_and_phone(hub)
    await phone.send("remote.command", {"device_id": "tv-1", "command": "pause"})
    # The phone's next request is answered while the device has not answered yet.
    assert "devices" in await ack(phone, "devices.list")
    await answer(tv)
    assert (await phone.recv_type("ack"))["data"]["result"] == {"ok": True}


async def test_the_device_refuses_a_command(hub: Hub) -> None:
    tv, phone = await tv_and_phone(hub)
    await phone.send(
        "remote.command", {"device_id": "tv-1", "command": "seek", "args": {"position": 5}}
    )
    cmd = await answer(tv, ok=False, error="nothing is playing")
    assert cmd["args"] == {"position": 5}
    reply = await phone.recv_type("error")
    assert reply["data"]["code"] == "REJECTED" and reply["data"]["message"] == "nothing is playing"


async def test_an_unsupported_command_is_rejected_without_asking(hub: Hub) -> None:
    tv, phone = await tv_and_phone(hub)
    assert (
        await err(phone, "remote.command", {"device_id": "tv-1", "command": "stop"}) == "REJECTED"
    )
    # the phone says it takes no remote control at all
    assert (
        await err(tv, "remote.command", {"device_id": "phone-1", "command": "pause"}) == "REJECTED"
    )
    # the TV was never asked: the next thing it gets is this command
    await phone.send("remote.command", {"device_id": "tv-1", "command": "x-zoom", "args": {"z": 2}})
    cmd = await answer(tv)
    assert cmd["command"] == "x-zoom" and cmd["args"] == {"z": 2}


@pytest.mark.parametrize(
    "data",
    [
        {"device_id": "tv-1", "command": "seek"},
        {"device_id": "tv-1", "command": "seek", "args": {"position": -3}},
        {"device_id": "tv-1", "command": "set_volume", "args": {"volume": 300}},
        {"device_id": "tv-1", "command": "play", "args": {"item_ids": []}},
        {"device_id": "tv-1", "command": "display_message", "args": {"text": ""}},
        {"device_id": "tv-1", "command": "launch-missiles"},
        {"device_id": "tv-1", "command": "pause", "timeout_ms": 60_001},
        {"command": "pause"},
    ],
)
async def test_bad_commands_are_invalid_message(hub: Hub, data: dict[str, Any]) -> None:
    _tv, phone = await tv_and_phone(hub)
    assert await err(phone, "remote.command", data) == "INVALID_MESSAGE"


async def test_a_command_without_id_is_refused(hub: Hub) -> None:
    _tv, phone = await tv_and_phone(hub)
    await phone.send("remote.command", {"device_id": "tv-1", "command": "pause"}, id=None)
    reply = await phone.recv_type("error")
    assert reply["data"]["code"] == "INVALID_MESSAGE" and "id" not in reply


async def test_a_silent_device_times_out_and_its_late_result_is_not_found(hub: Hub) -> None:
    tv, phone = await tv_and_phone(hub)
    await phone.send("remote.command", {"device_id": "tv-1", "command": "pause", "timeout_ms": 300})
    cmd = await tv.recv_type("remote.command")
    reply = await phone.recv_type("error")
    assert reply["data"]["code"] == "TIMEOUT" and reply["data"]["retryable"] is True
    late = {"command_id": cmd["data"]["command_id"], "ok": True}
    assert await err(tv, "remote.result", late) == "NOT_FOUND"
    assert await err(tv, "remote.result", {"command_id": "nope", "ok": True}) == "NOT_FOUND"


async def test_a_device_that_leaves_before_answering_is_unavailable(hub: Hub) -> None:
    tv, phone = await tv_and_phone(hub)
    await phone.send("remote.command", {"device_id": "tv-1", "command": "pause"})
    await tv.recv_type("remote.command")
    await tv.close()
    reply = await phone.recv_type("error")
    assert reply["data"]["code"] == "UNAVAILABLE"


async def test_unknown_and_foreign_devices(hub: Hub) -> None:
    bob_tv = await hub.connect("bob")
    await ack(bob_tv, "device.hello", {**TV, "device_id": "bobs-tv"})
    alice = await hub.connect("alice")
    cmd = {"device_id": "nope", "command": "pause"}
    assert await err(alice, "remote.command", cmd) == "NOT_FOUND"
    cmd = {"device_id": "bobs-tv", "command": "pause"}
    assert await err(alice, "remote.command", cmd) == "FORBIDDEN"
    assert await err(alice, "remote.command", {**cmd, "user_id": "bob"}) == "FORBIDDEN"


async def test_an_admin_commands_any_users_device(hub: Hub) -> None:
    bob_tv = await hub.connect("bob")
    await ack(bob_tv, "device.hello", {**TV, "device_id": "bobs-tv"})
    admin = await hub.connect("root", role="admin")
    await admin.send(
        "remote.command", {"device_id": "bobs-tv", "user_id": "bob", "command": "pause"}
    )
    cmd = await answer(bob_tv)
    assert cmd["from"] == {"user_id": "root", "device_id": None}
    assert (await admin.recv_type("ack"))["data"]["result"] == {"ok": True}


async def test_at_most_ten_commands_in_flight_per_device(hub: Hub) -> None:
    tv = await hub.connect("alice")
    await ack(tv, "device.hello", TV)
    phones = [await hub.connect("alice") for _ in range(2)]
    for i in range(10):
        await phones[i % 2].send("remote.command", {"device_id": "tv-1", "command": "pause"})
    commands = [await tv.recv_type("remote.command") for _ in range(10)]
    assert await err(phones[0], "remote.command", {"device_id": "tv-1", "command": "pause"}) == (
        "RATE_LIMITED"
    )
    for cmd in commands:
        await ack(tv, "remote.result", {"command_id": cmd["data"]["command_id"], "ok": True})
    # answered: room again
    await phones[1].send("remote.command", {"device_id": "tv-1", "command": "pause"})
    await answer(tv)


# -- lists and the sessions channel -------------------------------------------------------------
async def test_devices_list_for_self_admin_and_backend(hub: Hub) -> None:
    _held = await tv_and_phone(hub, "alice")  # held: a collected client would close
    bob = await hub.connect("bob")
    await ack(bob, "device.hello", {**TV, "device_id": "bobs-tv"})
    assert [d["device_id"] for d in (await ack(bob, "devices.list"))["devices"]] == ["bobs-tv"]
    assert await err(bob, "devices.list", {"user_id": "alice"}) == "FORBIDDEN"
    assert await err(bob, "devices.list", {"all": True}) == "FORBIDDEN"
    admin = await hub.connect("root", role="admin")
    alices = (await ack(admin, "devices.list", {"user_id": "alice"}))["devices"]
    assert sorted(d["device_id"] for d in alices) == ["phone-1", "tv-1"]
    everyone = (await ack(admin, "devices.list", {"all": True}))["devices"]
    assert sorted(d["device_id"] for d in everyone) == ["bobs-tv", "phone-1", "tv-1"]
    status, body = await hub.request("GET", "/api/v1/realtime/devices?user_id=bob")
    assert status == 200 and [d["device_id"] for d in body["devices"]] == ["bobs-tv"]
    status, body = await hub.request("GET", "/api/v1/realtime/devices")
    assert status == 200 and len(body["devices"]) == 3
    status, body = await hub.request("GET", "/api/v1/realtime/devices", headers={})
    assert status == 401 and body["error"]["code"] == "UNAUTHORIZED"


async def test_sessions_is_for_admins_and_coalesces_changes(hub: Hub) -> None:
    user = await hub.connect("alice")
    reply = await user.request("subscribe", {"channels": ["sessions"]})
    assert [(e["channel"], e["code"]) for e in reply["data"]["errors"]] == [
        ("sessions", "FORBIDDEN")
    ]
    admin = await hub.connect("root", role="admin")
    reply = await admin.request("subscribe", {"channels": ["sessions"]})
    assert reply["data"]["errors"] == []
    tv, _phone = await tv_and_phone(hub)
    await ack(tv, "playback.update", MOVIE)
    seen: dict[str, Any] = {}
    while "tv-1" not in seen or not seen["tv-1"]["now_playing"]:
        msg = await admin.recv_type("sessions.updated")
        assert msg["channel"] == "sessions"
        seen.update({d["device_id"]: d for d in msg["data"]["devices"]})
    await tv.close()
    while True:
        msg = await admin.recv_type("sessions.updated")
        if {"user_id": "alice", "device_id": "tv-1"} in msg["data"]["removed"]:
            break


# -- the backend's HTTP route ------------------------------------------------------------------
async def test_the_backend_commands_a_device_over_http(hub: Hub) -> None:
    tv = await hub.connect("alice")
    await ack(tv, "device.hello", TV)
    path = "/api/v1/realtime/devices/tv-1/command"

    async def call(body: dict[str, Any]) -> tuple[int, Any]:
        return await hub.request("POST", path, json=body)

    pending = asyncio.create_task(call({"user_id": "alice", "command": "unpause"}))
    cmd = await answer(tv, state={"state": "playing"})
    assert cmd["from"] == {"user_id": None, "device_id": None}
    status, body = await pending
    assert status == 200 and body["result"] == {"ok": True, "state": {"state": "playing"}}

    pending = asyncio.create_task(call({"user_id": "alice", "command": "pause"}))
    await answer(tv, ok=False, error="busy")
    status, body = await pending
    assert status == 422 and body["error"]["code"] == "REJECTED"

    status, body = await call({"user_id": "alice", "command": "pause", "timeout_ms": 200})
    assert status == 504 and body["error"]["code"] == "TIMEOUT"
    await tv.recv_type("remote.command")  # the one that timed out
    status, body = await call({"user_id": "alice", "command": "stop"})
    assert status == 422 and body["error"]["code"] == "REJECTED"
    status, body = await call({"user_id": "bob", "command": "pause"})
    assert status == 404 and body["error"]["code"] == "NOT_FOUND"
    status, body = await call({"user_id": "alice", "command": "seek", "args": {}})
    assert status == 400 and body["error"]["code"] == "INVALID_MESSAGE"
    status, body = await hub.request(
        "POST", path, json={"user_id": "alice", "command": "pause"}, headers={}
    )
    assert status == 401


async def test_metrics_count_devices_updates_and_commands(hub: Hub) -> None:
    tv, phone = await tv_and_phone(hub)
    await ack(tv, "playback.update", MOVIE)
    await phone.send("remote.command", {"device_id": "tv-1", "command": "pause"})
    await answer(tv)
    await phone.recv_type("ack")
    assert await err(phone, "remote.command", {"device_id": "tv-1", "command": "stop"}) == (
        "REJECTED"
    )
    status, text = await hub.request("GET", "/metrics", headers={})
    assert status == 200
    lines = set(str(text).splitlines())
    assert "revenge_devices 2.0" in lines
    assert "revenge_playback_updates_total 1.0" in lines
    assert 'revenge_remote_commands_total{outcome="ok"} 1.0' in lines
    assert 'revenge_remote_commands_total{outcome="REJECTED"} 1.0' in lines
