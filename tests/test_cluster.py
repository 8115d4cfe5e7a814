"""Many nodes act as one hub through Redis: 2–3 real hub processes and a private
redis-server. Cross-node delivery, recovery, presence, the cluster-wide connection limit,
SyncPlay rooms, a node killed with SIGKILL, and a Redis outage with no silent gap."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from revenge_ws.client import Client

from .helpers import API_KEY, HubProcess, make_settings, start_hub_process
from .redis_fixtures import RedisProcess

pytestmark = pytest.mark.redis


def start_nodes(redis: RedisProcess, pg: str, n: int, **env: str) -> list[HubProcess]:
    nodes: list[HubProcess] = []
    try:
        for i in range(n):
            nodes.append(
                start_hub_process(
                    {
                        "REVENGE_BROKER_URL": redis.url,
                        "REVENGE_STORE_URL": pg,
                        "REVENGE_NODE_ID": f"node{i}",
                        "REVENGE_BROKER_TIMEOUT": "1",
                        **env,
                    }
                )
            )
    except BaseException:
        for node in nodes:
            node.stop(signal.SIGKILL)
        raise
    return nodes


@contextlib.contextmanager
def cluster(redis: RedisProcess, pg: str, n: int = 3, **env: str) -> Iterator[list[HubProcess]]:
    nodes = start_nodes(redis, pg, n, **env)
    try:
        yield nodes
    finally:
        for node in nodes:
            node.stop()
        for node in nodes:
            assert "Traceback" not in node.log(), node.log()


def token(sub: str, **kw: Any) -> str:
    from revenge_ws.auth import mint_token

    return mint_token(make_settings().jwt, sub, **kw)


async def ws_connect(
    s: aiohttp.ClientSession, node: HubProcess, sub: str
) -> aiohttp.ClientWebSocketResponse:
    ws = await s.ws_connect(f"{node.ws_url}?token={token(sub)}")
    assert (await ws.receive_json(timeout=5))["type"] == "welcome"
    return ws


#: Messages read while waiting for a reply, per socket: next_of() sees them first.
BACKLOG: dict[int, list[dict[str, Any]]] = {}


async def request(
    ws: aiohttp.ClientWebSocketResponse, mtype: str, data: dict[str, Any], mid: str
) -> dict[str, Any]:
    await ws.send_json({"type": mtype, "id": mid, "data": data})
    for _ in range(50):
        msg = await ws.receive_json(timeout=5)
        if msg.get("id") == mid:
            return msg
        BACKLOG.setdefault(id(ws), []).append(msg)
    raise AssertionError("no reply")


async def next_of(
    ws: aiohttp.ClientWebSocketResponse, mtype: str, timeout: float = 5
) -> dict[str, Any]:
    backlog = BACKLOG.setdefault(id(ws), [])
    while backlog:
        msg = backlog.pop(0)
        if msg["type"] == mtype:
            return msg
    for _ in range(100):
        msg = await ws.receive_json(timeout=timeout)
        if msg["type"] == mtype:
            return msg
    raise AssertionError(f"no {mtype}")


async def publish(
    s: aiohttp.ClientSession, node: HubProcess, channel: str, i: int
) -> tuple[int, Any]:
    async with s.post(
        f"{node.url}/api/v1/realtime/publish",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"channel": channel, "type": "test.item", "data": {"i": i}},
    ) as r:
        return r.status, await r.json()


async def test_cross_node_delivery_recovery_presence(
    redis_proc: RedisProcess, pg_database: str
) -> None:
    with cluster(redis_proc, pg_database) as (n0, n1, n2):
        async with aiohttp.ClientSession() as s:
            a = await ws_connect(s, n0, "alice")
            b = await ws_connect(s, n1, "bob")
            for ws in (a, b):
                ack = await request(ws, "subscribe", {"channels": ["library:x"]}, "s1")
                assert ack["type"] == "ack"
            status, first = await publish(s, n2, "library:x", 1)
            assert status == 200
            got = [await next_of(ws, "test.item") for ws in (a, b)]
            assert got[0]["seq"] == got[1]["seq"] == first["seq"]
            assert got[0]["epoch"] == got[1]["epoch"] == first["epoch"]
            # Presence is cluster-wide.
            async with s.get(
                f"{n2.url}/api/v1/realtime/presence/library:x",
                headers={"Authorization": f"Bearer {API_KEY}"},
            ) as r:
                members = {m["user_id"] for m in (await r.json())["members"]}
            assert members == {"alice", "bob"}
            # Alice leaves; three publications later she recovers them on another node.
            await a.close()
            for i in range(2, 5):
                assert (await publish(s, n2, "library:x", i))[0] == 200
            a2 = await ws_connect(s, n1, "alice")
            since = {"epoch": first["epoch"], "seq": first["seq"]}
            ack = await request(
                a2, "subscribe", {"channels": [{"name": "library:x", "since": since}]}, "s2"
            )
            entry = ack["data"]["subscriptions"][0]
            assert entry["recovered"] is True and entry["missed"] == 3
            seqs = [(await next_of(a2, "test.item"))["seq"] for _ in range(3)]
            assert seqs == [first["seq"] + 1, first["seq"] + 2, first["seq"] + 3]
            # A notification stored through node 2 reaches bob on node 1.
            async with s.post(
                f"{n2.url}/api/v1/realtime/notify",
                headers={"Authorization": f"Bearer {API_KEY}"},
                json={"user_id": "bob", "notification_type": "content.new_movie", "title": "x"},
            ) as r:
                ids = (await r.json())["ids"]
            assert (await next_of(b, "notification"))["data"]["id"] == ids[0]
            await a2.close()
            await b.close()


async def test_cluster_wide_connection_limit_and_disconnect(
    redis_proc: RedisProcess, pg_database: str
) -> None:
    with cluster(redis_proc, pg_database, REVENGE_LIMITS_CONNECTIONS_PER_USER="2") as (n0, n1, n2):
        async with aiohttp.ClientSession() as s:
            one = await ws_connect(s, n0, "carol")
            two = await ws_connect(s, n1, "carol")
            async with s.get(f"{n2.url}/api/v1/ws?token={token('carol')}", headers={
                "Upgrade": "websocket", "Connection": "Upgrade",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13",
            }) as r:  # fmt: skip
                assert r.status == 429
            # Disconnect through node 2 reaches carol on nodes 0 and 1.
            async with s.post(
                f"{n2.url}/api/v1/realtime/disconnect",
                headers={"Authorization": f"Bearer {API_KEY}"},
                json={"user_id": "carol"},
            ) as r:
                assert r.status == 200
            for ws in (one, two):
                msg = await ws.receive(timeout=5)
                # The close frame's code (aiohttp's close_code may read 1006 when the
                # server drops TCP before the client's reply went out).
                assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 4503


class Balancer:
    """A TCP load balancer on 127.0.0.1: each new connection goes to the first backend
    that accepts it, so a dead node's clients land on a live one."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Balancer:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)

    def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for port in self.ports:
            try:
                ur, uw = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
                break
            except (OSError, TimeoutError):
                continue
        else:
            writer.close()
            return

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                for _ in range(1_000_000):
                    data = await r.read(65536)
                    if not data:
                        break
                    w.write(data)
                    await w.drain()
            with contextlib.suppress(OSError):
                w.close()

        try:
            await asyncio.gather(pipe(reader, uw), pipe(ur, writer))
        finally:
            for w in (writer, uw):
                with contextlib.suppress(OSError):
                    w.close()


