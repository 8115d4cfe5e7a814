"""The client's SyncPlay driver and its clock, against a real hub."""

from __future__ import annotations

import asyncio
import time

from revenge_ws.client import Client
from revenge_ws.client.syncplay import SyncPlayDriver

from .faultproxy import FaultProxy
from .helpers import Hub, until
from .players import SimPlayer

CONTENT = {"type": "movie", "id": "m1"}


def wall_player() -> SimPlayer:
    """A player on the monotonic clock (ms)."""
    return SimPlayer(lambda: time.monotonic() * 1000.0)


async def test_driver_starts_at_when_reports_applies_hints_and_stops(hub: Hub) -> None:
    async with (
        Client(hub.ws_url, token=hub.token("alice")) as ca,
        Client(hub.ws_url, token=hub.token("bob")) as cb,
    ):
        await ca.wait_connected(5)
        await cb.wait_connected(5)
        pa, pb = wall_player(), wall_player()
        seen: list[str] = []
        da = SyncPlayDriver(ca, pa, report_interval=0.2, tick_interval=0.05)
        # bob's periodic tick is a minute away: whatever moves his player is the timer at
        # a command's `when` or a hint applied at once.
        db = SyncPlayDriver(
            cb, pb, report_interval=0.2, tick_interval=60.0, on_event=lambda t, _: seen.append(t)
        )
        made = await da.create({"name": "party", "content": CONTENT})
        rid = made["room"]["room_id"]
        assert da.room_id == rid
        await db.join(rid)
        assert set(db.members) == {"alice", "bob"}
        await da.ready()
        await db.ready()
        await da.play()
        await until(lambda: pa.is_playing() and pb.is_playing(), 5, "both players started")
        assert "syncplay.command" in seen
        # Reports reach the hub and are judged.
        await until(lambda: db.reports_sent >= 2 and da.reports_sent >= 2, 5, "reports")
        assert db.last_report is not None and "in_sync" in db.last_report
        # bob's player jumps behind the controller's back: only bob's reports can tell the
        # hub, whose hint makes the controller seek back.
        seen.clear()
        pb.seek(pb.position() + 30.0)
        await until(lambda: "syncplay.sync" in seen, 10, "a syncplay.sync hint")
        assert abs(pb.position() - pa.position()) < 1.0
        assert db.report_errors == 0

        await db.stop()
        assert not db._tasks
        assert db._on_message not in cb._handlers.get("syncplay.command", [])
        sent = db.reports_sent
        await asyncio.sleep(0.5)
        assert db.reports_sent == sent

        await ca.request("syncplay.end", {"room_id": rid})
        assert await da.wait_ended(5) == "ended_by_leader"
        assert da.room is None
        await da.stop()
        assert not da._tasks


async def test_driver_takes_the_seat_back_after_a_reconnect(hub: Hub) -> None:
    async with (
        FaultProxy(hub.port) as proxy,
        Client(hub.ws_url, token=hub.token("alice")) as ca,
        Client(proxy.ws_url, token=hub.token("bob"), backoff_min=0.05, backoff_max=0.2) as cb,
    ):
        await ca.wait_connected(5)
        await cb.wait_connected(5)
        da = SyncPlayDriver(ca, wall_player(), report_interval=60.0)
        db = SyncPlayDriver(cb, wall_player(), report_interval=0.2)
        rid = (await da.create({"name": "party", "content": CONTENT}))["room"]["room_id"]
        await db.join(rid)
        await until(lambda: db.reports_sent >= 1, 5, "a report")
        first = cb.session_id
        assert proxy.cut() == 1
        await until(lambda: cb.connected and cb.session_id != first, 10, "a new connection")
        # A report from a connection that does not represent the member is refused
        # (CONFLICT): these are accepted because the driver joined again with it.
        sent = db.reports_sent
        await until(lambda: db.reports_sent >= sent + 2, 10, "reports from the new connection")
        status, body = await hub.request(
            "GET",
            f"/api/v1/syncplay/rooms/{rid}/participants",
            headers={"Authorization": f"Bearer {hub.token('alice')}"},
        )
        assert status == 200, body
        assert {m["user_id"]: m["is_connected"] for m in body["members"]}["bob"] is True
        assert db.ended is None
        await db.stop()
        await da.stop()


async def test_the_injected_clock_stamps_every_local_timestamp(hub: Hub) -> None:
    skew = 3_600_000.0  # this client's clock is an hour ahead

    def clock() -> float:
        return time.time() * 1000.0 + skew

    async with Client(hub.ws_url, token=hub.token("alice"), clock=clock, initial_pings=0) as c:
        await c.wait_connected(5)
        # Before any pong: the welcome's server_time against the injected clock.
        assert c.clock_offset is not None and abs(c.clock_offset + skew) < 1_000
        sample = await c.ping()
        assert sample is not None
        assert abs(sample.t0 - clock()) < 1_000 and abs(sample.t3 - clock()) < 1_000
        assert abs(c.clock_offset + skew) < 1_000
        assert abs(c.local_time() - clock()) < 1_000
        assert abs(c.server_time() - time.time() * 1000.0) < 1_000


async def test_rtt_is_the_min_delay_sample() -> None:
    c = Client("ws://127.0.0.1:1/api/v1/ws", token="t")
    assert c.rtt is None and c.rtt_latest is None
    c.clock.add(0.0, 20.0, 21.0, 41.0)  # 40 ms
    c.clock.add(100.0, 110.0, 111.0, 121.0)  # 20 ms
    c.clock.add(200.0, 300.0, 301.0, 401.0)  # 200 ms: one queued exchange
    assert c.rtt == 20.0
    assert c.rtt_latest == 200.0
