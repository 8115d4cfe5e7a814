"""Devices across nodes: two hubs sharing a private redis-server. Takeover, listing,
remote commands and their results, timeouts and departures, all across nodes; and a node
killed with SIGKILL, whose devices disappear within the presence TTL."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from revenge_ws.auth import mint_token

from .helpers import WS, Hub, make_settings, running_hub, start_hub_process
from .redis_fixtures import RedisProcess
from .test_devices import MOVIE, PHONE, TV, ack, answer, err

pytestmark = pytest.mark.redis


def node_settings(redis: RedisProcess, i: int, **env: str) -> Any:
    return make_settings(
        {
            "REVENGE_BROKER_URL": redis.url,
            "REVENGE_NODE_ID": f"node{i}",
            "REVENGE_BROKER_PRESENCE_TTL": "3",
            "REVENGE_BROKER_PRESENCE_REFRESH": "1",
            **env,
        }
    )


@contextlib.asynccontextmanager
async def two_nodes(redis: RedisProcess, **env: str) -> AsyncIterator[tuple[Hub, Hub]]:
    async with (
        running_hub(node_settings(redis, 0, **env)) as a,
        running_hub(node_settings(redis, 1, **env)) as b,
    ):
        yield a, b


async def test_a_command_crosses_nodes_and_its_result_comes_back(redis_proc: RedisProcess) -> None:
    async with two_nodes(redis_proc) as (a, b):
        tv = await a.connect("alice")
        await ack(tv, "device.hello", TV)
        phone = await b.connect("alice")
        await ack(phone, "device.hello", PHONE)
        listed = (await ack(phone, "devices.list"))["devices"]
        assert sorted(d["device_id"] for d in listed) == ["phone-1", "tv-1"]
        mid = await phone.send("remote.command", {"device_id": "tv-1", "command": "pause"})
        cmd = await answer(tv, state={"state": "paused"})
        assert cmd["from"] == {"user_id": "alice", "device_id": "phone-1"}
        reply = await phone.recv_type("ack")
        assert reply["id"] == mid
        assert reply["data"]["result"] == {"ok": True, "state": {"state": "paused"}}
        # refused by the device, across nodes
        await phone.send("remote.command", {"device_id": "tv-1", "command": "unpause"})
        await answer(tv, ok=False, error="no")
        assert (await phone.recv_type("error"))["data"]["code"] == "REJECTED"
        # the backend asks node b; the device is on node a
        s = await b.session()
        task = asyncio.create_task(
            s.post(
                f"{b.url}/api/v1/realtime/devices/tv-1/command",
                headers={"Authorization": "Bearer " + b.settings.api.keys[0].get_secret_value()},
                json={"user_id": "alice", "command": "seek", "args": {"position": 3}},
            )
        )
        await answer(tv)
        async with await task as resp:
            assert resp.status == 200 and (await resp.json())["result"] == {"ok": True}


async def test_timeout_departure_and_rate_limit_across_nodes(redis_proc: RedisProcess) -> None:
    async with two_nodes(redis_proc) as (a, b):
        tv = await a.connect("alice")
        await ack(tv, "device.hello", TV)
        phone = await b.connect("alice")
        await phone.send(
            "remote.command", {"device_id": "tv-1", "command": "pause", "timeout_ms": 300}
        )
        cmd = await tv.recv_type("remote.command")
        assert (await phone.recv_type("error"))["data"]["code"] == "TIMEOUT"
        late = {"command_id": cmd["data"]["command_id"], "ok": True}
        assert await err(tv, "remote.result", late) == "NOT_FOUND"
        # ten in flight from node b; the eleventh is refused by node a
        for _ in range(10):
            await phone.send("remote.command", {"device_id": "tv-1", "command": "pause"})
        for _ in range(10):
            await tv.recv_type("remote.command")
        assert await err(phone, "remote.command", {"device_id": "tv-1", "command": "pause"}) == (
            "RATE_LIMITED"
        )
        # the device leaves with ten commands in flight: each is answered UNAVAILABLE
        await tv.close()
        codes = [(await phone.recv_type("error"))["data"]["code"] for _ in range(10)]
        assert codes == ["UNAVAILABLE"] * 10
        assert await err(phone, "remote.command", {"device_id": "tv-1", "command": "pause"}) == (
            "NOT_FOUND"
        )


async def test_takeover_and_updates_across_nodes(redis_proc: RedisProcess) -> None:
    async with two_nodes(redis_proc) as (a, b):
        old = await a.connect("alice")
        await ack(old, "device.hello", TV)
        watcher = await a.connect("alice")
        new = await b.connect("alice")
        await ack(new, "device.hello", TV)
        assert (await old.recv_type("device.ended"))["data"]["reason"] == "replaced"
        listed = (await ack(watcher, "devices.list"))["devices"]
        assert [d["device_id"] for d in listed] == ["tv-1"]
        # the new holder's updates reach the user's connections on the other node
        await ack(new, "playback.update", MOVIE)
        while True:
            device = (await watcher.recv_type("device.updated"))["data"]["device"]
            if device["now_playing"]:
                break
        assert device["now_playing"]["item_id"] == "m1"
        # another node's devices.list sees the new state after the flush
        for _ in range(50):
            listed = (await ack(watcher, "devices.list"))["devices"]
            if listed[0]["now_playing"]:
                break
            await asyncio.sleep(0.1)
        assert listed[0]["now_playing"]["item_id"] == "m1"
        # the old connection closing does not remove the device
        await old.close()
        await new.close()
        assert (await watcher.recv_type("device.removed"))["data"] == {"device_id": "tv-1"}
        assert (await ack(watcher, "devices.list"))["devices"] == []


async def test_admin_sees_every_nodes_devices(redis_proc: RedisProcess) -> None:
    async with two_nodes(redis_proc) as (a, b):
        devices = []  # held: a client object collected would close its connection
        for hub, user, dev in ((a, "alice", "tv-a"), (b, "bob", "tv-b")):
            devices.append(await hub.connect(user))
            await ack(devices[-1], "device.hello", {**TV, "device_id": dev})
        admin = await a.connect("root", role="admin")
        everyone = (await ack(admin, "devices.list", {"all": True}))["devices"]
        assert sorted((d["user_id"], d["device_id"]) for d in everyone) == [
            ("alice", "tv-a"),
            ("bob", "tv-b"),
        ]
        status, body = await a.request("GET", "/api/v1/realtime/devices?user_id=bob")
        assert status == 200 and [d["device_id"] for d in body["devices"]] == ["tv-b"]
        # admin override across nodes
        alice_on_b = await b.connect("alice")
        assert await err(
            alice_on_b, "remote.command", {"device_id": "tv-b", "command": "pause"}
        ) == ("FORBIDDEN")


async def test_a_restart_is_not_a_departure(redis_proc: RedisProcess) -> None:
    """A node that stops (SIGTERM) leaves its devices listed: they come back within the
    advised window and claim them again; one that does not expires and is reported."""
    async with running_hub(node_settings(redis_proc, 1)) as b:
        watcher = await b.connect("alice")
        async with running_hub(node_settings(redis_proc, 0)) as a:
            tv = await a.connect("alice")
            await ack(tv, "device.hello", TV)
            stays = await a.connect("alice")
            await ack(stays, "device.hello", PHONE)
        listed = (await ack(watcher, "devices.list"))["devices"]
        assert sorted(d["device_id"] for d in listed) == ["phone-1", "tv-1"]
        # the phone comes back (on the other node) and claims its device again
        back = await b.connect("alice")
        await ack(back, "device.hello", PHONE)
        # the TV does not: it expires after the presence TTL and is reported once
        removed = await watcher.recv_type("device.removed", timeout=15)
        assert removed["data"] == {"device_id": "tv-1"}
        listed = (await ack(watcher, "devices.list"))["devices"]
        assert [d["device_id"] for d in listed] == ["phone-1"]


async def test_the_devices_of_a_killed_node_disappear(redis_proc: RedisProcess) -> None:
    env = {
        "REVENGE_BROKER_URL": redis_proc.url,
        "REVENGE_BROKER_PRESENCE_TTL": "2",
        "REVENGE_BROKER_PRESENCE_REFRESH": "0.5",
    }
    doomed = start_hub_process({**env, "REVENGE_NODE_ID": "doomed"})
    survivor = start_hub_process({**env, "REVENGE_NODE_ID": "survivor"})
    settings = make_settings()
    try:
        async with aiohttp.ClientSession() as s:

            async def connect(port: int) -> WS:
                tok = mint_token(settings.jwt, "alice")
                ws = await s.ws_connect(
                    f"ws://127.0.0.1:{port}/api/v1/ws?token={tok}", protocols=["revenge.v1"]
                )
                client = WS(ws)
                client.welcome = await client.recv()
                return client

            tv = await connect(doomed.port)
            await ack(tv, "device.hello", TV)
            phone = await connect(survivor.port)
            await ack(phone, "device.hello", PHONE)
            assert len((await ack(phone, "devices.list"))["devices"]) == 2
            doomed.stop(signal.SIGKILL)
            removed = await phone.recv_type("device.removed", timeout=15)
            assert removed["data"] == {"device_id": "tv-1"}
            listed = (await ack(phone, "devices.list"))["devices"]
            assert [d["device_id"] for d in listed] == ["phone-1"]
            assert await err(
                phone, "remote.command", {"device_id": "tv-1", "command": "pause"}
            ) == ("NOT_FOUND")
    finally:
        doomed.stop(signal.SIGKILL)
        survivor.stop()
    assert "Traceback" not in survivor.log(), survivor.log()[-3000:]


async def test_a_command_follows_a_device_that_moved(redis_proc: RedisProcess) -> None:
    """Node b remembers where the TV was; the TV reconnects (a new connection on node
    a). The next command, routed to the old connection, is refused there and re-routed
    once, by a fresh look in the registry."""
    async with two_nodes(redis_proc) as (a, b):
        tv = await a.connect("alice")
        await ack(tv, "device.hello", TV)
        phone = await b.connect("alice")
        await phone.send("remote.command", {"device_id": "tv-1", "command": "pause"})
        await answer(tv)
        await phone.recv_type("ack")
        await tv.close()
        moved = await a.connect("alice")
        await ack(moved, "device.hello", TV)
        await phone.send("remote.command", {"device_id": "tv-1", "command": "unpause"})
        cmd = await answer(moved)
        assert cmd["command"] == "unpause"
        assert (await phone.recv_type("ack"))["data"]["result"] == {"ok": True}
        status, text = await b.request("GET", "/metrics", headers={})
        assert status == 200
        assert 'revenge_remote_commands_total{outcome="ok"} 2.0' in str(text).splitlines()
