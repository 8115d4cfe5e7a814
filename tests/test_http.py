"""The HTTP API over real sockets: auth, validation, publishing, operations, OpenAPI."""

from __future__ import annotations

import io
from typing import Any

from openapi_spec_validator import validate

from .helpers import API_KEY, Hub, wait_for


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_publish_auth(hub: Hub) -> None:
    body = {"channel": "activity", "type": "a.b", "data": {}}
    assert (await hub.request("POST", "/api/v1/realtime/publish", json=body))[0] == 200
    admin = hub.token("root", role="admin")
    status, _ = await hub.request(
        "POST", "/api/v1/realtime/publish", json=body, headers=bearer(admin)
    )
    assert status == 200
    status, err = await hub.request(
        "POST", "/api/v1/realtime/publish", json=body, headers=bearer(hub.token("alice"))
    )
    assert (status, err["error"]["code"]) == (403, "FORBIDDEN")
    status, err = await hub.request("POST", "/api/v1/realtime/publish", json=body, headers={})
    assert (status, err["error"]["code"]) == (401, "UNAUTHORIZED")
    status, err = await hub.request(
        "POST", "/api/v1/realtime/publish", json=body, headers=bearer("wrong-key")
    )
    assert (status, err["error"]["code"]) == (401, "UNAUTHORIZED")


async def test_publish_validation(hub: Hub) -> None:
    async def post(raw: Any, **kw: Any) -> tuple[int, str]:
        status, body = await hub.request("POST", "/api/v1/realtime/publish", data=raw, **kw)
        return status, body["error"]["code"]

    assert await post(b"{nope") == (400, "INVALID_JSON")
    assert await post(b'{"channel":"activity"}') == (400, "INVALID_MESSAGE")
    assert await post(b'{"channel":"activity","type":"x","data":[]}') == (400, "INVALID_MESSAGE")
    assert await post(b'{"channel":"activity","type":"x y"}') == (400, "INVALID_MESSAGE")
    assert await post(b'{"channel":"activity","type":"x","extra":1}') == (400, "INVALID_MESSAGE")
    assert await post(b'{"channel":"nope:1","type":"x"}') == (404, "NOT_FOUND")
    assert await post(b'{"channel":"library:","type":"x"}') == (400, "INVALID_MESSAGE")
    big = b'{"channel":"activity","type":"x","data":{"p":"' + b"x" * 70000 + b'"}}'
    assert await post(big) == (413, "TOO_LARGE")
    huge = b'{"channel":"activity","type":"x","data":{"p":"' + b"x" * 3_000_000 + b'"}}'
    assert (await post(io.BytesIO(huge)))[0] == 413


async def test_publish_seq_and_idempotency(hub: Hub) -> None:
    s1, a = await hub.publish("library:l1", "library.changed", {"added": ["1"]})
    s2, b = await hub.publish(
        "library:l1", "library.changed", {"added": ["2"]}, idempotency_key="k1"
    )
    s3, c = await hub.publish(
        "library:l1", "library.changed", {"added": ["2"]}, idempotency_key="k1"
    )
    assert (s1, s2, s3) == (200, 200, 200)
    assert b["seq"] == a["seq"] + 1 and c == b
    status, hist = await hub.request("GET", "/api/v1/realtime/history/library:l1?limit=10")
    assert status == 200 and [p["seq"] for p in hist["publications"]] == [1, 2]
    status, hist = await hub.request(
        "GET", f"/api/v1/realtime/history/library:l1?since=1&epoch={a['epoch']}"
    )
    assert hist["recovered"] and [p["data"] for p in hist["publications"]] == [{"added": ["2"]}]
    status, hist = await hub.request("GET", "/api/v1/realtime/history/library:l1?since=1&epoch=zz")
    assert hist["recovered"] is False and hist["publications"] == []
    for bad in ("?limit=0", "?limit=x", "?since=1"):
        status, err = await hub.request("GET", "/api/v1/realtime/history/library:l1" + bad)
        assert (status, err["error"]["code"]) == (400, "INVALID_MESSAGE"), bad


