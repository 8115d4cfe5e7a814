"""Faults: SIGTERM and SIGKILL of a hub process under traffic (SQLite
file), SIGKILL of one of two nodes (Redis + PostgreSQL), a PostgreSQL outage and a Redis
outage (TCP proxies cut and restored), revocation across two nodes.

The invariant throughout: a notification the API accepted (200 with ids) is in the store
afterwards; every other answer is a 503 UNAVAILABLE or a refused/dropped connection.
Figures: ``docs/reliability.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import orjson
import pytest

from revenge_ws.auth import mint_token
from revenge_ws.codes import CloseCode

from .faultproxy import FaultProxy
from .helpers import API_KEY, HubProcess, make_settings, redis_server, running_hub
from .helpers import start_hub_process as _start_hub_process
from .test_ws import UPGRADE

JWT = make_settings().jwt
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CONN_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError)


def token(sub: str, **kw: Any) -> str:
    return mint_token(JWT, sub, **kw)


async def start_hub_process(env: dict[str, str], port: int | None = None) -> HubProcess:
    return await asyncio.to_thread(_start_hub_process, env, port)


class Ledger:
    """What a hammering publisher was told: accepted ids, refusals, dropped requests."""

    def __init__(self) -> None:
        self.accepted: dict[str, str] = {}  # notification id -> user id
        self.statuses: dict[int | str, int] = {}
        self.bad: list[Any] = []

    def note(self, status: int | str) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)


async def hammer(
    s: aiohttp.ClientSession,
    url: str,
    users: list[str],
    ledger: Ledger,
    *,
    worker: int,
    stop: asyncio.Event,
    max_requests: int = 3000,
    give_up_after: int = 5,
) -> None:
    """POST /notify in a loop until ``stop`` is set and ``give_up_after`` requests in a row
    failed at the connection level (the hub is gone), or ``max_requests``."""
    failures = 0
    for i in range(max_requests):
        if stop.is_set() and failures >= give_up_after:
            return
        user = users[(worker + i) % len(users)]
        body = {"user_id": user, "notification_type": "test.fault", "title": f"w{worker}-{i}"}
        try:
            async with s.post(
                f"{url}/api/v1/realtime/notify",
                json=body,
                headers=AUTH,
                timeout=aiohttp.ClientTimeout(total=15),
            ) as r:
                data = await r.json(content_type=None)
                ledger.note(r.status)
                if r.status == 200:
                    for nid in data["ids"]:
                        ledger.accepted[nid] = user
                    failures = 0
                elif not (r.status == 503 and data["error"]["code"] == "UNAVAILABLE"):
                    ledger.bad.append((r.status, data))
        except CONN_ERRORS as exc:
            ledger.note(type(exc).__name__)
            failures += 1
            if stop.is_set():
                await asyncio.sleep(0.05)


def sqlite_ids(db: Path) -> tuple[str, set[str]]:
    conn = sqlite3.connect(db)
    try:
        check = conn.execute("PRAGMA integrity_check").fetchone()[0]
        ids = {row[0] for row in conn.execute("SELECT id FROM notifications")}
    finally:
        conn.close()
    return check, ids


async def watch(ws: aiohttp.ClientWebSocketResponse) -> tuple[int | None, list[str]]:
    """Read until the socket ends; (close code, notification ids seen)."""
    seen: list[str] = []
    while True:
        msg = await ws.receive(timeout=30)
        if msg.type is aiohttp.WSMsgType.TEXT:
            data = orjson.loads(msg.data)
            if data["type"] == "notification":
                seen.append(data["data"]["id"])
            continue
        code = ws.close_code
        await ws.close()  # releases the client connection (also after an abnormal end)
        return code, seen


async def redelivered(url: str, user: str, want: int) -> list[str]:
    async with (
        aiohttp.ClientSession() as s,
        s.ws_connect(f"{url}/api/v1/ws?token={token(user)}") as ws,
    ):
        got: list[str] = []
        with contextlib.suppress(TimeoutError):
            while len(got) < want:
                data = orjson.loads((await ws.receive(timeout=3)).data)
                if data["type"] == "notification":
                    got.append(data["data"]["id"])
        return got


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
async def test_signal_during_traffic_loses_no_accepted_notification(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """A hub process with a SQLite file, 20 WebSocket clients, 4 publishers hammering
    /notify; the signal arrives after 150 accepted notifications. SIGTERM: every client is
    told 1012 and the process exits 0. Both: every id of a 200 answer is in the (intact)
    database, the others were 503 or dropped connections, and a restart on the same file
    redelivers them."""
    db = tmp_path / "hub.db"
    env = {"REVENGE_STORE_URL": f"sqlite:///{db}"}
    hp = await start_hub_process(env)
    users = [f"u{i}" for i in range(20)]
    ledger = Ledger()
    try:
        async with aiohttp.ClientSession() as s:
            sockets = []
            for u in users:
                ws = await s.ws_connect(f"{hp.ws_url}?token={token(u)}")
                assert orjson.loads((await ws.receive(timeout=5)).data)["type"] == "welcome"
                sockets.append(ws)
            watchers = [asyncio.create_task(watch(ws)) for ws in sockets]
            stop = asyncio.Event()
            workers = [
                asyncio.create_task(hammer(s, hp.url, users, ledger, worker=w, stop=stop))
                for w in range(4)
            ]
            for _ in range(600):  # at most 30 s
                if ledger.ok >= 150 or any(w.done() for w in workers):
                    break
                await asyncio.sleep(0.05)
            assert ledger.ok >= 150, ledger.statuses
            hp.proc.send_signal(sig)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*workers), 60)
            seen = await asyncio.wait_for(asyncio.gather(*watchers), 30)
        rc = await asyncio.to_thread(hp.proc.wait, 20)
        codes = [code for code, _ in seen]
        if sig == signal.SIGTERM:
            assert rc == 0, hp.log()[-3000:]
            assert codes == [CloseCode.SERVICE_RESTART] * len(users), codes
            assert "Traceback" not in hp.log()
        else:
            assert rc == -signal.SIGKILL
            assert all(code in (None, 1006) for code in codes), codes
        assert not ledger.bad, ledger.bad[:5]
        assert set(ledger.statuses) <= {200, 503} | {e.__name__ for e in _conn_error_types()}
        check, stored = await asyncio.to_thread(sqlite_ids, db)
        assert check == "ok"
        missing = set(ledger.accepted) - stored
        assert not missing, f"{len(missing)} accepted notifications lost"
        print(
            f"\n{sig.name}: answers {ledger.statuses}; {len(ledger.accepted)} accepted, "
            f"{len(stored)} stored, 0 lost; closes {sorted(set(codes), key=str)}"
        )
        # A restart on the same file works and redelivers what was accepted (unacked).
        hp2 = await start_hub_process(env, port=hp.port)
        try:
            user = users[0]
            mine = {n for n, u in ledger.accepted.items() if u == user}
            got = await redelivered(hp2.url, user, len(mine))
            assert mine <= set(got), (len(mine), len(got))
        finally:
            assert await asyncio.to_thread(hp2.stop) == 0
    finally:
        await asyncio.to_thread(hp.stop, signal.SIGKILL)


def _conn_error_types() -> list[type[BaseException]]:
    return [
        aiohttp.ClientConnectorError,
        aiohttp.ClientConnectionError,
        aiohttp.ServerDisconnectedError,
        aiohttp.ClientOSError,
        aiohttp.ClientConnectionResetError,
        aiohttp.ClientPayloadError,
        aiohttp.ClientConnectorDNSError,
        TimeoutError,
    ]


# -- PostgreSQL outage -------------------------------------------------------------------------
def via_proxy(dsn: str, port: int) -> str:
    parts = urlsplit(dsn)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


@contextlib.asynccontextmanager
async def pg_proxy(dsn: str) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(urlsplit(dsn).port or 5432) as proxy:
        yield proxy


async def pg_ids(dsn: str, ids: list[str]) -> set[str]:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        rows = await conn.fetch("SELECT id FROM revenge_ws.notifications WHERE id = ANY($1)", ids)
    finally:
        await conn.close()
    return {r["id"] for r in rows}


@pytest.mark.postgres
@pytest.mark.slow
async def test_postgres_outage_never_loses_an_accepted_notification(
    pg_database: str,
) -> None:
    """A hub whose PostgreSQL is behind a TCP proxy: 4 publishers hammer /notify while the
    proxy cuts every link and refuses new ones for 2 s, then lets them through again.
    During the cut /notify answers 503 UNAVAILABLE, /readyz 503, and a connected client's
    ``notification.list`` gets a retryable UNAVAILABLE; the WebSocket stays open and new
    ones are still accepted. Afterwards every id of a 200 answer is in PostgreSQL."""
    async with pg_proxy(pg_database) as proxy:
        settings = make_settings({"REVENGE_STORE_URL": via_proxy(pg_database, proxy.port)})
        async with running_hub(settings) as hub:
            ws = await hub.connect("carol")
            s = await hub.session()
            users = [f"p{i}" for i in range(10)]
            ledger = Ledger()
            stop = asyncio.Event()
            workers = [
                asyncio.create_task(
                    hammer(
                        s,
                        hub.url,
                        users,
                        ledger,
                        worker=w,
                        stop=stop,
                        max_requests=100_000,
                        give_up_after=0,
                    )
                )
                for w in range(4)
            ]
            for _ in range(400):
                if ledger.ok >= 50:
                    break
                await asyncio.sleep(0.05)
            assert ledger.ok >= 50, ledger.statuses
            proxy.refuse()
            cut = proxy.cut()
            # Requests in flight at the cut finish first (committed: 200, or 503).
            await asyncio.sleep(0.5)
            before = dict(ledger.statuses)
            await asyncio.sleep(0.5)
            status, ready = await hub.request("GET", "/readyz")
            assert status == 503 and ready["checks"]["store"].startswith("unavailable"), ready
            listed = await ws.request("notification.list", {"limit": 5})
            assert listed["type"] == "error" and listed["data"]["code"] == "UNAVAILABLE"
            assert listed["data"]["retryable"] is True
            late = await hub.connect("dave")  # handshakes do not need the store
            assert late.welcome["type"] == "welcome"
            await asyncio.sleep(1.0)
            during = {k: v - before.get(k, 0) for k, v in ledger.statuses.items()}
            proxy.accept()
            for _ in range(200):  # until the store answers again (at most 10 s)
                if (await hub.request("GET", "/readyz"))[0] == 200:
                    break
                await asyncio.sleep(0.05)
            after_ok = ledger.ok
            for _ in range(200):
                if ledger.ok >= after_ok + 50:
                    break
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*workers), 30)
            assert ledger.ok >= after_ok + 50, ledger.statuses
            assert (await ws.request("ping", {"t0": 0}))["type"] == "pong"
            assert not ledger.bad, ledger.bad[:5]
            assert set(ledger.statuses) <= {200, 503}, ledger.statuses
            assert during.get(503, 0) > 0 and during.get(200, 0) == 0, during
            ids = list(ledger.accepted)
            stored = await pg_ids(pg_database, ids)
            assert stored == set(ids), f"{len(set(ids) - stored)} accepted notifications lost"
            print(
                f"\npostgres outage: {cut} links cut; answers {ledger.statuses}; during the "
                f"cut {during}; {len(ids)} accepted, all stored"
            )


# -- Redis: outage, revocation across nodes, SIGKILL of a node -----------------------------
@pytest.mark.redis
@pytest.mark.slow
async def test_redis_outage_at_the_hub() -> None:
    """Redis behind a TCP proxy, cut for 2 s: publishing answers 503 (never a 5xx of another
    kind), /readyz 503, new handshakes 503; connected clients stay open. After the cut,
    publishing works again and a subscriber sees either the missed publications or a
    ``subscription.reset`` (never a silent gap)."""
    with redis_server() as url:
        async with FaultProxy(int(urlsplit(url).port or 6379)) as proxy:
            settings = make_settings(
                {
                    "REVENGE_BROKER_URL": f"redis://127.0.0.1:{proxy.port}/0",
                    "REVENGE_BROKER_TIMEOUT": "1",
                }
            )
            async with running_hub(settings) as hub:
                ws = await hub.connect("erin")
                await ws.request("subscribe", {"channels": ["library:r"]})
                for i in range(3):
                    assert (await hub.publish("library:r", "t", {"i": i}))[0] == 200
                seqs = [(await ws.recv())["seq"] for _ in range(3)]
                assert seqs == [1, 2, 3]
                proxy.refuse()
                proxy.cut()
                statuses = set()
                for _ in range(10):
                    status, body = await hub.publish("library:r", "t", {"i": -1})
                    statuses.add(status)
                    if status != 200:
                        assert body["error"]["code"] == "UNAVAILABLE"
                assert statuses == {503}, statuses
                assert (await hub.request("GET", "/readyz"))[0] == 503
                s = await hub.session()
                async with s.get(f"{hub.ws_url}?token={hub.token('frank')}", headers=UPGRADE) as r:
                    assert r.status == 503
                proxy.accept()
                for _ in range(200):
                    if (await hub.request("GET", "/readyz"))[0] == 200:
                        break
                    await asyncio.sleep(0.05)
                assert (await hub.request("GET", "/readyz"))[0] == 200
                assert not ws.ws.closed
                for i in range(3, 6):
                    status, body = await hub.publish("library:r", "t", {"i": i})
                    assert status == 200, body
                got: list[dict[str, Any]] = []
                for _ in range(10):
                    msg = await ws.recv(timeout=5)
                    got.append(msg)
                    if msg["type"] == "t" and msg["data"]["i"] == 5:
                        break
                kinds = [m["type"] for m in got]
                data = [m["data"].get("i") for m in got if m["type"] == "t"]
                # Either a gapless continuation, or an explicit reset first.
                assert data == [3, 4, 5] or "subscription.reset" in kinds, got
                print(f"\nredis outage: publish {statuses} during the cut; after: {kinds}")


@pytest.mark.redis
async def test_revoke_closes_4501_on_every_node() -> None:
    """Two in-process nodes on one Redis: revoking a user on node A closes the user's
    connections on both nodes with 4501 and both refuse the old token; a token issued after
    the revocation is accepted."""
    with redis_server() as url:
        env = {"REVENGE_BROKER_URL": url}
        a_settings = make_settings({**env, "REVENGE_NODE_ID": "node-a"})
        b_settings = make_settings({**env, "REVENGE_NODE_ID": "node-b"})
        async with running_hub(a_settings) as a, running_hub(b_settings) as b:
            old = a.token("mallory")
            on_a = await a.connect("mallory")
            on_b = await b.connect("mallory")
            bystander = await b.connect("trent")
            await asyncio.sleep(1.1)  # iat has a one-second resolution
            status, body = await a.request(
                "POST", "/api/v1/realtime/revoke", json={"user_id": "mallory"}
            )
            assert status == 200, body
            assert await on_a.closed() == CloseCode.UNAUTHORIZED
            assert await on_b.closed() == CloseCode.UNAUTHORIZED
            for hub in (a, b):
                status, body = await hub.request("GET", f"/api/v1/ws?token={old}", headers=UPGRADE)
                assert status == 401 and body["error"]["code"] == "UNAUTHORIZED", body
            assert (await bystander.request("ping", {"t0": 0}))["type"] == "pong"
            await asyncio.sleep(1.1)
            fresh = await b.connect("mallory")
            assert fresh.welcome["data"]["node_id"] == "node-b"
            for ws in (on_a, on_b, bystander, fresh):
                await ws.close()


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.slow
async def test_sigkill_of_a_node_clients_recover_on_another(
    pg_database: str,
) -> None:
    """Two hub processes on one Redis and one PostgreSQL. 10 clients on node A follow a
    channel; A is SIGKILLed while publications continue through node B; every client
    reconnects to B with ``since`` and gets ``recovered: true`` and every publication
    exactly once, in order. Notifications accepted by A before the kill are redelivered
    by B."""
    with redis_server() as url:
        common = {"REVENGE_BROKER_URL": url, "REVENGE_STORE_URL": pg_database}
        a = await start_hub_process({**common, "REVENGE_NODE_ID": "node-a"})
        b = await start_hub_process({**common, "REVENGE_NODE_ID": "node-b"})
        try:
            async with aiohttp.ClientSession() as s:

                async def publish(hp: HubProcess, i: int) -> int:
                    async with s.post(
                        f"{hp.url}/api/v1/realtime/publish",
                        headers=AUTH,
                        json={"channel": "library:k", "type": "k", "data": {"i": i}},
                    ) as r:
                        assert r.status == 200, await r.text()
                        return int((await r.json())["seq"])

                clients = []
                for n in range(10):
                    ws = await s.ws_connect(f"{a.ws_url}?token={token(f'k{n}')}")
                    assert orjson.loads((await ws.receive(timeout=5)).data)["type"] == "welcome"
                    await ws.send_str(
                        orjson.dumps(
                            {"type": "subscribe", "id": "s", "data": {"channels": ["library:k"]}}
                        ).decode()
                    )
                    clients.append(ws)
                ack_epoch = ""
                for ws in clients:
                    ack = orjson.loads((await ws.receive(timeout=5)).data)
                    ack_epoch = ack["data"]["subscriptions"][0]["epoch"]
                async with s.post(
                    f"{a.url}/api/v1/realtime/notify",
                    headers=AUTH,
                    json={"user_id": "k0", "notification_type": "t", "title": "before"},
                ) as r:
                    assert r.status == 200
                    note_ids = (await r.json())["ids"]
                for i in range(5):
                    await publish(b, i)
                last: dict[int, tuple[str, int]] = {}
                for n, ws in enumerate(clients):
                    seen = []
                    while len(seen) < 5:
                        data = orjson.loads((await ws.receive(timeout=5)).data)
                        if data["type"] == "k":
                            seen.append(data["data"]["i"])
                            last[n] = (data["epoch"], data["seq"])
                    assert seen == list(range(5))
                a.proc.send_signal(signal.SIGKILL)
                await asyncio.to_thread(a.proc.wait, 10)
                for ws in clients:
                    msg = await ws.receive(timeout=10)
                    assert msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSE,
                                        aiohttp.WSMsgType.ERROR)  # fmt: skip
                    await ws.close()
                for i in range(5, 10):  # published while the clients are away
                    await publish(b, i)
                recovered = 0
                started = time.monotonic()
                for n in range(10):
                    ws = await s.ws_connect(f"{b.ws_url}?token={token(f'k{n}')}")
                    welcome = orjson.loads((await ws.receive(timeout=5)).data)
                    assert welcome["data"]["node_id"] == "node-b"
                    epoch, seq = last[n]
                    assert epoch == ack_epoch
                    await ws.send_str(
                        orjson.dumps(
                            {
                                "type": "subscribe",
                                "id": "r",
                                "data": {
                                    "channels": [
                                        {"name": "library:k", "since": {"epoch": epoch, "seq": seq}}
                                    ]
                                },
                            }
                        ).decode()
                    )
                    seen, ack, notes = [], None, []
                    # Redelivery runs beside the subscribe, so the note may come last.
                    wanted = len(note_ids) if n == 0 else 0
                    while len(seen) < 5 or len(notes) < wanted:
                        data = orjson.loads((await ws.receive(timeout=5)).data)
                        if data.get("id") == "r":
                            ack = data
                        elif data["type"] == "k":
                            seen.append(data["data"]["i"])
                        elif data["type"] == "notification":
                            notes.append(data["data"]["id"])
                    assert notes == (note_ids if n == 0 else [])
                    assert ack is not None and ack["data"]["subscriptions"][0]["recovered"]
                    assert seen == list(range(5, 10))
                    recovered += 1
                    await ws.close()
                print(
                    f"\nSIGKILL of node-a: {recovered}/10 clients recovered on node-b "
                    f"in {time.monotonic() - started:.2f}s, no gap, no duplicate"
                )
        finally:
            await asyncio.to_thread(a.stop, signal.SIGKILL)
            assert await asyncio.to_thread(b.stop) == 0
