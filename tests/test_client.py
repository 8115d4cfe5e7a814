"""The Python client: pure parts (clock, backoff, restart spread, tracker), then the
client against an in-process hub and against a scripted server on real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from revenge_ws.client import (
    Client,
    ClockSync,
    OnlineUsers,
    ReconnectPolicy,
    SubscribeError,
    advised_window,
    backoff_delay,
    parse_presence,
    reconnect_delay,
    restart_delay,
)
from revenge_ws.client._tracker import Tracker, Verdict
from revenge_ws.codes import ErrorCode
from revenge_ws.exceptions import ConnectionClosed, RequestError, RequestTimeout
from revenge_ws.protocol import StreamPosition, now_ms

from .helpers import Hub, until

HubWith = Callable[..., AbstractAsyncContextManager[Hub]]
CLIENT_DOC = Path(__file__).resolve().parent.parent / "docs" / "client.md"


# -- helpers ---------------------------------------------------------------------------


async def take(
    client: Client, n: int, timeout: float = 10.0, mtype: str | None = None
) -> list[dict[str, Any]]:
    """The next ``n`` messages of ``client.messages()`` (of type ``mtype``; bounded)."""
    out: list[dict[str, Any]] = []
    it = client.messages()
    async with asyncio.timeout(timeout):
        while len(out) < n:
            msg = await anext(it)
            if mtype is None or msg.get("type") == mtype:
                out.append(msg)
    return out


def events(client: Client, *types: str) -> list[dict[str, Any]]:
    """Record the client's events of these types."""
    seen: list[dict[str, Any]] = []
    for t in types:
        client.on(t, seen.append)
    return seen


# -- ClockSync (pure) ------------------------------------------------------------------
def test_clock_sample_math() -> None:
    clock = ClockSync()
    # Server 1000 ms ahead; 40 ms up, 60 ms down; 5 ms in the server.
    s = clock.add(0.0, 1040.0, 1045.0, 105.0)
    assert s is not None
    assert s.offset == pytest.approx(((1040 - 0) + (1045 - 105)) / 2)  # 990: error = (40-60)/2
    assert s.delay == pytest.approx(100.0)
    assert clock.offset == pytest.approx(990.0)
    assert clock.server_time(2000.0) == pytest.approx(2990.0)


def test_clock_uses_min_delay_of_last_eight() -> None:
    clock = ClockSync(8)
    assert clock.offset is None and clock.server_time(5.0) == 5.0
    # A quiet sample (delay 10, offset exactly 50), then noisy ones with queueing.
    clock.add(0, 55, 55, 10)
    for i in range(7):
        base = 100.0 * (i + 1)
        clock.add(base, base + 50 + 30, base + 50 + 31, base + 80)  # delay 79
    assert clock.delay == pytest.approx(10.0)
    assert clock.offset == pytest.approx(50.0)
    # One more sample pushes the quiet one out of the window of 8.
    clock.add(900, 900 + 50 + 20, 900 + 50 + 20, 940)
    assert len(clock.samples) == 8
    assert clock.delay == pytest.approx(40.0)


def test_clock_rejects_unusable_samples() -> None:
    clock = ClockSync()
    assert clock.add(10, 5, 6, 9) is None  # local clock went backwards
    assert clock.add(float("nan"), 1, 2, 3) is None
    assert clock.offset is None
    clock.add(0, 1, 2, 3)
    clock.reset()
    assert clock.best is None


# -- backoff and restart spread (pure) ----------------------------------------------------
def test_backoff_is_full_jitter_between_min_and_max() -> None:
    rng = random.Random(7)
    for attempt in range(40):
        for _ in range(50):
            d = backoff_delay(attempt, rng, 0.5, 20.0)
            assert 0.5 <= d <= 20.0
            assert d <= 0.5 + 0.5 * 2**attempt
    late = [backoff_delay(30, rng) for _ in range(1000)]
    assert max(late) <= 20.0 and min(late) >= 0.5
    assert max(late) > 15.0  # the whole range is used once the cap is reached


@pytest.mark.parametrize("seed", [0, 1, 42, 2026])
def test_restart_spread_no_second_gets_more_than_30_percent(seed: int) -> None:
    """Contract: after 1001/1012, over 1,000 clients no single second gets more than
    30% of the first reconnect attempts."""
    rng = random.Random(seed)
    policy = ReconnectPolicy()  # restart_window 5 s
    for code in (1012, 1001):
        delays = [reconnect_delay(policy, 0, rng, code=code) for _ in range(1000)]
        assert all(0.0 <= d <= policy.restart_window for d in delays)
        per_second = Counter(int(d) for d in delays)
        assert max(per_second.values()) <= 300, per_second
    # The pure helper, and a window the server advised.
    per_second = Counter(int(restart_delay(10.0, rng)) for _ in range(1000))
    assert max(per_second.values()) <= 300
    delays = [reconnect_delay(policy, 0, rng, code=1012, window=8.0) for _ in range(1000)]
    assert max(delays) > 5.0 and max(Counter(int(d) for d in delays).values()) <= 300


