"""The WebSocket endpoint over real sockets: handshake, every error code, every close code."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from revenge_ws.codes import CloseCode
from revenge_ws.core.node import Request
from revenge_ws.exceptions import BrokerUnavailable

from .helpers import WS, Hub, masked_text_frame, raw_upgrade

UPGRADE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Protocol": "revenge.v1",
}


async def upgrade(hub: Hub, path: str = "/api/v1/ws", **headers: str) -> tuple[int, Any]:
    """The handshake's status and headers, as a plain HTTP exchange."""
    s = await hub.session()
    async with s.get(hub.url + path, headers={**UPGRADE, **headers}) as r:
        return r.status, r.headers


async def test_subprotocol_and_welcome(hub: Hub) -> None:
    ws = await hub.connect("alice", role="admin", name="Alice")
    assert ws.ws.protocol == "revenge.v1"
    data = ws.welcome["data"]
    assert data["protocol"] == "revenge.v1" and data["user_id"] == "alice"
    assert data["node_id"] == "test-node" and data["heartbeat"] == {
        "interval": 30.0,
        "timeout": 90.0,
    }
    assert {s["channel"] for s in data["subscriptions"]} == {
        "notifications:alice",
        "user:alice",
        "server",
    }
    assert data["expires_at"] > data["server_time"]


async def test_token_sources_in_order(hub: Hub) -> None:
    tok = hub.token("alice")
    s = await hub.session()
    ws = await s.ws_connect(hub.ws_url, headers={"Authorization": f"Bearer {tok}"})
    await ws.close()
    s2 = aiohttp.ClientSession(cookies={"auth_token": tok})
    try:
        ws = await s2.ws_connect(hub.ws_url)
        assert (await ws.receive_json())["type"] == "welcome"
        await ws.close()
    finally:
        await s2.close()
    # Header wins over a valid query token.
    status, _ = await upgrade(hub, f"/api/v1/ws?token={tok}", Authorization="Bearer nope")
    assert status == 401
    status, _ = await upgrade(hub)
    assert status == 401


async def test_origin_allow_list(hub_with: Any) -> None:
    async with hub_with({"REVENGE_ALLOWED_ORIGINS": "https://ok.example"}) as hub:
        tok = hub.token()
        assert (await upgrade(hub, f"/api/v1/ws?token={tok}", Origin="https://evil.example"))[
            0
        ] == 403
        assert (await upgrade(hub, f"/api/v1/ws?token={tok}", Origin="https://ok.example"))[
            0
        ] == 101
        assert (await upgrade(hub, f"/api/v1/ws?token={tok}"))[0] == 101  # native app


async def test_connections_per_user_limit(hub_with: Any) -> None:
    async with hub_with({"REVENGE_LIMITS_CONNECTIONS_PER_USER": "2"}) as hub:
        a = await hub.connect("alice")
        keep = await hub.connect("alice")
        status, headers = await upgrade(hub, f"/api/v1/ws?token={hub.token('alice')}")
        assert status == 429 and "Retry-After" in headers
        keep2 = await hub.connect("bob")
        await a.close()
        for _ in range(100):  # the count drops once the server saw the close
            if len(hub.node.hub.user_connections("alice")) < 2:
                break
            await asyncio.sleep(0.02)
        again = await hub.connect("alice")
        assert {keep, keep2, again}


async def test_accept_rate_limit(hub_with: Any) -> None:
    async with hub_with(
        {"REVENGE_SERVER_ACCEPT_RATE": "0.001", "REVENGE_SERVER_ACCEPT_BURST": "2"}
    ) as hub:
        keep = [await hub.connect("a"), await hub.connect("b")]
        status, headers = await upgrade(hub, f"/api/v1/ws?token={hub.token('c')}")
        assert status == 503 and int(headers["Retry-After"]) >= 1
        assert len(keep) == 2


async def test_error_codes_over_the_wire(hub: Hub) -> None:
    ws = await hub.connect("alice")

    async def code_of(raw: str) -> tuple[str, Any]:
        await ws.ws.send_str(raw)
        msg = await ws.recv()
        assert msg["type"] == "error"
        return msg["data"]["code"], msg.get("id")

    assert await code_of("{nope") == ("INVALID_JSON", None)
    assert await code_of('{"id":"x1"}') == ("INVALID_MESSAGE", "x1")
    assert await code_of('{"type":"what.ever","id":"x2"}') == ("UNKNOWN_TYPE", "x2")
    assert await code_of('{"type":"subscribe","id":"x3","data":{"channels":"activity"}}') == (
        "INVALID_MESSAGE",
        "x3",
    )
    assert await code_of('{"type":"auth.refresh","id":"x4","data":{"token":"bad"}}') == (
        "UNAUTHORIZED",
        "x4",
    )
    expired = hub.token("alice", ttl=-60)
    assert await code_of(
        '{"type":"auth.refresh","id":"x5","data":{"token":"' + expired + '"}}'
    ) == ("TOKEN_EXPIRED", "x5")
    other = hub.token("mallory")
    assert await code_of('{"type":"auth.refresh","id":"x6","data":{"token":"' + other + '"}}') == (
        "FORBIDDEN",
        "x6",
    )
    # A message without id still gets an error, without id.
    assert await code_of('{"type":"nope"}') == ("UNKNOWN_TYPE", None)
    # Known type, no id, success: no reply at all; the next ping proves it.
    await ws.send("unsubscribe", {"channels": []}, id=None)
    pong = await ws.request("ping", {"t0": 1})
    assert pong["type"] == "pong"