async def test_node_kill_clients_move_and_recover(
    redis_proc: RedisProcess, pg_database: str
) -> None:
    with cluster(redis_proc, pg_database, n=2) as (n0, n1):
        async with Balancer([n0.port, n1.port]) as lb, aiohttp.ClientSession() as s:
            failed: list[str] = []
            async with Client(
                f"ws://127.0.0.1:{lb.port}/api/v1/ws",
                token=token("dave"),
                on_recovery_failed=failed.append,
                backoff_min=0.1,
                backoff_max=0.5,
            ) as c:
                welcome = await c.wait_connected(10)
                assert welcome.get("node_id", welcome.get("data", {}).get("node_id")) == "node0"
                got: list[int] = []
                c.on("test.item", lambda msg: got.append(msg["seq"]))
                await c.subscribe("library:k")
                for i in range(5):
                    assert (await publish(s, n1, "library:k", i))[0] == 200
                for _ in range(100):
                    if len(got) == 5:
                        break
                    await asyncio.sleep(0.05)
                n0.stop(signal.SIGKILL)
                for i in range(5, 10):
                    assert (await publish(s, n1, "library:k", i))[0] == 200
                for _ in range(200):
                    if len(got) == 10 and c.connected:
                        break
                    await asyncio.sleep(0.05)
                assert got == list(range(1, 11))
                assert failed == []
                welcome = await c.wait_connected(5)
                assert welcome.get("node_id", welcome.get("data", {}).get("node_id")) == "node1"


