from __future__ import annotations

from .helpers import Hub


async def test_welcome_subscribe_publish(hub: Hub) -> None:
    ws = await hub.connect("alice")
    assert ws.welcome["data"]["user_id"] == "alice"
    ack = await ws.request("subscribe", {"channels": ["activity"]})
    assert ack["type"] == "ack"
    status, body = await hub.publish("activity", "x.y", {"n": 1})
    assert status == 200
    msg = await ws.recv()
    assert msg["channel"] == "activity" and msg["seq"] == body["seq"]