async def test_info_time_health_ready_metrics(hub: Hub) -> None:
    ws = await hub.connect("alice")
    status, info = await hub.request("GET", "/api/v1/realtime/info")
    assert status == 200 and info["connections"] == 1 and info["node_id"] == "test-node"
    assert info["broker"] == "memory"
    status, t = await hub.request("GET", "/api/v1/time", headers={})
    assert status == 200 and t["t1"] <= t["t2"]
    assert (await hub.request("GET", "/healthz", headers={}))[0] == 200
    status, ready = await hub.request("GET", "/readyz", headers={})
    assert status == 200 and ready["checks"]["broker"] == "ok"
    await ws.request("ping", {"t0": 0})
    await hub.publish("user:alice", "user.data_changed", {})
    await ws.recv()
    status, text = await hub.request("GET", "/metrics", headers={})
    assert status == 200
    for name in [
        "revenge_connections 1.0",
        'revenge_messages_in_total{type="ping"} 1.0',
        'revenge_messages_out_total{type="user.data_changed"} 1.0',
        "revenge_publish_to_send_seconds_bucket",
        "revenge_connections_opened_total 1.0",
    ]:
        assert name in text, name


async def test_presence_endpoint(hub: Hub) -> None:
    a1 = await hub.connect("alice", name="Alice")
    a2 = await hub.connect("alice", name="Alice")
    b = await hub.connect("bob")
    for ws in (a1, a2, b):
        await ws.request("subscribe", {"channels": ["activity"]})
    status, body = await hub.request("GET", "/api/v1/realtime/presence/activity")
    assert status == 200
    members = {m["user_id"]: m for m in body["members"]}
    assert members["alice"] == {"user_id": "alice", "name": "Alice", "connections": 2}
    assert members["bob"]["connections"] == 1


async def test_presence_of_personal_channels_is_the_connection_count(hub: Hub) -> None:
    """notifications:<user> and user:<user> keep no presence entry per connection; their
    presence is the user's open connections (every connection is on them)."""
    a1 = await hub.connect("alice", name="Alice")
    a2 = await hub.connect("alice", name="Alice")
    for ch in ("notifications:alice", "user:alice"):
        status, body = await hub.request("GET", f"/api/v1/realtime/presence/{ch}")
        assert status == 200
        assert body == {
            "channel": ch,
            "members": [{"user_id": "alice", "name": "Alice", "connections": 2}],
        }
    assert not hub.node.broker.presence._channels  # nothing stored per connection
    await a1.close()
    await a2.close()
    assert await wait_for(lambda: len(hub.node.hub) == 0)
    _status, body = await hub.request("GET", "/api/v1/realtime/presence/user:alice")
    assert body["members"] == []
    _status, body = await hub.request("GET", "/api/v1/realtime/presence/user:nobody")
    assert body == {"channel": "user:nobody", "members": []}


async def test_unknown_route_and_method(hub: Hub) -> None:
    status, body = await hub.request("GET", "/api/v1/nope")
    assert status == 404 and body["error"]["code"] == "NOT_FOUND"
    status, body = await hub.request("GET", "/api/v1/realtime/publish")
    assert status == 405 and body["error"]["code"] == "INVALID_MESSAGE"


async def test_openapi_document_is_valid_and_complete(hub: Hub) -> None:
    status, doc = await hub.request("GET", "/api/v1/openapi.json", headers={})
    assert status == 200
    validate(doc)
    routes = {
        (method.upper(), r.resource.canonical)  # type: ignore[union-attr]
        for r in hub.app.router.routes()
        for method in [r.method]
        if r.resource is not None and method != "HEAD"
    }
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    ws_paths = {p for (_, p) in routes if p.startswith("/api/v1/ws")}
    missing = (
        {r for r in routes if r[1] not in ws_paths} - documented - {("GET", "/api/v1/openapi.json")}
    )
    assert not missing, missing


async def test_api_key_never_logged(hub: Hub, caplog: Any) -> None:
    caplog.set_level("DEBUG")
    await hub.request("POST", "/api/v1/realtime/publish", json={"channel": "activity", "type": "x"})
    tok = hub.token("alice")
    await hub.connect("alice")
    s = await hub.session()
    async with s.get(f"{hub.url}/healthz?token={tok}"):
        pass
    text = caplog.text
    assert API_KEY not in text and tok not in text


async def test_presence_forgets_closed_connections(hub: Hub) -> None:
    import asyncio

    a = await hub.connect("alice")
    await a.request("subscribe", {"channels": ["activity"]})
    await a.close()
    for _ in range(100):
        _status, body = await hub.request("GET", "/api/v1/realtime/presence/activity")
        if not body["members"]:
            break
        await asyncio.sleep(0.02)
    assert body["members"] == []
