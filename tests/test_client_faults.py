"""The client end to end through faults: cut links, a restarted hub process, asymmetric
latency and a silent server (real sockets, a real hub process, the fault proxy)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import aiohttp
import pytest

from revenge_ws.auth import mint_token
from revenge_ws.client import Client

from .faultproxy import FaultProxy
from .helpers import API_KEY, Hub, HubProcess, make_settings, start_hub_process, until

HubWith = Callable[..., AbstractAsyncContextManager[Hub]]


def collect(client: Client, mtype: str) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    client.on(mtype, got.append)
    return got


async def test_cut_links_while_streaming_lose_nothing(hub: Hub) -> None:
    """200 publications while the link is cut twice (once with refused reconnects for a
    while): all 200 arrive exactly once and in order."""
    async with (
        FaultProxy(hub.port) as proxy,
        Client(proxy.ws_url, token=hub.token("alice"), backoff_min=0.05, backoff_max=0.3) as c,
    ):
        got = collect(c, "test.item")
        await c.subscribe("library:x")
        for i in range(200):
            status, _ = await hub.publish("library:x", "test.item", {"i": i})
            assert status == 200
            if i == 60:
                assert proxy.cut() == 1
            if i == 120:
                proxy.refuse()
                proxy.cut()
            if i == 135:
                proxy.accept()
            await asyncio.sleep(0.005)
        await until(lambda: len(got) >= 200, timeout=20, what="200 publications")
        await asyncio.sleep(0.2)  # anything extra (a duplicate) would arrive now
        assert [m["data"]["i"] for m in got] == list(range(200))
        assert [m["seq"] for m in got] == list(range(1, 201))
        assert c.stats.connects >= 3 and c.stats.recovery_failures == 0
        assert c.stats.disconnects >= 2 and proxy.cuts == 2


async def _post(session: aiohttp.ClientSession, hp: HubProcess, path: str, body: Any) -> Any:
    async with session.post(
        hp.url + path, json=body, headers={"Authorization": f"Bearer {API_KEY}"}
    ) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def test_restart_of_memory_hub_process_reports_recovery_failed() -> None:
    """SIGTERM closes with 1012; the hub restarts on the same port with an empty memory
    broker: the client reconnects, re-subscribes with since, gets ``recovered: false``
    and tells the application."""
    token = mint_token(make_settings().jwt, "alice")
    # The hub advises its restart window in the 1012 reason; the client honours it.
    hp = await asyncio.to_thread(
        start_hub_process,
        {"REVENGE_BROKER_URL": "memory://", "REVENGE_SERVER_RESTART_WINDOW": "0.5"},
    )
    hp2: HubProcess | None = None
    failed: list[str] = []
    try:
        async with (
            aiohttp.ClientSession() as http,
            Client(
                hp.ws_url,
                token=token,
                on_recovery_failed=failed.append,
                restart_window=0.5,
                backoff_min=0.1,
                backoff_max=1.0,
            ) as c,
        ):
            got = collect(c, "test.item")
            closes = collect(c, "client.disconnected")
            await c.subscribe("library:x")
            for i in range(3):
                await _post(
                    http,
                    hp,
                    "/api/v1/realtime/publish",
                    {"channel": "library:x", "type": "test.item", "data": {"i": i}},
                )
            await until(lambda: len(got) == 3, what="3 publications")
            old_epoch = got[-1]["epoch"]
            assert await asyncio.to_thread(hp.stop) == 0
            await until(lambda: bool(closes), what="the 1012 close")
            assert closes[0]["data"]["code"] == 1012
            assert "window=0.5" in closes[0]["data"]["reason"]
            assert closes[0]["data"]["reconnect_in"] <= 0.5
            hp2 = await asyncio.to_thread(start_hub_process, hp.env, hp.port)
            await until(lambda: "library:x" in failed, timeout=20, what="recovered: false")
            await c.wait_connected(10)
            assert c.stats.connects == 2
            # Automatic channels lost their history too.
            assert {"library:x", "user:alice", "notifications:alice"} <= set(failed)
            await _post(
                http,
                hp2,
                "/api/v1/realtime/publish",
                {"channel": "library:x", "type": "test.item", "data": {"i": 3}},
            )
            await until(lambda: len(got) == 4, what="a publication after the restart")
            assert got[-1]["epoch"] != old_epoch and got[-1]["seq"] == 1
    finally:
        hp.stop()
        if hp2 is not None:
            hp2.stop()


@pytest.mark.parametrize(("up", "down"), [(0.25, 0.05), (0.15, 0.15)])
async def test_clock_offset_under_asymmetric_latency(hub: Hub, up: float, down: float) -> None:
    """300 ms RTT: the offset estimate stays within half the asymmetry + 5 ms of the
    true offset (0 here: one machine, one clock)."""
    proxy = FaultProxy(hub.port, up_delay=up, down_delay=down)
    async with proxy, Client(proxy.ws_url, token=hub.token("alice"), initial_pings=0) as c:
        await c.wait_connected(10)
        for _ in range(8):
            await c.ping(timeout=5)
        assert c.rtt is not None and c.rtt >= (up + down) * 1000
        offset = c.clock_offset
        assert offset is not None
        bound = abs(up - down) * 1000 / 2 + 5
        assert abs(offset) <= bound, (offset, bound, c.clock.samples)
        assert abs(c.server_time() - time.time() * 1000) <= bound + 5


async def test_watchdog_reconnects_from_a_silent_server(hub_with: HubWith) -> None:
    env = {"REVENGE_HEARTBEAT_INTERVAL": "0.5", "REVENGE_HEARTBEAT_TIMEOUT": "1.5"}
    async with (
        hub_with(env) as hub,
        FaultProxy(hub.port) as proxy,
        Client(
            proxy.ws_url,
            token=hub.token("alice"),
            connect_timeout=1.0,
            backoff_min=0.05,
            backoff_max=0.3,
        ) as c,
    ):
        got = collect(c, "test.item")
        closes = collect(c, "client.disconnected")
        await c.subscribe("library:x")
        await hub.publish("library:x", "test.item", {"i": 0})
        await until(lambda: len(got) == 1, what="the first publication")
        proxy.pause()  # the link stays up, nothing flows: a silent server
        for i in range(1, 4):
            await hub.publish("library:x", "test.item", {"i": i})
        await until(lambda: bool(closes), timeout=10, what="the watchdog")
        assert c.stats.watchdog_fired >= 1
        assert "watchdog" in closes[0]["data"]["reason"]
        proxy.resume()
        await until(lambda: c.connected and c.stats.connects >= 2, what="the reconnect")
        await until(lambda: len(got) == 4, what="the publications made while silent")
        await asyncio.sleep(0.2)
        assert [m["data"]["i"] for m in got] == [0, 1, 2, 3]


async def test_refused_connections_back_off_then_connect(hub: Hub) -> None:
    async with FaultProxy(hub.port) as proxy:
        proxy.refuse()
        c = Client(proxy.ws_url, token=hub.token("alice"), backoff_min=0.05, backoff_max=0.2)
        async with c:
            await until(lambda: proxy.refused >= 3, what="three refused attempts")
            assert not c.connected and c.error is None
            proxy.accept()
            await c.wait_connected(5)
            assert c.stats.attempts >= 2 and c.stats.connects == 1


async def test_close_while_reconnecting_is_prompt(hub: Hub) -> None:
    async with FaultProxy(hub.port) as proxy:
        c = Client(proxy.ws_url, token=hub.token("alice"), backoff_min=10.0, backoff_max=20.0)
        async with c:
            await c.wait_connected(5)
            proxy.cut()
            await until(lambda: c.state == "waiting", what="the backoff")
            assert c.error is None
        # Leaving the block interrupted the 10 s backoff.
        assert c.state == "closed"
        assert await c.wait_closed(1) is None


async def test_jittered_links_keep_order_and_the_rtt_is_the_least_delayed_ping(hub: Hub) -> None:
    """Random extra delay per chunk (queueing noise): publications still arrive in order and
    exactly once, and the client's rtt is its least delayed ping's."""
    proxy = FaultProxy(hub.port, up_delay=0.01, down_delay=0.01, jitter=0.03, seed=1)
    async with proxy, Client(proxy.ws_url, token=hub.token("alice"), initial_pings=0) as c:
        await c.wait_connected(10)
        got = collect(c, "test.item")
        await c.subscribe("library:j")
        for i in range(100):
            await hub.publish("library:j", "test.item", {"i": i})
        await until(lambda: len(got) == 100, what="100 publications")
        assert [m["data"]["i"] for m in got] == list(range(100))
        assert c.stats.duplicates == 0 and c.stats.gaps == 0
        for _ in range(8):
            await c.ping(timeout=5)
        assert c.rtt == min(s.delay for s in c.clock.samples)
        assert 0 < proxy.max_jitter_seen <= 0.03 and proxy.jittered > 0
