"""The Python client as a device (contract §13): hello on every connection and not on
``device.ended``, ``playback.update`` reports repeated while playing, answers to
``remote.command``, ``send_command`` and ``list_devices``; first against a scripted
server on real sockets, then against a real hub."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from revenge_ws.client import Client, DeviceInfo
from revenge_ws.codes import ErrorCode
from revenge_ws.exceptions import ClientError, RequestError, RequestTimeout

from .helpers import Hub, until
from .test_client import FakeConn, FakeHub, events, welcome
from .test_client import fake as fake  # the scripted server fixture

TV = DeviceInfo("tv-1", "Living room TV", client="tests", version="1.0", commands=("pause",))


def ack(req: dict[str, Any], **data: Any) -> dict[str, Any]:
    return {"type": "ack", "id": req["id"], "data": data}


def error(req: dict[str, Any], code: str, message: str, retryable: bool = False) -> dict[str, Any]:
    return {
        "type": "error",
        "id": req["id"],
        "data": {"code": code, "message": message, "retryable": retryable},
    }


def device_object(info: DeviceInfo, user: str = "u") -> dict[str, Any]:
    return {
        **info.hello(),
        "user_id": user,
        "connected_at": 1,
        "updated_at": 1,
        "now_playing": None,
    }


async def next_request(conn: FakeConn, timeout: float = 5.0) -> dict[str, Any]:
    """The next request the client sent on ``conn`` (pings are answered by the server)."""
    return await asyncio.wait_for(conn.inbox.get(), timeout)


async def accept_hello(conn: FakeConn, info: DeviceInfo = TV) -> dict[str, Any]:
    """Welcome the client; its first request must be ``device.hello``: ack it."""
    await conn.send(welcome([]))
    hello = await next_request(conn)
    assert hello["type"] == "device.hello"
    assert hello["data"] == info.hello()
    await conn.send(ack(hello, device=device_object(info)))
    return hello


# -- DeviceInfo (pure) ------------------------------------------------------------------
def test_device_info_hello_and_validation() -> None:
    assert TV.hello() == {
        "device_id": "tv-1",
        "name": "Living room TV",
        "client": "tests",
        "version": "1.0",
        "capabilities": {"remote_control": True, "commands": ["pause"]},
    }
    plain = DeviceInfo("phone", "Phone")
    assert plain.hello()["capabilities"] == {"remote_control": False, "commands": []}
    assert plain.client == "revenge-ws-python"
    listed = DeviceInfo("x", "X", commands=["pause", "x-zoom"], remote_control=False)  # type: ignore[arg-type]
    assert listed.commands == ("pause", "x-zoom")
    assert listed.hello()["capabilities"]["remote_control"] is False
    for bad in (
        {"device_id": "", "name": "n"},
        {"device_id": "d" * 129, "name": "n"},
        {"device_id": "d", "name": ""},
        {"device_id": "d", "name": "n", "version": "v" * 51},
        {"device_id": "d", "name": "n", "commands": ("",)},
    ):
        with pytest.raises(ValueError):
            DeviceInfo(**bad)


# -- against a scripted server ------------------------------------------------------------
async def test_hello_on_every_connection_not_on_device_ended_scripted(fake: FakeHub) -> None:
    async with Client(
        fake.url, token="t", device=TV, backoff_min=0.05, backoff_max=0.1, playback_interval=60
    ) as c:
        ended = events(c, "device.ended")
        conn = await fake.next_conn()
        await accept_hello(conn)
        await c.wait_connected(5)
        assert c.device is TV and c.device_active and c.stats.device_hellos == 1
        # A report reaches the hub; it is kept for the next connection.
        report = asyncio.create_task(c.report_playback("m1", "playing", 12.0, duration=5400))
        update = await next_request(conn)
        assert update["type"] == "playback.update"
        assert update["data"]["item_id"] == "m1" and update["data"]["state"] == "playing"
        await conn.send(ack(update))
        assert await report is True
        sub = asyncio.create_task(c.subscribe("activity"))
        req = await next_request(conn)
        assert req["type"] == "subscribe"
        await conn.send(
            ack(req, subscriptions=[{"channel": "activity", "epoch": "a", "seq": 0}], errors=[])
        )
        await sub

        # Reconnect: hello first, then the re-subscription, and the playback again.
        await conn.ws.close(code=4400, message=b"bye")
        conn = await fake.next_conn(timeout=10)
        await accept_hello(conn)
        seen = [await next_request(conn), await next_request(conn)]
        by_type = {m["type"]: m for m in seen}
        assert set(by_type) == {"subscribe", "playback.update"}
        assert by_type["playback.update"]["data"]["item_id"] == "m1"
        assert by_type["playback.update"]["data"]["position"] >= 12.0
        await conn.send(ack(by_type["playback.update"]))
        req = by_type["subscribe"]
        await conn.send(
            ack(req, subscriptions=[{"channel": "activity", "epoch": "a", "seq": 0}], errors=[])
        )
        await c.wait_connected(5)
        assert c.stats.device_hellos == 2

        # Taken over by another connection: delivered, no hello again on this connection,
        # and reports are kept, not sent.
        await conn.send(
            {"type": "device.ended", "data": {"device_id": "tv-1", "reason": "replaced"}}
        )
        await asyncio.wait_for(_until(lambda: not c.device_active), 5)
        assert [e["data"] for e in ended] == [{"device_id": "tv-1", "reason": "replaced"}]
        assert await c.report_playback("m1", "paused", 30.0) is False
        probe = asyncio.create_task(c.request("test.probe", {}))
        req = await next_request(conn)
        assert req["type"] == "test.probe"  # neither a hello nor a playback.update first
        await conn.send(ack(req))
        await probe

        # The next connection says hello again and sends the paused state.
        await conn.ws.close(code=4400, message=b"bye")
        conn = await fake.next_conn(timeout=10)
        await accept_hello(conn)
        seen = [await next_request(conn), await next_request(conn)]
        update = next(m for m in seen if m["type"] == "playback.update")
        assert update["data"]["state"] == "paused" and update["data"]["position"] == 30.0
        await conn.send(ack(update))
        sub_req = next(m for m in seen if m["type"] == "subscribe")
        await conn.send(
            ack(sub_req, subscriptions=[{"channel": "activity", "epoch": "a", "seq": 0}], errors=[])
        )
        await c.wait_connected(5)
        assert c.device_active and c.stats.device_hellos == 3


async def _until(predicate: Any) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


async def test_set_device_and_refused_hello_scripted(fake: FakeHub) -> None:
    async with Client(fake.url, token="t", backoff_min=0.05, backoff_max=0.1) as c:
        errors = events(c, "client.device_error")
        with pytest.raises(ClientError):
            await c.report_playback("m1", "playing", 0.0)  # not a device yet
        conn = await fake.next_conn()
        await conn.send(welcome([]))
        await c.wait_connected(5)
        assert c.device is None and not c.device_active
        # set_device while connected says hello now and returns the hub's device object.
        setting = asyncio.create_task(c.set_device(TV))
        hello = await next_request(conn)
        assert hello["type"] == "device.hello" and hello["data"] == TV.hello()
        await conn.send(ack(hello, device=device_object(TV)))
        record = await setting
        assert record is not None and record["device_id"] == "tv-1"
        assert c.device_active
        with pytest.raises(ValueError):
            await c.report_playback("m1", "rewinding", 0.0)
        # A hello refused at reconnect: the connection still serves, the app is told.
        await conn.ws.close(code=4400, message=b"bye")
        conn = await fake.next_conn(timeout=10)
        await conn.send(welcome([]))
        hello = await next_request(conn)
        assert hello["type"] == "device.hello"
        await conn.send(error(hello, "INVALID_MESSAGE", "name too long"))
        await c.wait_connected(5)
        assert not c.device_active
        assert [e["data"] for e in errors] == [
            {"code": "INVALID_MESSAGE", "message": "name too long"}
        ]
        assert await c.report_playback("m1", "playing", 0.0) is False


async def test_periodic_update_extrapolates_the_position_scripted(fake: FakeHub) -> None:
    now = [1_000_000.0]  # the client's clock (ms): the test moves it
    async with Client(
        fake.url, token="t", device=TV, clock=lambda: now[0], playback_interval=0.05
    ) as c:
        conn = await fake.next_conn()
        await accept_hello(conn)
        await c.wait_connected(5)
        report = asyncio.create_task(
            c.report_playback("m1", "playing", 10.0, duration=30.0, rate=2.0, title="Film")
        )
        first = await next_request(conn)
        assert first["type"] == "playback.update"
        assert first["data"] == {
            "item_id": "m1",
            "state": "playing",
            "position": 10.0,
            "rate": 2.0,
            "duration": 30.0,
            "title": "Film",
        }
        now[0] += 5_000  # 5 s at rate 2 before the next periodic update
        await conn.send(ack(first))
        assert await report is True
        update = await next_request(conn)
        assert update["type"] == "playback.update" and update["data"]["position"] == 20.0
        now[0] += 60_000  # never past the duration
        await conn.send(ack(update))
        update = await next_request(conn)
        assert update["data"]["position"] == 30.0 and update["data"]["title"] == "Film"
        # Paused: one update, then no periodic ones.
        report = asyncio.create_task(c.report_playback("m1", "paused", 25.0))
        while True:  # a periodic update may have been on its way
            await conn.send(ack(update))
            update = await next_request(conn)
            if update["data"]["state"] == "paused":
                break
        await conn.send(ack(update))
        assert await report is True
        sent = c.stats.playback_updates
        await asyncio.sleep(0.3)  # six intervals: nothing is repeated while paused
        assert conn.inbox.empty() and c.stats.playback_updates == sent


async def test_on_command_answers_scripted(fake: FakeHub) -> None:
    calls: list[tuple[str, dict[str, Any], dict[str, Any]]] = []

    async def obey(command: str, args: dict[str, Any], sender: dict[str, Any]) -> Any:
        calls.append((command, args, sender))
        if command == "pause":
            return {"state": "paused", "position": 12.5}
        if command == "slow":
            await asyncio.sleep(30)
        if command == "fail":
            raise RuntimeError("cannot do that now")
        return None

    async with Client(fake.url, token="t", device=TV, command_timeout=0.2) as c:
        conn = await fake.next_conn()
        await accept_hello(conn)
        await c.wait_connected(5)
        sender = {"user_id": "u", "device_id": "phone"}

        async def command(cid: str, name: str, args: dict[str, Any] | None = None) -> Any:
            await conn.send(
                {
                    "type": "remote.command",
                    "data": {
                        "command_id": cid,
                        "command": name,
                        "args": args or {},
                        "from": sender,
                    },
                }
            )
            result = await next_request(conn)
            assert result["type"] == "remote.result"
            await conn.send(ack(result))
            return result["data"]

        # Without a handler: ok false, "no handler".
        assert await command("k0", "pause") == {
            "command_id": "k0",
            "ok": False,
            "error": "no handler",
        }
        remove = c.on_command(obey)
        assert await command("k1", "pause", {"x": 1}) == {
            "command_id": "k1",
            "ok": True,
            "state": {"state": "paused", "position": 12.5},
        }
        assert calls[0] == ("pause", {"x": 1}, sender)
        assert await command("k2", "x-other") == {"command_id": "k2", "ok": True}
        assert await command("k3", "fail") == {
            "command_id": "k3",
            "ok": False,
            "error": "cannot do that now",
        }
        assert await command("k4", "slow") == {
            "command_id": "k4",
            "ok": False,
            "error": "no result within 0.2s",
        }
        # A sync handler works the same.
        c.on_command(lambda cmd, args, frm: {"sync": cmd})
        assert await command("k5", "pause") == {
            "command_id": "k5",
            "ok": True,
            "state": {"sync": "pause"},
        }
        remove()  # removes only the handler it was returned for
        assert await command("k6", "pause") == {
            "command_id": "k6",
            "ok": True,
            "state": {"sync": "pause"},
        }
        await asyncio.wait_for(_until(lambda: c.stats.commands_answered == 7), 5)
        assert c.stats.commands_received == 7


async def test_send_command_and_list_devices_scripted(fake: FakeHub) -> None:
    async with Client(fake.url, token="t", request_timeout=0.3) as c:
        conn = await fake.next_conn()
        await conn.send(welcome([]))
        await c.wait_connected(5)

        sending = asyncio.create_task(c.send_command("tv-1", "seek", {"position": 60}))
        req = await next_request(conn)
        assert req["type"] == "remote.command"
        assert req["data"] == {"device_id": "tv-1", "command": "seek", "args": {"position": 60}}
        await conn.send(ack(req, command_id="k1", result={"ok": True, "state": {"position": 60}}))
        assert await sending == {"ok": True, "state": {"position": 60}}

        for code, retryable in (
            ("REJECTED", False),
            ("TIMEOUT", True),
            ("NOT_FOUND", False),
            ("FORBIDDEN", False),
            ("UNAVAILABLE", True),
            ("RATE_LIMITED", True),
        ):
            sending = asyncio.create_task(
                c.send_command("tv-1", "pause", user_id="v", timeout_ms=1000)
            )
            req = await next_request(conn)
            assert req["data"] == {
                "device_id": "tv-1",
                "command": "pause",
                "user_id": "v",
                "timeout_ms": 1000,
            }
            await conn.send(error(req, code, f"{code.lower()} says the hub", retryable))
            with pytest.raises(RequestError) as info:
                await sending
            assert info.value.code is ErrorCode(code)
            assert info.value.message == f"{code.lower()} says the hub"
            assert info.value.retryable is retryable

        # No reply at all: the local wait ends after timeout_ms + request_timeout.
        sending = asyncio.create_task(c.send_command("tv-1", "pause", timeout_ms=100))
        req = await next_request(conn)
        with pytest.raises(RequestTimeout):
            await asyncio.wait_for(sending, 5)

        listing = asyncio.create_task(c.list_devices(all=True))
        req = await next_request(conn)
        assert req["type"] == "devices.list" and req["data"] == {"all": True}
        await conn.send(ack(req, devices=[device_object(TV)]))
        assert [d["device_id"] for d in await listing] == ["tv-1"]
        listing = asyncio.create_task(c.list_devices("v"))
        req = await next_request(conn)
        assert req["data"] == {"user_id": "v"}
        await conn.send(ack(req, devices=[]))
        assert await listing == []


# -- against a real hub ---------------------------------------------------------------------
def close_session(hub: Hub, user: str, session_id: str | None, code: int = 4400) -> None:
    """Close one connection of ``user`` from the server side (the client reconnects)."""
    conns = [c for c in hub.node.hub.user_connections(user) if c.session_id == session_id]
    assert len(conns) == 1
    conns[0].close(code, "test: closed by the server")


def now_playing(msgs: list[dict[str, Any]], device_id: str) -> list[Any]:
    """The ``now_playing`` of each ``device.updated`` of ``device_id``."""
    return [
        m["data"]["device"]["now_playing"]
        for m in msgs
        if m["type"] == "device.updated" and m["data"]["device"]["device_id"] == device_id
    ]


async def test_hub_hello_after_reconnect_and_playback_reaches_the_user(hub: Hub) -> None:
    token = hub.token("alice")
    async with (
        Client(hub.ws_url, token=token) as phone,
        Client(hub.ws_url, token=token, device=TV, backoff_min=0.05, backoff_max=0.2) as tv,
    ):
        seen = events(phone, "device.updated", "device.removed")
        await phone.wait_connected(5)
        await tv.wait_connected(5)
        assert tv.device_active and tv.stats.device_hellos == 1
        assert await tv.report_playback("m1", "playing", 42.0, duration=5400, title="Film")
        await until(lambda: any(now_playing(seen, "tv-1")), what="device.updated with m1")
        np = [n for n in now_playing(seen, "tv-1") if n][-1]
        assert np["item_id"] == "m1" and np["state"] == "playing" and np["position"] >= 42.0
        (listed,) = await phone.list_devices()
        assert listed["device_id"] == "tv-1" and listed["user_id"] == "alice"
        assert listed["name"] == TV.name and listed["now_playing"]["item_id"] == "m1"

        # The hub closes the TV's connection: the device ends, the TV reconnects, says
        # hello again and re-sends what it plays.
        close_session(hub, "alice", tv.session_id)
        await until(lambda: tv.stats.connects == 2, what="the TV's reconnect")
        await until(lambda: tv.stats.device_hellos == 2 and tv.device_active, what="hello")
        removed = [m for m in seen if m["type"] == "device.removed"]
        assert removed[0]["data"] == {"device_id": "tv-1"}
        after = seen.index(removed[0])
        await until(
            lambda: any(now_playing(seen[after:], "tv-1")), what="device.updated after hello"
        )
        assert [n for n in now_playing(seen[after:], "tv-1") if n][-1]["item_id"] == "m1"
        (listed,) = await phone.list_devices()
        assert listed["now_playing"]["item_id"] == "m1"
        # Stopped clears now_playing.
        assert await tv.report_playback("m1", "stopped", 50.0)
        await until(lambda: now_playing(seen, "tv-1")[-1] is None, what="stopped")
        assert (await phone.list_devices())[0]["now_playing"] is None


async def test_hub_remote_control(hub: Hub) -> None:
    token = hub.token("alice")
    tv_info = DeviceInfo("tv-1", "TV", commands=("pause", "seek", "x-slow", "x-fail"))
    paused: list[dict[str, Any]] = []

    async def obey(command: str, args: dict[str, Any], sender: dict[str, Any]) -> Any:
        if command == "pause":
            paused.append(sender)
            return {"state": "paused"}
        if command == "x-slow":
            await asyncio.sleep(10)
        if command == "x-fail":
            raise RuntimeError("the player is busy")
        return None

    async with (
        Client(hub.ws_url, token=token, device=tv_info, command_timeout=5) as tv,
        Client(hub.ws_url, token=token, device=DeviceInfo("phone-1", "Phone")) as phone,
        Client(hub.ws_url, token=hub.token("bob")) as bob,
    ):
        tv.on_command(obey)
        await tv.wait_connected(5)
        await phone.wait_connected(5)
        await bob.wait_connected(5)
        assert await phone.send_command("tv-1", "pause") == {
            "ok": True,
            "state": {"state": "paused"},
        }
        assert paused == [{"user_id": "alice", "device_id": "phone-1"}]
        assert await phone.send_command("tv-1", "seek", {"position": 10}) == {"ok": True}

        async def refused(coro: Any) -> RequestError:
            with pytest.raises(RequestError) as info:
                await coro
            return info.value

        err = await refused(phone.send_command("tv-1", "x-fail"))
        assert err.code is ErrorCode.REJECTED and err.message == "the player is busy"
        err = await refused(phone.send_command("tv-1", "unmute"))  # not listed: not asked
        assert err.code is ErrorCode.REJECTED
        err = await refused(phone.send_command("tv-1", "x-slow", timeout_ms=300))
        assert err.code is ErrorCode.TIMEOUT and err.retryable
        err = await refused(phone.send_command("nothing-here", "pause"))
        assert err.code is ErrorCode.NOT_FOUND
        err = await refused(bob.send_command("tv-1", "pause", user_id="alice"))
        assert err.code is ErrorCode.FORBIDDEN
        err = await refused(bob.list_devices(all=True))
        assert err.code is ErrorCode.FORBIDDEN
        err = await refused(phone.send_command("tv-1", "seek", {"position": -1}))
        assert err.code is ErrorCode.INVALID_MESSAGE
        # The phone is a device without commands: the hub refuses for it.
        err = await refused(tv.send_command("phone-1", "pause"))
        assert err.code is ErrorCode.REJECTED
        assert sorted(d["device_id"] for d in await bob.list_devices("bob")) == []
        assert sorted(d["device_id"] for d in await tv.list_devices()) == ["phone-1", "tv-1"]


async def test_hub_takeover_ends_the_old_connection_without_a_new_hello(hub: Hub) -> None:
    token = hub.token("alice")
    async with Client(hub.ws_url, token=token, device=TV) as first:
        first.on_command(lambda cmd, args, frm: {"by": "first"})
        ended = events(first, "device.ended")
        await first.wait_connected(5)
        assert first.device_active
        async with Client(hub.ws_url, token=token, device=TV) as second:
            second.on_command(lambda cmd, args, frm: {"by": "second"})
            await second.wait_connected(5)
            await until(lambda: bool(ended), what="device.ended on the first connection")
            assert ended[0]["data"] == {"device_id": "tv-1", "reason": "replaced"}
            assert not first.device_active and second.device_active
            # The first does not take it back: commands reach the second.
            for _ in range(3):
                result = await first.send_command("tv-1", "pause")
                assert result == {"ok": True, "state": {"by": "second"}}
            assert first.stats.device_hellos == 1 and second.stats.device_hellos == 1
            assert await first.report_playback("m1", "playing", 1.0) is False
            # Taking it back is the application's choice.
            assert (await first.set_device(TV) or {})["device_id"] == "tv-1"
            await until(lambda: not second.device_active, what="device.ended on the second")
            assert await second.send_command("tv-1", "pause") == {
                "ok": True,
                "state": {"by": "first"},
            }
