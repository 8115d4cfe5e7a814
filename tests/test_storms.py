"""Connection storms (contract v1.1 §11, §12) with real sockets and real processes:
coalesced presence on ``activity``, restarts that never flap, the bound on handshakes in
progress, and spread windows on every "come back"."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import aiohttp
import pytest

from revenge_ws.client import Client

from .faultproxy import FaultProxy
from .helpers import WS, Hub, free_port, start_hub_process, until
from .redis_fixtures import RedisProcess

HubWith = Callable[..., AbstractAsyncContextManager[Hub]]

#: Presence settings short enough for tests: 0.2 s window, 1 s grace.
FAST = {"REVENGE_ACTIVITY_PRESENCE_WINDOW": "0.2", "REVENGE_ACTIVITY_OFFLINE_GRACE": "1"}


class Watcher:
    """Collects every ``activity.presence`` an observer connection receives."""

    def __init__(self, ws: WS) -> None:
        self.ws = ws
        self.messages: list[dict[str, Any]] = []
        self.types: list[str] = []
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while not self.ws.ws.closed:
            try:
                msg = await self.ws.recv(timeout=120)
            except AssertionError:
                return  # the close frame: the test is over
            self.types.append(msg["type"])
            if msg["type"] == "activity.presence":
                self.messages.append(msg["data"])

    def users(self, key: str) -> list[str]:
        return [u["user_id"] for data in self.messages for u in data[key]]

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self.ws.close()


async def watch(hub: Hub) -> Watcher:
    ws = await hub.connect("watcher")
    ack = await ws.request("subscribe", {"channels": ["activity"]})
    assert ack["type"] == "ack"
    return Watcher(ws)


async def test_first_connection_and_last_close_are_reported_once(hub_with: HubWith) -> None:
    async with hub_with(FAST) as hub:
        w = await watch(hub)
        a1 = await hub.connect("dave", name="Dave")
        a2 = await hub.connect("dave", name="Dave")
        await until(lambda: "dave" in w.users("online"), what="dave online")
        await a1.close()
        await a2.close()
        await until(lambda: "dave" in w.users("offline"), what="dave offline")
        assert w.users("online").count("dave") == 1
        assert w.users("offline") == ["dave"]
        entries = [u for d in w.messages for u in d["online"] if u["user_id"] == "dave"]
        assert entries == [{"user_id": "dave", "name": "Dave"}]
        await w.stop()


async def test_a_reconnect_within_the_grace_is_not_reported(hub_with: HubWith) -> None:
    async with hub_with(FAST) as hub:
        w = await watch(hub)
        ws = await hub.connect("erin")
        await until(lambda: "erin" in w.users("online"), what="erin online")
        await ws.close()
        ws = await hub.connect("erin")  # back well within the 1 s grace
        # Another user's change after the grace proves the feed ran past erin's grace.
        await asyncio.sleep(1.5)
        other = await hub.connect("fred")
        await until(lambda: "fred" in w.users("online"), what="fred online")
        assert "erin" not in w.users("offline")
        assert w.users("online").count("erin") == 1
        await other.close()
        await ws.close()
        await w.stop()


async def test_presence_can_be_switched_off(hub_with: HubWith) -> None:
    async with hub_with({**FAST, "REVENGE_ACTIVITY_PRESENCE": "false"}) as hub:
        w = await watch(hub)
        ws = await hub.connect("gail")
        await ws.close()
        await asyncio.sleep(1.5)  # past the window and the grace
        await hub.publish("activity", "server.event", {"marker": True})
        await until(lambda: "server.event" in w.types, what="the marker")
        assert w.messages == []
        assert not any(t.startswith("activity.") for t in w.types)
        await w.stop()


async def test_500_clients_cost_a_handful_of_presence_publications(hub_with: HubWith) -> None:
    """Contract §11's cost rule: N users connecting within T seconds cause at most about
    T / window presence publications (here ≤ T / window + 2), not N."""
    window = 0.2
    env = {
        **FAST,
        "REVENGE_SERVER_ACCEPT_BURST": "100000",
        # All 500 at once: the bound on handshakes in progress has its own test.
        "REVENGE_SERVER_MAX_PENDING_HANDSHAKES": "1000",
    }
    async with hub_with(env) as hub:
        w = await watch(hub)
        # No connector limit: an open WebSocket holds its connector slot (default 100).
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        hub.sessions.append(session)
        t0 = time.monotonic()
        sockets = await asyncio.gather(
            *(session.ws_connect(f"{hub.ws_url}?token={hub.token(f'u{i}')}") for i in range(500))
        )
        # Every client subscribes to activity too, as the demo page and the apps do.
        for i, ws in enumerate(sockets):
            await ws.send_json(
                {"type": "subscribe", "id": f"s{i}", "data": {"channels": ["activity"]}}
            )

        def accounted() -> int:  # named, or counted in "more"
            return len(w.users("online")) + sum(
                d.get("more", {}).get("online", 0) for d in w.messages
            )

        await until(lambda: accounted() >= 501, timeout=60, what="500 online")
        elapsed = time.monotonic() - t0
        assert len(w.messages) <= elapsed / window + 2, (len(w.messages), elapsed)
        # Each reported once (the watcher's own arrival is the other one); 501 subscribers
        # on activity: a publication names at most 4 MB / (48 B × 501) = 166 users.
        assert accounted() == 501
        assert len(set(w.users("online"))) == len(w.users("online"))
        assert all(len(d["online"]) <= 166 for d in w.messages)
        for ws in sockets:
            await ws.close()
        await w.stop()


async def test_the_handshake_bound_answers_503_before_the_token(hub_with: HubWith) -> None:
    """Two handshakes held in the broker call: the third is refused 503 with
    ``Retry-After`` and the spread window, even with a forged token; once they finish,
    the next one is admitted."""
    async with hub_with({"REVENGE_SERVER_MAX_PENDING_HANDSHAKES": "2"}) as hub:
        node = hub.node
        gate = asyncio.Event()
        add = node.broker.presence.add_connection

        async def held(user_id: str, client_id: str) -> int:
            await asyncio.wait_for(gate.wait(), 10)
            return await add(user_id, client_id)

        node.broker.presence.add_connection = held
        session = await hub.session()
        pending = [
            asyncio.create_task(session.ws_connect(f"{hub.ws_url}?token={hub.token(u)}"))
            for u in ("held1", "held2")
        ]
        await until(
            lambda: node.admission.handshakes.pending == 2, what="two handshakes in progress"
        )
        async with session.get(f"{hub.url}/api/v1/ws?token=forged") as r:
            body = await r.json()
            assert r.status == 503
            assert r.headers["Retry-After"] == "1"
            assert float(r.headers["Reconnect-Window"]) >= 5
        assert body["error"]["code"] == "UNAVAILABLE"
        assert body["error"]["retry_after"] == 1 and body["error"]["window"] >= 5
        assert node.admission.handshakes.refused == 1
        gate.set()
        for ws in await asyncio.gather(*pending):
            assert (await ws.receive_json(timeout=5))["type"] == "welcome"
            await ws.close()
        assert node.admission.handshakes.pending == 0
        ws = await hub.connect("after")
        await ws.close()


@pytest.mark.parametrize("engine", ["direct", "aiohttp"])
async def test_nothing_is_done_for_a_client_that_left(hub_with: HubWith, engine: str) -> None:
    async with hub_with({"REVENGE_SERVER_WS_ENGINE": engine}) as hub:
        node = hub.node
        gate = asyncio.Event()
        entered = asyncio.Event()
        get_value = node.broker.get_value

        async def held(key: str) -> str | None:
            if key.startswith("revoked:quitter"):
                entered.set()
                await asyncio.wait_for(gate.wait(), 10)
            return await get_value(key)

        node.broker.get_value = held
        opened: list[str] = []
        node.on_connect.append(lambda conn: _record(opened, conn.user_id))
        reader, writer = await asyncio.open_connection("127.0.0.1", hub.port)
        writer.write(
            (
                f"GET /api/v1/ws?token={hub.token('quitter')} HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{hub.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        await writer.drain()
        await asyncio.wait_for(entered.wait(), 5)
        writer.close()  # the client gives up while its handshake is in progress
        await asyncio.sleep(1.0)  # time for the hub to see the socket close
        gate.set()
        await until(lambda: node.admission.handshakes.pending == 0, what="the handshake given up")
        assert await node.broker.presence.connection_count("quitter") == 0
        assert opened == [] and len(node.hub) == 0
        assert await reader.read() == b""


async def _record(into: list[str], user: str) -> None:
    into.append(user)


@pytest.mark.parametrize(
    ("code", "reason", "advised"),
    [
        (4002, "slow consumer", True),
        (4003, "heartbeat timeout", True),
        (4004, "rate limited", True),
        (1012, "restart", True),
        (4503, "bye", False),
    ],
)
async def test_come_back_closes_advise_the_spread_window(
    hub_with: HubWith, code: int, reason: str, advised: bool
) -> None:
    async with hub_with({"REVENGE_SERVER_RESTART_WINDOW": "7"}) as hub:
        ws = await hub.connect("hank")
        conn = next(iter(hub.node.hub.user_connections("hank")))
        hub.node.close_connection(conn, code, reason)
        msg = await ws.ws.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == code
        assert msg.extra == (f"{reason}; window=7" if advised else reason)


# -- restarts ------------------------------------------------------------------------------
async def _clients(url: str, users: list[str], tokens: dict[str, str]) -> list[Client]:
    clients = [Client(url, token=tokens[u], restart_window=0.5) for u in users]
    for c in clients:
        await c.start()
    for c in clients:
        await c.wait_connected(10)
    return clients


async def test_a_restart_never_reports_reconnecting_users_offline() -> None:
    """SIGTERM and a new hub on the same port (memory broker): every client comes back,
    and nobody is reported offline, during the restart or after the grace."""
    from .helpers import make_settings

    port = free_port()
    env = {**FAST, "REVENGE_SERVER_RESTART_WINDOW": "0.5"}
    hub = start_hub_process(env, port=port)
    settings = make_settings()
    from revenge_ws.auth import mint_token

    users = [f"r{i}" for i in range(20)]
    tokens = {u: mint_token(settings.jwt, u) for u in [*users, "watcher"]}
    url = f"ws://127.0.0.1:{port}/api/v1/ws"
    seen: list[dict[str, Any]] = []
    watcher = Client(url, token=tokens["watcher"], restart_window=0.5)
    watcher.on("activity.presence", lambda msg: seen.append(msg["data"]))
    clients: list[Client] = []
    try:
        await watcher.start()
        await watcher.wait_connected(10)
        await watcher.subscribe("activity")
        clients = await _clients(url, users, tokens)
        online = lambda: {u["user_id"] for d in seen for u in d["online"]}  # noqa: E731
        await until(lambda: set(users) <= online(), what="everyone online")
        connects = [c.stats.connects for c in clients]
        assert hub.stop() == 0
        hub = start_hub_process(env, port=port)
        back = list(zip(clients, connects, strict=True))
        await until(
            lambda: all(c.stats.connects > n and c.connected for c, n in back),
            timeout=30,
            what="every client back",
        )
        await asyncio.sleep(2.0)  # past the 1 s grace and a window
        offline = {u["user_id"] for d in seen for u in d["offline"]}
        assert offline & set(users) == set()
    finally:
        for c in [*clients, watcher]:
            await c.close()
        hub.stop(signal.SIGKILL)


@pytest.mark.redis
async def test_users_moving_to_another_node_are_neither_offline_nor_online_again(
    redis_proc: RedisProcess,
) -> None:
    """Two nodes on one Redis: node A stops (SIGTERM); its users reconnect to node B.
    Nobody is reported offline, and node B does not announce them again."""
    from revenge_ws.auth import mint_token

    from .helpers import make_settings

    # A grace long enough for a loaded machine: the users must be back within it.
    env = {
        **FAST,
        "REVENGE_ACTIVITY_OFFLINE_GRACE": "5",
        "REVENGE_BROKER_URL": redis_proc.url,
        "REVENGE_SERVER_RESTART_WINDOW": "0.5",
    }
    a = start_hub_process({**env, "REVENGE_NODE_ID": "a"})
    b = start_hub_process({**env, "REVENGE_NODE_ID": "b"})
    settings = make_settings()
    users = [f"m{i}" for i in range(10)]
    tokens = {u: mint_token(settings.jwt, u) for u in [*users, "watcher"]}
    seen: list[dict[str, Any]] = []
    watcher = Client(b.ws_url, token=tokens["watcher"])
    watcher.on("activity.presence", lambda msg: seen.append(msg["data"]))
    clients: list[Client] = []
    # The balancer in front of the nodes: node A, then node B once A is gone.
    balancer = await FaultProxy(a.port).start()
    try:
        await watcher.start()
        await watcher.wait_connected(10)
        await watcher.subscribe("activity")
        clients = await _clients(balancer.ws_url, users, tokens)
        online = lambda: [u["user_id"] for d in seen for u in d["online"]]  # noqa: E731
        await until(lambda: set(users) <= set(online()), what="everyone online")
        connects = [c.stats.connects for c in clients]
        balancer.target = ("127.0.0.1", b.port)
        assert a.stop() == 0
        back = list(zip(clients, connects, strict=True))
        await until(
            lambda: all(c.stats.connects > n and c.connected for c, n in back),
            timeout=30,
            what="every client on node B",
        )
        # Node A's entries left with it (one pipelined pass when its broker closed):
        # each user counts the one connection on node B.
        import redis

        r = redis.Redis.from_url(redis_proc.url)
        try:
            assert [r.zcard(f"revenge:conns:{u}") for u in users] == [1] * len(users)
        finally:
            r.close()
        await asyncio.sleep(6.0)  # past the 5 s grace and a window
        assert {u["user_id"] for d in seen for u in d["offline"]} & set(users) == set()
        # Announced once, by node A (and the watcher itself, by node B).
        assert sorted(online()) == sorted([*users, "watcher"])
    finally:
        for c in [*clients, watcher]:
            await c.close()
        await balancer.stop()
        for node in (a, b):
            node.stop(signal.SIGKILL)


async def test_during_a_storm_shared_publications_linger_and_replies_take_them_along(
    hub_with: HubWith,
) -> None:
    """A storm (here: 3 handshakes within a second) makes library publications wait in the
    outbox (``server.storm_linger``) for the next write; a user's own channel does not
    wait, and a reply carries what waited, in order."""
    env = {"REVENGE_SERVER_STORM_HANDSHAKES": "3", "REVENGE_SERVER_STORM_LINGER": "5"}
    async with hub_with(env) as hub:
        alice = await hub.connect("alice")
        others = [await hub.connect(f"u{i}") for i in range(2)]
        assert hub.node.admission.storm.storming(time.monotonic())
        ack = await alice.request("subscribe", {"channels": ["library:l1"]})
        assert ack["type"] == "ack"
        (conn,) = hub.node.hub.user_connections("alice")

        status, _ = await hub.publish("library:l1", "library.changed", {"n": 1})
        assert status == 200
        assert conn._lazy_pending and len(conn.outbox) == 1  # waits for the linger

        status, _ = await hub.publish("user:alice", "user.updated", {"n": 2})
        assert status == 200
        assert not conn._lazy_pending  # not a shared channel: flushed now, with the other
        first = await alice.recv(timeout=3)
        second = await alice.recv(timeout=3)
        assert [first["type"], second["type"]] == ["library.changed", "user.updated"]

        await hub.publish("library:l1", "library.changed", {"n": 3})
        assert conn._lazy_pending
        ack = await alice.request("subscribe", {"channels": ["library:l2"]})
        assert ack["type"] == "ack"  # the publication came first: request() kept it aside
        assert [m["data"] for m in alice.backlog] == [{"n": 3}]
        for ws in [alice, *others]:
            await ws.close()


async def test_the_connection_log_summarizes_a_storm(caplog: pytest.LogCaptureFixture) -> None:
    """One line per connect and disconnect, except during a storm: then one summary line
    per second with the counts and close codes; per-connection lines come back after."""
    import logging

    from revenge_ws.core.connlog import ConnectionLog

    storm = [False]
    clog = ConnectionLog(lambda now: storm[0])
    caplog.set_level(logging.INFO, logger="revenge_ws.connections")
    clog.connected("alice", "s1")
    clog.disconnected("alice", "s1", 1000, 2.5)
    assert [r.event for r in caplog.records] == ["connect", "disconnect"]  # type: ignore[attr-defined]
    caplog.clear()

    storm[0] = True
    for i in range(300):
        clog.connected(f"u{i}", f"s{i}")
    for i in range(120):
        clog.disconnected(f"u{i}", f"s{i}", 1012 if i % 2 else None, 1.0)
    assert caplog.records == []
    clog.flush()
    (summary,) = caplog.records
    assert summary.event == "connections_summary"  # type: ignore[attr-defined]
    assert (summary.connects, summary.disconnects) == (300, 120)  # type: ignore[attr-defined]
    assert summary.close_codes == {"1012": 60, "None": 60}  # type: ignore[attr-defined]
    assert "alice" not in summary.getMessage()
    caplog.clear()
    clog.flush()  # nothing counted since: no line
    assert caplog.records == []

    storm[0] = False
    clog.connected("bob", "s9")
    clog.close()
    assert [r.event for r in caplog.records] == ["connect"]  # type: ignore[attr-defined]


def test_the_handshake_bound_follows_the_node_pace() -> None:
    """At least the configured bound; after a second of N completed handshakes, about
    HANDSHAKE_QUEUE × N (at most MAX_PENDING); back to the base after an idle second."""
    from revenge_ws.core.admission import HANDSHAKE_QUEUE, MAX_PENDING, HandshakeGate

    gate = HandshakeGate(10)
    for i in range(400):  # 400 completed within the second from t=0
        assert gate.enter()
        gate.leave(0.0025 * i)
    assert gate.limit == 10  # the second has not ended yet
    gate.enter()
    gate.leave(1.0)
    assert gate.limit == int(400 * HANDSHAKE_QUEUE)
    assert [gate.enter() for _ in range(gate.limit + 1)][-1] is False  # refused past it
    assert gate.refused == 1
    for _ in range(gate.pending):
        gate.leave()  # no time given: not counted
    for i in range(5000):
        gate.enter()
        gate.leave(1.0 + 0.0001 * i)
    gate.leave(2.0)
    assert gate.limit == MAX_PENDING
    gate.leave(10.0)  # idle for seconds: the pace is unknown again
    assert gate.limit == 10


async def test_a_connect_hook_too_slow_in_a_storm_is_a_warning_not_an_error(
    hub_with: HubWith, caplog: pytest.LogCaptureFixture
) -> None:
    """A connect hook that times out (a store queue in a storm) leaves the connection
    served and logs one warning that says "timeout", without a traceback."""
    import logging

    async with hub_with() as hub:

        async def slow(conn: Any) -> None:
            raise TimeoutError

        hub.node.on_connect.append(slow)
        caplog.set_level(logging.WARNING, logger="revenge_ws.node")
        ws = await hub.connect("alice")
        ack = await ws.request("subscribe", {"channels": ["library:l1"]})
        assert ack["type"] == "ack"
        await until(lambda: any("connect hook" in r.getMessage() for r in caplog.records))
        (record,) = [r for r in caplog.records if "connect hook" in r.getMessage()]
        assert record.levelno == logging.WARNING and record.exc_info is None
        assert record.getMessage().endswith(": timeout")
        await ws.close()


def test_the_storm_meter_counts_whole_seconds_and_holds() -> None:
    from revenge_ws.core.admission import StormMeter

    meter = StormMeter(rate=3, hold=2.0)
    for t in (0.0, 0.5, 1.2, 1.9):  # never 3 within a second counted from its first
        meter.handshake(t)
    assert not meter.storming(2.0)
    for t in (2.5, 2.6, 2.7):  # the count from 2.5 reaches 3: a storm until 3.5 + 2
        meter.handshake(t)
    assert meter.storming(2.7) and meter.storming(5.4)
    assert not meter.storming(5.5)
    for t in (10.0, 10.1, 10.2):
        meter.handshake(t)
    assert meter.storming(12.9) and not meter.storming(13.0)


def test_the_lag_meter_keeps_the_worst_lateness_of_its_horizon() -> None:
    from revenge_ws.core.admission import LagMeter

    meter = LagMeter(limit=0.5, horizon=1.0)
    assert not meter.overloaded(0.0)
    meter.record(0.8, 10.0)  # one late wake-up
    meter.record(0.01, 10.5)  # a prompt one does not hide it
    assert meter.lag(10.5) == 0.8 and meter.overloaded(10.5)
    assert not meter.overloaded(11.2)  # past the horizon
    meter.record(0.02, 11.3)
    assert meter.lag(11.3) == 0.02
    assert not LagMeter(limit=0.0).overloaded(0.0)  # 0: never overloaded
    off = LagMeter(limit=0.0)
    off.record(100.0, 1.0)
    assert not off.overloaded(1.0)


async def test_an_overloaded_node_answers_503_before_the_token(hub_with: HubWith) -> None:
    """The node's loop runs late: new handshakes are refused at once, forged or not."""
    async with hub_with({"REVENGE_SERVER_MAX_LOOP_LAG": "0.2"}) as hub:
        node = hub.node
        loop = asyncio.get_running_loop()
        node.admission.lag.record(5.0, loop.time())  # as the probe records a stall
        session = await hub.session()
        async with session.get(f"{hub.url}/api/v1/ws?token=forged") as r:
            body = await r.json()
            assert r.status == 503 and r.headers["Retry-After"] == "1"
        assert body["error"]["message"] == "the node is overloaded, retry later"
        assert node.admission.handshakes.pending == 0
        node.admission.lag.record(0.0, loop.time() + 2)  # the horizon passed
        await until(lambda: not node.admission.overloaded(), what="the stall forgotten")
        ws = await hub.connect("after-the-stall")
        await ws.close()