def test_reconnect_rules() -> None:
    rng = random.Random(3)
    policy = ReconnectPolicy()
    for attempt in range(6):
        assert reconnect_delay(policy, attempt, rng, code=4004) >= 5.0
        assert reconnect_delay(policy, attempt, rng, http_status=429, retry_after=7) >= 7.0
        assert reconnect_delay(policy, attempt, rng, retry_after=3.0) >= 3.0
        assert 0.5 <= reconnect_delay(policy, attempt, rng, code=None) <= 20.0
        assert 0.5 <= reconnect_delay(policy, attempt, rng, code=4002) <= 20.0
    # Reproducible with a seed.
    a = [reconnect_delay(policy, i % 5, random.Random(9), code=1012) for i in range(10)]
    b = [reconnect_delay(policy, i % 5, random.Random(9), code=1012) for i in range(10)]
    assert a == b
    with pytest.raises(ValueError, match="backoff_min"):
        ReconnectPolicy(backoff_min=0)


@pytest.mark.parametrize("seed", [0, 1, 42, 2026])
def test_4004_and_429_waits_are_spread(seed: int) -> None:
    """1,000 clients closed with 4004 (or refused 429) at the same moment: none comes back
    before 5 s (or the Retry-After), and no second gets more than 30% of them. Before the
    fix they all came back within 5.5-6.0 s."""
    rng = random.Random(seed)
    policy = ReconnectPolicy()
    for kw in ({"code": 4004}, {"http_status": 429}, {"http_status": 429, "retry_after": 8.0}):
        floor = max(5.0, float(kw.get("retry_after", 0.0)))
        delays = [reconnect_delay(policy, 0, rng, **kw) for _ in range(1000)]
        assert all(floor <= d <= floor + policy.rate_limit_spread for d in delays)
        assert max(delays) - min(delays) > 4.5, (min(delays), max(delays))
        per_second = Counter(int(d) for d in delays)
        assert max(per_second.values()) <= 300, per_second
    # Later attempts still back off beyond the spread.
    late = [reconnect_delay(policy, 8, rng, code=4004) for _ in range(1000)]
    assert min(late) >= 5.5 and max(late) > 15.0

    # The same draw as the JS client: floor + U(0, spread) at attempt 0.
    class Half(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return a + (b - a) * 0.5

    assert reconnect_delay(policy, 0, Half(), code=4004) == 7.5
    # No spread asked for: the floor plus nothing at attempt 0.
    fixed = ReconnectPolicy(rate_limit_spread=0.0)
    assert reconnect_delay(fixed, 0, rng, code=4004) == 5.0
    with pytest.raises(ValueError, match="negative"):
        ReconnectPolicy(rate_limit_spread=-1.0)


@pytest.mark.parametrize("seed", [0, 1, 42, 2026])
def test_advised_window_spreads_the_first_attempt_after_any_reconnect_close(seed: int) -> None:
    """Contract §12: 4002 and 4003 closes that advise a window spread the first attempt
    uniformly over it (without one they back off as before); 4004 waits its floor, then
    the advised spread."""
    rng = random.Random(seed)
    policy = ReconnectPolicy()
    for code in (4002, 4003, 1001, 1012):
        delays = [reconnect_delay(policy, 0, rng, code=code, window=8.0) for _ in range(1000)]
        assert all(0.0 <= d < 8.0 for d in delays)
        assert min(delays) < 0.5 and max(delays) > 7.0, code  # the whole window, no floor
        assert max(Counter(int(d) for d in delays).values()) <= 300
    for code in (4002, 4003):
        assert all(0.5 <= reconnect_delay(policy, 0, rng, code=code) <= 1.0 for _ in range(200))
    delays = [reconnect_delay(policy, 0, rng, code=4004, window=10.0) for _ in range(1000)]
    assert all(5.0 <= d <= 15.0 for d in delays) and max(delays) > 14.0
    assert max(Counter(int(d) for d in delays).values()) <= 300
    # Later attempts never wait less than the backoff.
    late = [reconnect_delay(policy, 8, rng, code=4002, window=1.0) for _ in range(1000)]
    assert min(late) >= 0.5 and max(late) > 15.0
    # The draws are the spread's own: the same seed gives the same delay.
    assert reconnect_delay(policy, 0, random.Random(seed), code=4003, window=5.0) == (
        random.Random(seed).uniform(0.0, 5.0)
    )


@pytest.mark.parametrize("seed", [0, 7])
def test_a_503_waits_retry_after_plus_the_advised_window(seed: int) -> None:
    rng = random.Random(seed)
    policy = ReconnectPolicy()
    delays = [
        reconnect_delay(policy, 0, rng, http_status=503, retry_after=3.0, window=20.0)
        for _ in range(1000)
    ]
    assert all(3.0 <= d <= 23.0 for d in delays) and max(delays) > 22.0
    assert max(Counter(int(d) for d in delays).values()) <= 300
    # No advised window: the restart window; a window without Retry-After still spreads.
    assert all(
        3.0 <= reconnect_delay(policy, 0, rng, http_status=503, retry_after=3.0) <= 8.0
        for _ in range(200)
    )
    bare = [reconnect_delay(policy, 0, rng, http_status=503, window=10.0) for _ in range(1000)]
    assert min(bare) >= 0.5 and max(bare) > 9.0
    # 429 is unchanged: Retry-After (or 5 s), then U(0, rate_limit_spread).
    assert all(
        7.0 <= reconnect_delay(policy, 0, rng, http_status=429, retry_after=7.0) <= 12.0
        for _ in range(200)
    )


def test_advised_window_parsing() -> None:
    assert advised_window("slow consumer; window=5") == 5.0
    assert advised_window("rate limited; window=5") == 5.0
    assert advised_window("restart; window=10") == 10.0
    assert advised_window("restart window=2500ms") == 2.5
    assert advised_window("restart_window: 3s") == 3.0
    assert advised_window("window=9999") == 300.0
    assert advised_window("restart") is None
    assert advised_window("") is None
    assert advised_window(None) is None
    assert advised_window("nowindow=5") is None


# -- presence (pure) -----------------------------------------------------------------
def presence(online: list[str], offline: list[str]) -> dict[str, Any]:
    def users(ids: list[str]) -> list[dict[str, str]]:
        return [{"user_id": u, "name": u.title()} for u in ids]

    return {
        "type": "activity.presence",
        "channel": "activity",
        "seq": 1,
        "data": {"online": users(online), "offline": users(offline)},
    }


def test_online_users_follow_presence_messages() -> None:
    online = OnlineUsers()
    online.apply(presence(["ann", "bob"], []))
    online.apply({"type": "activity.user_watching", "data": {"user_id": "cat", "name": "C"}})
    assert list(online) == ["ann", "bob"] and "cat" not in online
    online.apply(presence(["cat"], ["ann"]))
    assert online.users == {"bob": "Bob", "cat": "Cat"} and len(online) == 2
    online.apply(presence([], ["zed"]))  # offline before this tracker saw them online
    online.apply(presence(["bob"], []))  # already known: stays once
    assert list(online) == ["bob", "cat"]
    online.clear()
    assert len(online) == 0 and repr(online) == "OnlineUsers([])"


def test_parse_presence_keeps_well_formed_entries_only() -> None:
    msg = {
        "type": "activity.presence",
        "data": {
            "online": [{"user_id": "ann"}, {"name": "no id"}, "bob", {"user_id": 3}],
            "offline": None,
        },
    }
    assert parse_presence(msg) == {"online": [{"user_id": "ann", "name": "ann"}], "offline": []}
    assert parse_presence({"type": "activity.presence", "data": []}) is None
    assert parse_presence({"type": "activity.user_online", "data": {"user_id": "a"}}) is None
    big = {"type": "activity.presence", "data": {"online": [], "offline": [], "more": {}}}
    assert parse_presence(big) == {"online": [], "offline": []}  # malformed counts dropped
    big["data"]["more"] = {"online": 150, "offline": 0}
    assert parse_presence(big) == {
        "online": [],
        "offline": [],
        "more": {"online": 150, "offline": 0},
    }


# -- Tracker (pure) ------------------------------------------------------------------
def test_tracker_dedupes_by_channel_and_seq_and_detects_gaps() -> None:
    t = Tracker()
    assert t.on_welcome([{"channel": "user:u", "epoch": "e", "seq": 3}], 1) == []
    got = [t.on_publication("user:u", "e", s) for s in (4, 4, 5, 3, 6)]
    assert got == [
        Verdict.DELIVER,
        Verdict.DUPLICATE,
        Verdict.DELIVER,
        Verdict.DUPLICATE,
        Verdict.DELIVER,
    ]
    assert t.on_publication("user:u", "e", 9) is Verdict.GAP
    # Recovering: everything is held until the ack; the ack keeps the position.
    assert t.items_for(["user:u"]) == [{"name": "user:u", "since": {"epoch": "e", "seq": 6}}]
    assert t.on_publication("user:u", "e", 10) is Verdict.HELD
    assert t.apply_entry({"channel": "user:u", "epoch": "e", "seq": 10, "recovered": True}, 1)
    assert [t.on_publication("user:u", "e", s) for s in (7, 8, 9, 10)] == [Verdict.DELIVER] * 4
    # Another epoch is a gap too; a failed recovery moves to the server's position.
    assert t.on_publication("user:u", "e2", 1) is Verdict.GAP
    t.items_for(["user:u"])
    assert not t.apply_entry({"channel": "user:u", "epoch": "e2", "seq": 4, "recovered": False}, 1)
    assert t.positions()["user:u"] == StreamPosition("e2", 4)
    assert t.on_publication("user:u", "e2", 5) is Verdict.DELIVER


def test_tracker_latest_value_channels_accept_gaps() -> None:
    t = Tracker()
    t.on_welcome([{"channel": "transcode:j", "epoch": "e", "seq": 1}], 1)
    assert t.on_publication("transcode:j", "e", 5) is Verdict.DELIVER  # conflated progress
    assert t.on_publication("transcode:j", "e", 4) is Verdict.DUPLICATE


def test_tracker_welcome_after_reconnect() -> None:
    t = Tracker()
    t.on_welcome(
        [
            {"channel": "user:u", "epoch": "e", "seq": 3},
            {"channel": "notifications:u", "epoch": "n", "seq": 0},
        ],
        1,
    )
    t.want("activity")
    t.apply_entry({"channel": "activity", "epoch": "a", "seq": 7}, 1)
    t.on_publication("user:u", "e", 4)
    items = t.on_welcome(
        [
            {"channel": "user:u", "epoch": "e", "seq": 9},  # we are at 4: missed 5..9
            {"channel": "notifications:u", "epoch": "n", "seq": 0},  # unchanged: no request
        ],
        2,
    )
    assert items == [
        {"name": "user:u", "since": {"epoch": "e", "seq": 4}},
        {"name": "activity", "since": {"epoch": "a", "seq": 7}},
    ]
    assert t.acked_in("notifications:u", 2) and not t.acked_in("user:u", 2)
    assert t.on_publication("user:u", "e", 10) is Verdict.HELD  # live before the ack


def test_tracker_notifications_dedupe_by_id() -> None:
    t = Tracker()
    t.on_welcome([{"channel": "notifications:u", "epoch": "n", "seq": 2}], 1)

    def note(nid: str, seq: int | None = None) -> dict[str, Any]:
        m: dict[str, Any] = {
            "type": "notification",
            "channel": "notifications:u",
            "data": {"id": nid},
        }
        if seq is not None:
            m.update(seq=seq, epoch="n")
        return m

    # Re-sent after connect with an old seq: still delivered once (by id).
    assert t.on_notification(note("a", 1)) is Verdict.DELIVER
    assert t.on_notification(note("a", 1)) is Verdict.DUPLICATE
    assert t.on_notification(note("b", 3)) is Verdict.DELIVER
    assert t.on_notification(note("b")) is Verdict.DUPLICATE
    assert t.positions()["notifications:u"].seq == 3
    assert t.on_notification(note("c", 6)) is Verdict.DELIVER_AND_RECOVER


# -- the client against the in-process hub ------------------------------------------
async def test_subscribe_receive_and_state(hub: Hub) -> None:
    async with Client(hub.ws_url, token=hub.token("alice")) as c:
        welcome = await c.wait_connected(5)
        assert welcome["user_id"] == "alice"
        assert {s["channel"] for s in welcome["subscriptions"]} == {
            "notifications:alice",
            "user:alice",
        }
        got: list[dict[str, Any]] = []
        entries = await c.subscribe("activity", "library:l1", handler=got.append)
        assert [e["channel"] for e in entries] == ["activity", "library:l1"]
        assert all(e["recovered"] is False and e["missed"] == 0 for e in entries)
        assert await c.subscribe("activity") == [entries[0]]  # already subscribed
        for i in range(3):
            await hub.publish("library:l1", "library.changed", {"i": i})
        msgs = await take(c, 3)
        assert [m["data"]["i"] for m in msgs] == [0, 1, 2]
        assert [m["seq"] for m in msgs] == [1, 2, 3]
        assert got == msgs
        assert c.positions()["library:l1"].seq == 3
        assert c.connected and c.state == "connected" and c.session_id


async def test_resume_from_saved_positions_and_unsubscribe(hub: Hub) -> None:
    async with Client(hub.ws_url, token=hub.token("alice")) as c:
        await c.subscribe("library:r")
        for i in range(3):
            await hub.publish("library:r", "test.item", {"i": i})
        await take(c, 3, mtype="test.item")
        saved = c.positions()
        await c.unsubscribe("library:r")
        assert "library:r" not in c.channels
        await hub.publish("library:r", "test.item", {"i": 99})
    for i in range(3, 5):
        await hub.publish("library:r", "test.item", {"i": i})
    # Another process resumes where the first one stopped.
    async with Client(hub.ws_url, token=hub.token("alice")) as c:
        entries = await c.subscribe("library:r", since={"library:r": saved["library:r"]})
        assert entries[0]["recovered"] is True and entries[0]["missed"] == 3
        msgs = await take(c, 3, mtype="test.item")
        assert [m["data"]["i"] for m in msgs] == [99, 3, 4]
        assert [m["seq"] for m in msgs] == [4, 5, 6]


async def test_request_ack_error_and_codes(hub: Hub) -> None:
    async with Client(hub.ws_url, token=hub.token("alice")) as c:
        ack = await c.request("unsubscribe", {"channels": ["nothing:here"]})
        assert ack == {"channels": []}
        with pytest.raises(RequestError) as info:
            await c.request("no.such.type", {})
        assert info.value.code is ErrorCode.UNKNOWN_TYPE
        with pytest.raises(RequestError) as info:
            await c.request("subscribe", {"channels": []})
        assert info.value.code is ErrorCode.INVALID_MESSAGE
        with pytest.raises(RequestError) as info:
            await c.request("auth.refresh", {"token": "not-a-jwt"})
        assert info.value.code is ErrorCode.UNAUTHORIZED
        with pytest.raises(SubscribeError) as sub:
            await c.subscribe("activity", "server", "bogus:x")
        assert sub.value.code is ErrorCode.FORBIDDEN
        assert {e["channel"]: e["code"] for e in sub.value.errors} == {
            "server": "FORBIDDEN",
            "bogus:x": "NOT_FOUND",
        }
        assert [e["channel"] for e in sub.value.subscriptions] == ["activity"]
        assert "server" not in c.channels and "activity" in c.channels


async def test_request_timeout(hub: Hub) -> None:
    release = asyncio.Event()

    async def slow(req: Any) -> dict[str, Any]:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(release.wait(), 3)
        return {"late": True}

    hub.node.register("test.slow", slow)
    async with Client(hub.ws_url, token=hub.token("alice")) as c:
        await c.wait_connected(5)
        with pytest.raises(RequestTimeout):
            await c.request("test.slow", {}, timeout=0.2)
        release.set()
        # The late reply is dropped; the connection keeps working.
        assert await c.request("unsubscribe", {"channels": []}) == {"channels": []}
        assert c.stats.connects == 1


async def test_ping_and_server_time(hub: Hub) -> None:
    async with Client(hub.ws_url, token=hub.token("alice")) as c:
        await c.wait_connected(5)
        sample = await c.ping()
        assert sample is not None and sample.delay >= 0
        assert c.rtt is not None and c.clock_offset is not None
        # One machine: the true offset is 0; loopback keeps the estimate close.
        assert abs(c.clock_offset) < 50
        assert abs(c.server_time() - now_ms()) < 50


async def test_messages_overflow_drops_oldest(hub: Hub) -> None:
    async with Client(hub.ws_url, token=hub.token("alice"), queue_size=10) as c:
        await c.subscribe("library:q")
        for i in range(30):
            await hub.publish("library:q", "test.item", {"i": i})
        await until(lambda: c.stats.delivered >= 30, what="30 deliveries")
        assert c.stats.dropped == 20
        msgs = await take(c, 10)
        assert [m["data"]["i"] for m in msgs] == list(range(20, 30))


async def test_token_in_query_and_origin(hub: Hub) -> None:
    async with Client(
        hub.ws_url, token=hub.token("carol"), token_in_query=True, origin="http://example.test"
    ) as c:
        welcome = await c.wait_connected(5)
        assert welcome["user_id"] == "carol"


async def test_bad_token_is_terminal(hub: Hub) -> None:
    c = Client(hub.ws_url, token="not-a-token", backoff_min=0.05)
    async with c:
        err = await c.wait_closed(10)
        assert err is not None and err.code == 4501
        assert c.stats.attempts == 1
        with pytest.raises(ConnectionClosed):
            await c.wait_connected(1)
        with pytest.raises(ConnectionClosed):
            await anext(c.messages())


async def test_handshake_401_with_provider_fetches_a_new_token(hub: Hub) -> None:
    calls: list[int] = []

    async def provider() -> str:
        calls.append(1)
        return "expired-or-garbage" if len(calls) == 1 else hub.token("hank")

    async with Client(hub.ws_url, token_provider=provider, backoff_min=0.05) as c:
        welcome = await c.wait_connected(5)
        assert welcome["user_id"] == "hank" and len(calls) == 2
        assert c.stats.attempts == 2


@pytest.mark.parametrize(
    ("path", "body", "code"),
    [
        ("/api/v1/realtime/disconnect", {"user_id": "bob", "code": 4503, "reason": "bye"}, 4503),
        ("/api/v1/realtime/disconnect", {"user_id": "bob", "code": 4501}, 4501),
        ("/api/v1/realtime/revoke", {"user_id": "bob"}, 4501),
    ],
)
async def test_terminal_close_is_not_reconnected(
    hub: Hub, path: str, body: dict[str, Any], code: int
) -> None:
    async with Client(hub.ws_url, token=hub.token("bob"), backoff_min=0.05) as c:
        await c.subscribe("activity")
        seen = events(c, "client.disconnected", "client.closed")
        status, _ = await hub.request("POST", path, json=body)
        assert status == 200
        err = await c.wait_closed(10)
        assert err is not None and err.code == code
        assert c.state == "closed" and c.stats.attempts == 1 and c.stats.connects == 1
        assert seen[0]["data"]["code"] == code and seen[0]["data"]["reconnect_in"] is None
        assert seen[-1]["type"] == "client.closed"
        with pytest.raises(ConnectionClosed) as info:
            await c.request("unsubscribe", {"channels": []})
        assert info.value.code == code
        with pytest.raises(ConnectionClosed):
            await anext(c.messages())


async def test_reconnect_class_codes(hub: Hub) -> None:
    async with Client(hub.ws_url, token=hub.token("dave"), backoff_min=0.05, backoff_max=0.2) as c:
        await c.subscribe("activity")
        seen = events(c, "client.disconnected")
        for n, code in enumerate((4002, 4003, 4400), start=2):
            await hub.request(
                "POST", "/api/v1/realtime/disconnect", json={"user_id": "dave", "code": code}
            )
            await until(lambda n=n: c.stats.connects == n, what=f"reconnect after {code}")
        assert [e["data"]["code"] for e in seen] == [4002, 4003, 4400]
        assert all(e["data"]["reconnect_in"] <= 0.2 for e in seen)
        # 4004 waits at least 5 s (the computed delay; the test does not wait for it).
        await hub.request(
            "POST", "/api/v1/realtime/disconnect", json={"user_id": "dave", "code": 4004}
        )
        await until(lambda: len(seen) == 4, what="the 4004 close")
        assert seen[-1]["data"]["code"] == 4004 and seen[-1]["data"]["reconnect_in"] >= 5.0


async def test_restart_close_honors_advised_window(hub: Hub) -> None:
    async with Client(hub.ws_url, token=hub.token("erin"), restart_window=60.0) as c:
        await c.subscribe("activity")
        seen = events(c, "client.disconnected")
        for conn in list(hub.node.hub.user_connections("erin")):
            conn.close(1012, "restart; window=300ms")
        await until(lambda: c.stats.connects == 2, what="reconnect within the advised window")
        assert seen[0]["data"]["code"] == 1012
        assert 0 <= seen[0]["data"]["reconnect_in"] <= 0.3


async def test_token_expired_close_refreshes_first(hub_with: HubWith) -> None:
    async with hub_with({"REVENGE_JWT_EXPIRY_GRACE": "0"}) as hub:
        issued: list[str] = []

        async def provider() -> str:
            # The first token expires within a second; later ones last an hour.
            issued.append(hub.token("frank", ttl=1 if not issued else 3600))
            return issued[-1]

        async with Client(
            hub.ws_url, token_provider=provider, refresh_margin=None, backoff_min=0.05
        ) as c:
            seen = events(c, "client.disconnected")
            await c.subscribe("activity")
            await until(lambda: c.stats.connects == 2, timeout=15, what="reconnect after 4001")
            assert seen[0]["data"]["code"] == 4001
            assert len(issued) == 2
            await hub.publish("activity", "test.item", {"i": 1})
            msgs = await take(c, 1, mtype="test.item")
            assert msgs[0]["data"] == {"i": 1}


async def test_token_refreshed_before_expiry(hub_with: HubWith) -> None:
    async with hub_with({"REVENGE_JWT_EXPIRY_GRACE": "0"}) as hub:
        issued: list[str] = []

        async def provider() -> str:
            issued.append(hub.token("gina", ttl=3 if not issued else 3600))
            return issued[-1]

        async with Client(hub.ws_url, token_provider=provider) as c:
            welcome = await c.wait_connected(5)
            first_exp = welcome["expires_at"]
            await until(lambda: c.stats.token_refreshes == 1, timeout=10, what="auth.refresh")
            # Past the first token's expiry plus a sweep: still the same connection.
            while time.time() * 1000 < first_exp + 1500:
                await asyncio.sleep(0.1)
            assert await c.request("unsubscribe", {"channels": []}) == {"channels": []}
            assert c.stats.connects == 1 and c.stats.disconnects == 0
            assert len(issued) == 2


# -- the client against a scripted server --------------------------------------------
class FakeConn:
    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def send(self, obj: dict[str, Any]) -> None:
        await self.ws.send_str(orjson.dumps(obj).decode())

    async def expect(self, mtype: str, timeout: float = 5.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.inbox.get()
                if msg.get("type") == mtype:
                    return msg


class FakeHub:
    """Speaks just enough ``revenge.v1`` for a test to script the server side."""

    def __init__(self) -> None:
        self.conns: asyncio.Queue[FakeConn] = asyncio.Queue()
        self.runner: web.AppRunner | None = None
        self.port = 0
        #: While set, handshakes are refused with this status and these headers.
        self.refusal: tuple[int, dict[str, str]] | None = None
        self.refused = 0

    async def handler(self, request: web.Request) -> web.StreamResponse:
        if self.refusal is not None:
            self.refused += 1
            status, headers = self.refusal
            return web.json_response(
                {"error": {"code": "UNAVAILABLE", "message": "busy"}},
                status=status,
                headers=headers,
            )
        ws = web.WebSocketResponse(protocols=("revenge.v1",))
        await ws.prepare(request)
        conn = FakeConn(ws)
        await self.conns.put(conn)
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            obj = orjson.loads(msg.data)
            if obj.get("type") == "ping":
                t = now_ms()
                await conn.send(
                    {
                        "type": "pong",
                        "id": obj["id"],
                        "data": {"t0": obj["data"]["t0"], "t1": t, "t2": t},
                    }
                )
            else:
                conn.inbox.put_nowait(obj)
        return ws

    async def next_conn(self, timeout: float = 5.0) -> FakeConn:
        return await asyncio.wait_for(self.conns.get(), timeout)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"


@pytest.fixture
async def fake() -> AsyncIterator[FakeHub]:
    fh = FakeHub()
    app = web.Application()
    app.router.add_get("/ws", fh.handler)
    fh.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await fh.runner.setup()
    site = web.TCPSite(fh.runner, "127.0.0.1", 0)
    await site.start()
    fh.port = int(fh.runner.addresses[0][1])
    try:
        yield fh
    finally:
        await fh.runner.cleanup()


def welcome(subs: list[dict[str, Any]], node: str = "n1") -> dict[str, Any]:
    return {
        "type": "welcome",
        "data": {
            "session_id": "s",
            "user_id": "u",
            "node_id": node,
            "protocol": "revenge.v1",
            "server_time": now_ms(),
            "expires_at": now_ms() + 3_600_000,
            "heartbeat": {"interval": 30, "timeout": 90},
            "subscriptions": subs,
        },
    }


def pub(channel: str, seq: int, epoch: str = "e1", **data: Any) -> dict[str, Any]:
    return {
        "type": "user.data_changed",
        "channel": channel,
        "seq": seq,
        "epoch": epoch,
        "timestamp": "2026-01-01T00:00:00.000Z",
        "data": data,
    }


def subscribed(
    req_id: str,
    *subs: tuple[str, str, int, bool],
    missed: int = 0,
    errors: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The ack of a ``subscribe``: ``(channel, epoch, seq, recovered)`` per subscription."""
    return {
        "type": "ack",
        "id": req_id,
        "data": {
            "subscriptions": [
                {"channel": ch, "epoch": ep, "seq": seq, "recovered": rec, "missed": missed}
                for ch, ep, seq, rec in subs
            ],
            "errors": errors or [],
        },
    }


async def test_dedupe_gap_recovery_and_reset_scripted(fake: FakeHub) -> None:
    failed: list[str] = []
    async with Client(
        fake.url, token="t", on_recovery_failed=failed.append, backoff_min=0.05, restart_window=30
    ) as c:
        disc = events(c, "client.disconnected", "client.recovery_failed")
        conn = await fake.next_conn()
        await conn.send(welcome([{"channel": "user:u", "epoch": "e1", "seq": 5}]))
        await c.wait_connected(5)
        # Duplicates by (channel, seq) are dropped.
        for seq in (6, 6, 7, 5, 8):
            await conn.send(pub("user:u", seq))
        assert [m["seq"] for m in await take(c, 3)] == [6, 7, 8]
        assert c.stats.duplicates == 2
        # A gap: the client re-subscribes with since; live frames before the ack are held.
        await conn.send(pub("user:u", 10))
        req = await conn.expect("subscribe")
        assert req["data"]["channels"] == [{"name": "user:u", "since": {"epoch": "e1", "seq": 8}}]
        await conn.send(pub("user:u", 11))
        await conn.send(subscribed(req["id"], ("user:u", "e1", 11, True), missed=3))
        for seq in (9, 10, 11, 12):
            await conn.send(pub("user:u", seq))
        assert [m["seq"] for m in await take(c, 4)] == [9, 10, 11, 12]
        assert c.stats.gaps == 1 and c.stats.held == 1 and failed == []
        # subscription.reset: the app is told; delivery continues from the new position.
        await conn.send(
            {
                "type": "subscription.reset",
                "data": {"channel": "user:u", "epoch": "e2", "seq": 3, "reason": "gap"},
            }
        )
        await conn.send(pub("user:u", 4, epoch="e2"))
        assert [(m["epoch"], m["seq"]) for m in await take(c, 1)] == [("e2", 4)]
        assert failed == ["user:u"]
        # Notifications: de-duplicated by id.
        note = {"type": "notification", "channel": "notifications:u", "data": {"id": "n1"}}
        await conn.send(note)
        await conn.send(note)
        await conn.send(pub("user:u", 5, epoch="e2"))
        assert [m["type"] for m in await take(c, 2)] == ["notification", "user.data_changed"]
        # A restart close with an advised window; the new server lost history.
        await conn.ws.close(code=1012, message=b"restart; window=0.2")
        conn = await fake.next_conn()
        await conn.send(welcome([{"channel": "user:u", "epoch": "e9", "seq": 0}], node="n2"))
        req = await conn.expect("subscribe")
        assert req["data"]["channels"] == [{"name": "user:u", "since": {"epoch": "e2", "seq": 5}}]
        await conn.send(subscribed(req["id"], ("user:u", "e9", 0, False)))
        await c.wait_connected(5)
        assert failed == ["user:u", "user:u"]
        restart = [e for e in disc if e["type"] == "client.disconnected"]
        assert restart[0]["data"]["code"] == 1012
        assert 0 <= restart[0]["data"]["reconnect_in"] <= 0.2
        rec = [e for e in disc if e["type"] == "client.recovery_failed"]
        assert [e["data"]["channel"] for e in rec] == ["user:u", "user:u"]
        await conn.send(pub("user:u", 1, epoch="e9"))
        assert [(m["epoch"], m["seq"]) for m in await take(c, 1)] == [("e9", 1)]
        assert c.stats.delivered == 11


async def test_resubscribe_refused_and_watchdog_scripted(fake: FakeHub) -> None:
    async with Client(
        fake.url, token="t", backoff_min=0.05, backoff_max=0.1, watchdog_timeout=0.5
    ) as c:
        conn = await fake.next_conn()
        await conn.send(welcome([]))
        sub = asyncio.create_task(c.subscribe("activity", "library:x"))
        req = await conn.expect("subscribe")
        await conn.send(
            subscribed(req["id"], ("activity", "a", 2, False), ("library:x", "l", 0, False))
        )
        assert len(await sub) == 2
        # The scripted server answers pings, but with a 0.5 s watchdog and 30 s pings
        # only the first three quick pings arrive: then silence, then a reconnect.
        errors = events(c, "client.subscription_error")
        conn = await fake.next_conn(timeout=10)
        assert c.stats.watchdog_fired >= 1
        await conn.send(welcome([]))
        req = await conn.expect("subscribe")
        assert req["data"]["channels"] == [
            {"name": "activity", "since": {"epoch": "a", "seq": 2}},
            {"name": "library:x", "since": {"epoch": "l", "seq": 0}},
        ]
        refused = {"channel": "library:x", "code": "FORBIDDEN", "message": "no"}
        await conn.send(subscribed(req["id"], ("activity", "a", 2, True), errors=[refused]))
        await c.wait_connected(5)
        assert [e["data"]["channel"] for e in errors] == ["library:x"]
        assert c.channels == ["activity"]


async def test_spread_windows_from_a_close_reason_and_a_503_scripted(fake: FakeHub) -> None:
    """The window a 4002 close advises and a 503's Reconnect-Window header reach the
    delay: with a seeded rng the client waits exactly what the pure rules give."""
    policy = ReconnectPolicy()
    expected = random.Random(11)
    first = reconnect_delay(policy, 0, expected, code=4002, window=0.3)
    second = reconnect_delay(policy, 1, expected, http_status=503, retry_after=1.0, window=0.25)
    async with Client(fake.url, token="t", rng=random.Random(11)) as c:
        seen = events(c, "client.disconnected")
        conn = await fake.next_conn()
        await conn.send(welcome([]))
        await c.wait_connected(5)
        fake.refusal = (503, {"Retry-After": "1", "Reconnect-Window": "0.25"})
        await conn.ws.close(code=4002, message=b"slow consumer; window=300ms")
        await until(lambda: fake.refused == 1, what="the refused attempt")
        fake.refusal = None
        conn = await fake.next_conn(timeout=10)
        await conn.send(welcome([]))
        await c.wait_connected(5)
    assert [(e["data"]["code"], e["data"]["http_status"]) for e in seen[:2]] == [
        (4002, None),
        (None, 503),
    ]
    assert seen[0]["data"]["reconnect_in"] == pytest.approx(first)
    assert seen[1]["data"]["reconnect_in"] == pytest.approx(second)
    assert first < 0.3 and 1.0 <= second < 1.25


# -- docs/client.md ----------------------------------------------------------------------
async def test_docs_examples_run(hub: Hub) -> None:
    """Every complete example of docs/client.md runs against a real hub."""
    blocks = re.findall(r"```python\n(.*?)```", CLIENT_DOC.read_text(encoding="utf-8"), re.S)
    examples = [b for b in blocks if "async def main(url: str, token: str" in b]
    assert len(examples) == 6

    async def publish() -> None:
        for i in range(400):
            await hub.publish("library:l1", "library.changed", {"i": i})
            await asyncio.sleep(0.02)

    publisher = asyncio.create_task(publish())
    try:
        for code in examples:
            namespace: dict[str, Any] = {"__name__": "docs_example"}
            exec(compile(code, str(CLIENT_DOC), "exec"), namespace)
            await asyncio.wait_for(namespace["main"](hub.ws_url, hub.token("alice")), 15)
    finally:
        publisher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await publisher