async def test_syncplay_room_survives_its_node(redis_proc: RedisProcess, pg_database: str) -> None:
    with cluster(redis_proc, pg_database, n=2) as (n0, n1):
        async with aiohttp.ClientSession() as s:
            a = await ws_connect(s, n0, "alice")
            b = await ws_connect(s, n1, "bob")
            made = await request(
                a,
                "syncplay.create",
                {"name": "R", "content": {"type": "movie", "id": "m"}, "public": True},
                "c",
            )
            rid = made["data"]["room"]["room_id"]
            joined = await request(b, "syncplay.join", {"room_id": rid}, "j")
            assert joined["type"] == "ack"
            assert (await next_of(a, "syncplay.member_joined"))["data"]["user_id"] == "bob"
            n0.stop(signal.SIGKILL)
            # The room lives in Redis: bob still controls it through node 1.
            await request(b, "syncplay.ready", {"room_id": rid, "position": 0}, "r")
            ack = await request(b, "syncplay.seek", {"room_id": rid, "position": 10.0}, "k")
            assert ack["type"] == "ack", ack
            cmd = await next_of(b, "syncplay.command")
            assert cmd["data"]["command"] == "seek" and cmd["data"]["position"] == 10.0
            async with s.get(
                f"{n1.url}/api/v1/syncplay/rooms/{rid}",
                headers={"Authorization": f"Bearer {token('bob')}"},
            ) as r:
                assert r.status == 200
                assert {m["user_id"] for m in (await r.json())["members"]} >= {"bob"}
            await b.close()
            await a.close()


async def test_redis_outage_no_silent_gap(redis_proc: RedisProcess, pg_database: str) -> None:
    with cluster(redis_proc, pg_database, n=2) as (n0, n1):
        async with aiohttp.ClientSession() as s:
            ws = await ws_connect(s, n0, "erin")
            await request(ws, "subscribe", {"channels": ["library:o"]}, "s")
            status, first = await publish(s, n1, "library:o", 1)
            assert status == 200
            assert (await next_of(ws, "test.item"))["seq"] == first["seq"]
            redis_proc.stop()
            try:
                # During the outage: fail fast, readiness says so, the socket stays open.
                status, err = await publish(s, n1, "library:o", 2)
                assert (status, err["error"]["code"]) == (503, "UNAVAILABLE")
                async with s.get(f"{n0.url}/readyz") as r:
                    assert r.status == 503
                await asyncio.sleep(5)
                assert not ws.closed
            finally:
                redis_proc.proc = None
                redis_proc.start()  # same port, every key lost
            # Back: nodes reconnect; the lost history is a new epoch, never a silent gap.
            for _ in range(100):
                status, body = await publish(s, n1, "library:o", 3)
                if status == 200:
                    break
                await asyncio.sleep(0.1)
            assert status == 200 and body["epoch"] != first["epoch"]
            # Every channel of the connection is told, automatic ones included.
            resets = set()
            for _ in range(5):
                reset = await next_of(ws, "subscription.reset", timeout=10)
                resets.add(reset["data"]["channel"])
                if "library:o" in resets:
                    break
            assert "library:o" in resets
            assert (await request(ws, "ping", {"t0": 0}, "p"))["type"] == "pong"
            for _ in range(100):
                async with s.get(f"{n0.url}/readyz") as r:
                    if r.status == 200:
                        break
                await asyncio.sleep(0.1)
            assert r.status == 200
            await ws.close()