async def test_subscribe_results_and_errors(hub: Hub) -> None:
    ws = await hub.connect("alice", libraries=["l1"])
    ack = await ws.request(
        "subscribe",
        {
            "channels": [
                "activity",
                "library:l1",
                "library:l2",
                "notifications:bob",
                "nosuch:1",
                "library:bad id",
                {"name": "activity", "since": {"epoch": "x", "seq": "1"}},
            ]
        },
    )
    assert ack["type"] == "ack"
    assert [s["channel"] for s in ack["data"]["subscriptions"]] == ["activity", "library:l1"]
    codes = {e["channel"]: e["code"] for e in ack["data"]["errors"]}
    assert codes == {
        "library:l2": "FORBIDDEN",
        "notifications:bob": "FORBIDDEN",
        "nosuch:1": "NOT_FOUND",
        "library:bad id": "INVALID_MESSAGE",
        "activity": "INVALID_MESSAGE",
    }
    ack = await ws.request("unsubscribe", {"channels": ["activity", "never"]})
    assert ack["data"] == {"channels": ["activity"]}


async def test_channel_limit(hub_with: Any) -> None:
    async with hub_with({"REVENGE_LIMITS_CHANNELS_PER_CONNECTION": "4"}) as hub:
        ws = await hub.connect("alice")  # 2 automatic channels count
        ack = await ws.request("subscribe", {"channels": ["library:a", "library:b", "library:c"]})
        assert len(ack["data"]["subscriptions"]) == 2
        assert ack["data"]["errors"] == [
            {
                "channel": "library:c",
                "code": "TOO_LARGE",
                "message": "at most 4 channels per connection",
            }
        ]
        err = await ws.request("subscribe", {"channels": [f"library:{i}" for i in range(5)]})
        assert err["data"]["code"] == "TOO_LARGE"


async def test_internal_and_unavailable_errors(hub: Hub) -> None:
    async def boom(req: Request) -> dict[str, Any]:
        raise ValueError("bug")

    async def down(req: Request) -> dict[str, Any]:
        raise BrokerUnavailable("redis is gone")

    hub.node.register("test.boom", boom)
    hub.node.register("test.down", down)
    ws = await hub.connect("alice")
    err = await ws.request("test.boom")
    assert err["data"] == {"code": "INTERNAL", "message": "internal error", "retryable": True}
    err = await ws.request("test.down")
    assert err["data"]["code"] == "UNAVAILABLE" and err["data"]["retryable"] is True
    assert (await ws.request("ping", {"t0": 0}))["type"] == "pong"  # still open


async def test_repeated_request_id_acts_once(hub: Hub) -> None:
    calls: list[int] = []

    async def count(req: Request) -> dict[str, Any]:
        calls.append(1)
        return {"n": len(calls)}

    hub.node.register("test.count", count)
    ws = await hub.connect("alice")
    await ws.send("test.count", id="same")
    first = await ws.recv()
    await ws.send("test.count", id="same")
    second = await ws.recv()
    assert first == second == {"type": "ack", "id": "same", "data": {"n": 1}}
    assert calls == [1]


async def test_ping_pong_ntp_fields(hub: Hub) -> None:
    ws = await hub.connect("alice")
    pong = await ws.request("ping", {"t0": 123.5})
    d = pong["data"]
    assert d["t0"] == 123.5 and d["t1"] <= d["t2"]


async def test_rate_limit_then_4004(hub_with: Any) -> None:
    env = {
        "REVENGE_LIMITS_INBOUND_RATE": "1",
        "REVENGE_LIMITS_INBOUND_BURST": "5",
        "REVENGE_LIMITS_RATE_LIMIT_STRIKES": "3",
    }
    async with hub_with(env) as hub:
        ws = await hub.connect("alice")
        for _ in range(12):
            await ws.send("ping", {"t0": 0}, id=None)
        seen: list[str] = []
        code = None
        for _ in range(20):
            msg = await ws.ws.receive(timeout=5)
            if msg.type is aiohttp.WSMsgType.TEXT:
                seen.append(
                    msg.json()["type"]
                    if msg.json()["type"] != "error"
                    else msg.json()["data"]["code"]
                )
            else:
                code = ws.ws.close_code
                break
        assert seen.count("pong") == 5 and seen.count("RATE_LIMITED") == 3
        assert code == CloseCode.RATE_LIMITED


async def test_binary_frame_closes_1003(hub: Hub) -> None:
    ws = await hub.connect("alice")
    await ws.ws.send_bytes(b"\x00\x01")
    assert await ws.closed() == 1003


async def test_too_big_closes_1009(hub_with: Any) -> None:
    async with hub_with({"REVENGE_LIMITS_MESSAGE_SIZE": "2048"}) as hub:
        ws = await hub.connect("alice")
        await ws.ws.send_str('{"type":"ping","data":{"pad":"' + "x" * 4096 + '"}}')
        assert await ws.closed() == 1009


async def test_heartbeat_timeout_4003(hub_with: Any) -> None:
    async with hub_with(
        {"REVENGE_HEARTBEAT_INTERVAL": "0.5", "REVENGE_HEARTBEAT_TIMEOUT": "1.5"}
    ) as hub:
        s = await hub.session()
        # autoping off: the client ignores the server's ping frames, like a dead peer.
        raw = await s.ws_connect(f"{hub.ws_url}?token={hub.token()}", autoping=False)
        ws = WS(raw)
        assert (await ws.recv())["type"] == "welcome"
        got_ping = False
        for _ in range(20):
            msg = await raw.receive(timeout=6)
            if msg.type is aiohttp.WSMsgType.PING:
                got_ping = True
                continue
            break
        assert got_ping
        assert raw.close_code == CloseCode.HEARTBEAT_TIMEOUT


async def test_token_expiry_4001_and_refresh(hub_with: Any) -> None:
    async with hub_with({"REVENGE_JWT_EXPIRY_GRACE": "0"}) as hub:
        short = await hub.connect("alice", ttl=1)
        refreshed = await hub.connect("bob", ttl=1)
        ack = await refreshed.request("auth.refresh", {"token": hub.token("bob", ttl=3600)})
        assert (
            ack["type"] == "ack" and ack["data"]["expires_at"] > short.welcome["data"]["expires_at"]
        )
        assert await short.closed(timeout=6) == CloseCode.TOKEN_EXPIRED
        assert (await refreshed.request("ping", {"t0": 0}))["type"] == "pong"


async def test_slow_consumer_4002_others_unaffected(hub_with: Any) -> None:
    async with hub_with({"REVENGE_LIMITS_OUTBOUND_QUEUE_BYTES": "65536"}) as hub:
        fast = await hub.connect("fast")
        await fast.request("subscribe", {"channels": ["library:bulk"]})
        stuck = await asyncio.to_thread(
            raw_upgrade, hub.port, f"/api/v1/ws?token={hub.token('slow')}"
        )
        try:
            stuck.sendall(
                masked_text_frame(b'{"type":"subscribe","data":{"channels":["library:bulk"]}}')
            )
            for _ in range(100):
                if any("library:bulk" in c.subs for c in hub.node.hub.user_connections("slow")):
                    break
                await asyncio.sleep(0.02)
            slow_conn = next(iter(hub.node.hub.user_connections("slow")))
            pad = "p" * 60000
            got = 0
            for i in range(300):  # bounded: 18 MB at most
                await hub.publish("library:bulk", "bulk", {"i": i, "pad": pad})
                msg = await fast.recv()
                assert msg["type"] == "bulk" and msg["data"]["i"] == i
                got += 1
                if slow_conn.closed:
                    break
            assert slow_conn.close_code == CloseCode.SLOW_CONSUMER
            # Others unaffected: the fast reader got every one and still talks.
            assert got == i + 1
            assert (await fast.request("ping", {"t0": 0}))["type"] == "pong"
            metrics = (await hub.request("GET", "/metrics"))[1]
            assert "revenge_slow_connections_total 1.0" in metrics
        finally:
            stuck.close()


async def test_disconnect_4503_and_revoke_4501(hub: Hub) -> None:
    a = await hub.connect("alice")
    b = await hub.connect("bob")
    status, body = await hub.request(
        "POST", "/api/v1/realtime/disconnect", json={"user_id": "alice"}
    )
    assert status == 200, body
    assert await a.closed() == CloseCode.DISCONNECTED
    old = hub.token("bob")
    await asyncio.sleep(1.1)  # iat has one-second resolution
    status, body = await hub.request("POST", "/api/v1/realtime/revoke", json={"user_id": "bob"})
    assert status == 200, body
    assert await b.closed() == CloseCode.UNAUTHORIZED
    assert (await upgrade(hub, f"/api/v1/ws?token={old}"))[0] == 401
    await asyncio.sleep(1.1)
    assert (await upgrade(hub, f"/api/v1/ws?token={hub.token('bob')}"))[0] == 101


async def test_transcode_endpoint(hub: Hub) -> None:
    status, _ = await upgrade(hub, f"/api/v1/ws/transcode/j1?token={hub.token('alice')}")
    assert status == 403
    ws = await hub.connect("root", path="/api/v1/ws/transcode/j1", role="admin")
    assert "transcode:j1" in {s["channel"] for s in ws.welcome["data"]["subscriptions"]}
