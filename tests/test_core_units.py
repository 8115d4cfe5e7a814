"""The sans-I/O core: session, outbox, rate limiting, channels, hub — no sockets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest

from revenge_ws.auth import Claims
from revenge_ws.broker.base import Publication
from revenge_ws.codes import CloseCode, ErrorCode
from revenge_ws.core.channels import ChannelPolicy, Family, automatic_channels, parse_channel
from revenge_ws.core.connection import HIGH_WATER, Connection, Flusher, SubState
from revenge_ws.core.hub import Hub
from revenge_ws.core.outbox import Outbox
from revenge_ws.core.ratelimit import TokenBucket
from revenge_ws.core.session import Close, Dispatch, Replay, Reply, Session, SessionLimits
from revenge_ws.exceptions import RequestError
from revenge_ws.protocol import frame_text


def _err(action: Any) -> dict[str, Any]:
    assert isinstance(action, Reply)
    msg: dict[str, Any] = orjson.loads(action.payload)
    return msg


# -- token bucket ----------------------------------------------------------------------
def test_token_bucket_refills_and_caps() -> None:
    b = TokenBucket(rate=10, burst=3, now=0.0)
    assert [b.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert b.retry_after() == pytest.approx(0.1)
    assert b.take(0.1)
    assert not b.take(0.1)
    assert b.take(100.0) and b.take(100.0) and b.take(100.0) and not b.take(100.0)


# -- session ---------------------------------------------------------------------------
def make_session(**kw: Any) -> Session:
    kw.setdefault("inbound_burst", 10_000)
    return Session("s1", "alice", expires_at=1000.0, limits=SessionLimits(**kw), now=0.0)


def test_session_dispatch_and_invalid() -> None:
    s = make_session()
    act = s.receive('{"type":"subscribe","id":"1","data":{}}', 0.0)
    assert isinstance(act, Dispatch) and act.envelope.id == "1"
    assert _err(s.receive("{bad", 0.0))["data"]["code"] == "INVALID_JSON"
    err = _err(s.receive('{"type":5,"id":"7"}', 0.0))
    assert err["data"]["code"] == "INVALID_MESSAGE" and err["id"] == "7"


def test_session_rate_limit_then_close() -> None:
    s = make_session(inbound_rate=1, inbound_burst=2, rate_limit_strikes=3)
    assert isinstance(s.receive('{"type":"x"}', 0.0), Dispatch)
    assert isinstance(s.receive('{"type":"x"}', 0.0), Dispatch)
    for _ in range(3):
        assert _err(s.receive('{"type":"x","id":"a"}', 0.0))["data"]["code"] == "RATE_LIMITED"
    act = s.receive('{"type":"x"}', 0.0)
    assert isinstance(act, Close) and act.code == CloseCode.RATE_LIMITED


def test_session_strikes_forgiven_after_quiet_period() -> None:
    s = make_session(inbound_rate=1, inbound_burst=1, rate_limit_strikes=2)
    s.receive('{"type":"x"}', 0.0)
    assert isinstance(s.receive('{"type":"x"}', 0.0), Reply)
    assert isinstance(s.receive('{"type":"x"}', 0.0), Reply)
    # Ten seconds later the strike count starts over.
    assert isinstance(s.receive('{"type":"x"}', 20.0), Dispatch)
    assert isinstance(s.receive('{"type":"x"}', 20.0), Reply)


def test_session_replays_a_repeated_id() -> None:
    s = make_session(dedupe_window=300)
    act = s.receive('{"type":"notification.ack","id":"n1","data":{}}', 0.0)
    assert isinstance(act, Dispatch)
    # The same id while in flight: nothing now, the reply is sent twice on completion.
    assert s.receive('{"type":"notification.ack","id":"n1","data":{}}', 0.0) is None
    assert s.complete(act.envelope, b"REPLY", 1.0) == 2
    again = s.receive('{"type":"notification.ack","id":"n1","data":{}}', 2.0)
    assert isinstance(again, Replay) and again.payload == b"REPLY"
    # After the window it acts again.
    assert isinstance(s.receive('{"type":"notification.ack","id":"n1"}', 400.0), Dispatch)


def test_session_never_replays_reads() -> None:
    s = make_session()
    act = s.receive('{"type":"subscribe","id":"s","data":{}}', 0.0)
    assert isinstance(act, Dispatch)
    s.complete(act.envelope, b"X", 0.0)
    assert isinstance(s.receive('{"type":"subscribe","id":"s","data":{}}', 0.0), Dispatch)


def test_session_inflight_bound() -> None:
    s = make_session(inflight_requests=2)
    assert isinstance(s.receive('{"type":"a","id":"1"}', 0.0), Dispatch)
    assert isinstance(s.receive('{"type":"a","id":"2"}', 0.0), Dispatch)
    err = _err(s.receive('{"type":"a","id":"3"}', 0.0))
    assert err["data"]["code"] == "RATE_LIMITED" and err["data"]["retryable"] is True


def test_session_heartbeat_and_expiry() -> None:
    s = make_session(heartbeat_timeout=90, expiry_grace=25)
    assert s.check(89.0) is None
    s.touch(50.0)
    assert s.check(139.0) is None
    verdict = s.check(141.0)
    assert verdict is not None and verdict.code == CloseCode.HEARTBEAT_TIMEOUT
    s.touch(1020.0)
    assert s.check(1024.0) is None
    verdict = s.check(1026.0)
    assert verdict is not None and verdict.code == CloseCode.TOKEN_EXPIRED
    s.refresh(5000.0)
    assert s.check(1026.0) is None


def test_session_remembers_a_bounded_number_of_replies() -> None:
    s = make_session()
    for i in range(1100):
        act = s.receive(orjson.dumps({"type": "x.y", "id": str(i)}), float(i) / 1000)
        assert isinstance(act, Dispatch)
        s.complete(act.envelope, b"r", 0.0)
    assert len(s._done) <= 1024


# -- outbox ----------------------------------------------------------------------------
def test_outbox_bound_and_drain() -> None:
    box = Outbox(limit=10)
    assert box.push(b"12345")
    assert not box.push(b"123456")
    assert box.push(b"12345")
    assert not box.push(b"1")
    assert box.drain() == [b"12345", b"12345"] and box.nbytes == 0 and len(box) == 0
    assert not box.push(b"1", extra=10)


def test_outbox_conflates_latest_values() -> None:
    box = Outbox(limit=100)
    box.push(b"a")
    box.push_latest("t", b"p1")
    box.push(b"b")
    box.push_latest("t", b"p2")
    assert box.drain() == [b"a", b"p2", b"b"]
    box.push_latest("t", b"p3")
    box.barrier("t")
    box.push_latest("t", b"p4")
    assert box.drain() == [b"p3", b"p4"]


def test_outbox_partial_drain_keeps_slots_right() -> None:
    box = Outbox(limit=1000)
    box.push(b"x" * 10)
    box.push(b"y" * 10)
    box.push_latest("k", b"p1")
    assert box.drain(max_bytes=5) == [b"x" * 10]
    box.push_latest("k", b"p2")
    assert box.drain() == [b"y" * 10, b"p2"]
    box.push_latest("k", b"q")
    assert box.drain(1) == [b"q"]
    assert not box.push_latest("k", b"z" * 2000)


# -- channels --------------------------------------------------------------------------
def test_parse_channel() -> None:
    assert parse_channel("activity").family is Family.ACTIVITY
    assert parse_channel("library:l1").key == "l1"
    for bad, code in [
        ("", ErrorCode.INVALID_MESSAGE),
        (5, ErrorCode.INVALID_MESSAGE),
        ("nope:1", ErrorCode.NOT_FOUND),
        ("library", ErrorCode.INVALID_MESSAGE),
        ("library:", ErrorCode.INVALID_MESSAGE),
        ("library:a b", ErrorCode.INVALID_MESSAGE),
        ("activity:x", ErrorCode.INVALID_MESSAGE),
        ("server:1", ErrorCode.INVALID_MESSAGE),
    ]:
        with pytest.raises(RequestError) as info:
            parse_channel(bad)
        assert info.value.code is code, bad


def claims(sub: str = "alice", role: str = "user", libraries: list[str] | None = None) -> Claims:
    return Claims(
        sub=sub,
        exp=2e9,
        role=role,
        libraries=frozenset(libraries) if libraries is not None else None,
    )


async def test_policy_rules() -> None:
    policy = ChannelPolicy()
    alice, admin = claims(), claims("root", "admin")
    limited = claims("bob", libraries=["l1"])
    allowed = [
        (alice, "notifications:alice"),
        (alice, "user:alice"),
        (alice, "activity"),
        (alice, "library:any"),
        (limited, "library:l1"),
        (admin, "server"),
        (admin, "transcode:j1"),
        (admin, "playback:r1"),
    ]
    denied = [
        (alice, "notifications:bob"),
        (alice, "user:bob"),
        (alice, "server"),
        (limited, "library:l2"),
        (alice, "transcode:j1"),
        (alice, "playback:r1"),
    ]
    for who, name in allowed:
        await policy.check(who, parse_channel(name))
    for who, name in denied:
        with pytest.raises(RequestError) as info:
            await policy.check(who, parse_channel(name))
        assert info.value.code is ErrorCode.FORBIDDEN

    async def owner(c: Claims, key: str) -> bool:
        return key == f"job-of-{c.sub}"

    policy.set_checker(Family.TRANSCODE, owner)
    await policy.check(alice, parse_channel("transcode:job-of-alice"))
    assert automatic_channels(alice) == ["notifications:alice", "user:alice"]
    assert automatic_channels(admin)[-1] == "server"


# -- connection + hub ------------------------------------------------------------------
class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed: tuple[int, str] | None = None
        self.backlog = 0
        self.pings = 0

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def buffered(self) -> int:
        return self.backlog

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def ping(self) -> None:
        self.pings += 1


class FakeLoop:
    def __init__(self) -> None:
        self.soon: list[tuple[Callable[..., object], tuple[Any, ...]]] = []
        self.later: list[tuple[float, Callable[..., object]]] = []

    def call_soon(self, cb: Callable[..., object], *args: Any) -> None:
        self.soon.append((cb, args))

    def call_later(self, delay: float, cb: Callable[..., object], *args: Any) -> None:
        self.later.append((delay, cb))

    def run(self) -> None:
        while self.soon:
            cb, args = self.soon.pop(0)
            cb(*args)


def make_conn(
    loop: FakeLoop, sid: str = "c1", user: str = "alice", limit: int = 1 << 20
) -> tuple[Connection, FakeTransport]:
    t = FakeTransport()
    conn = Connection(
        session_id=sid,
        claims=claims(user),
        session=make_session(),
        transport=t,
        loop=loop,
        outbox=Outbox(limit),
    )
    return conn, t


def pub(channel: str, seq: int, mtype: str = "t", epoch: str = "e") -> Publication:
    return Publication(channel, mtype, seq, epoch, {"n": seq}, "ts", 0.0)


def test_writes_are_coalesced_per_loop_iteration() -> None:
    loop = FakeLoop()
    conn, t = make_conn(loop)
    conn.send(b'{"a":1}')
    conn.send(b'{"b":2}')
    assert t.writes == []
    loop.run()
    assert t.writes == [frame_text(b'{"a":1}') + frame_text(b'{"b":2}')]


def test_backpressure_holds_frames_then_slow_close() -> None:
    loop = FakeLoop()
    conn, t = make_conn(loop, limit=HIGH_WATER * 2)
    t.backlog = HIGH_WATER + 1
    conn.send(b"x")
    loop.run()
    assert t.writes == [] and loop.later  # retried later, not written into a full buffer
    t.backlog = 0
    loop.later.pop()[1]()
    assert t.writes == [frame_text(b"x")]
    t.backlog = HIGH_WATER * 2
    assert not conn.send(b"y")
    loop.run()
    assert t.closed is not None and t.closed[0] == CloseCode.SLOW_CONSUMER


def test_close_flushes_queued_replies_first() -> None:
    loop = FakeLoop()
    conn, t = make_conn(loop)
    conn.send(b"last words")
    conn.close(CloseCode.RATE_LIMITED, "rate limited")
    assert t.writes == [frame_text(b"last words")]
    assert t.closed == (CloseCode.RATE_LIMITED, "rate limited")
    assert not conn.send(b"after")
    conn.close(1000, "again")
    assert t.closed == (CloseCode.RATE_LIMITED, "rate limited")


def test_hub_fanout_dedupe_gap_and_pending() -> None:
    gaps: list[tuple[str, str]] = []
    hub = Hub(on_gap=lambda c, ch: gaps.append((c.session_id, ch)))
    loop = FakeLoop()
    a, ta = make_conn(loop, "a", "alice")
    b, tb = make_conn(loop, "b", "bob")
    hub.add(a)
    hub.add(b)
    assert hub.subscribe(a, "activity", SubState("e", 0))
    assert not hub.subscribe(b, "activity", SubState("e", 0, pending=[]))
    assert hub.deliver(pub("activity", 1)) == 1
    assert hub.deliver(pub("activity", 1)) == 0  # duplicate dropped
    hub.deliver(pub("activity", 3))  # gap for a
    assert gaps == [("a", "activity")]
    assert b.subs["activity"].pending is not None and len(b.subs["activity"].pending) == 3
    loop.run()
    assert ta.writes == [pub("activity", 1).frame]
    assert tb.writes == []
    assert hub.user_connections("bob") == {b}
    assert hub.remove(a) == []
    assert hub.remove(b) == ["activity"]
    assert len(hub) == 0 and hub.deliver(pub("activity", 4)) == 0


def test_hub_fanout_one_flush_per_iteration_and_the_outbox_checks_hold() -> None:
    """Deliveries through the node's Flusher are written by ONE loop callback, coalesced
    per connection; a connection without a flusher flushes on its own, a closed one gets
    nothing and one whose transport is full is closed as a slow consumer."""
    hub = Hub()
    loop = FakeLoop()
    flusher = Flusher(loop)
    fast = [make_conn(loop, f"f{i}", f"u{i}") for i in range(3)]
    for conn, _ in fast:
        conn.flusher = flusher
    plain, tp = make_conn(loop, "plain", "p")
    closed, tc = make_conn(loop, "closed", "c")
    closed.flusher = flusher
    closed.closed = True
    full, tf = make_conn(loop, "full", "x", limit=HIGH_WATER * 2)  # never "far below"
    full.flusher = flusher
    tf.backlog = HIGH_WATER * 2  # the transport holds all the outbox may hold
    for conn, _ in [*fast, (plain, tp), (closed, tc), (full, tf)]:
        hub.add(conn)
        hub.subscribe(conn, "library:l", SubState("e", 0))
    assert hub.deliver(pub("library:l", 1)) == 6
    assert tf.closed is not None and tf.closed[0] == CloseCode.SLOW_CONSUMER
    assert hub.deliver(pub("library:l", 2)) == 6
    assert len(loop.soon) == 2  # one flusher run for all, plain's own flush
    loop.run()
    both = pub("library:l", 1).frame + pub("library:l", 2).frame
    assert all(t.writes == [both] for _, t in fast)
    assert tp.writes == [both]
    assert tc.writes == [] and tc.closed is None
    assert tf.writes == []


def test_flusher_waits_about_one_pass_only_when_saturated() -> None:
    """A pass ≥ 1 ms followed by a new delivery sooner than half the time it took (the
    loop flushing two thirds of the time or more) defers the next pass by that long, at
    most 5 ms; short passes or a longer gap flush in the next iteration."""
    now = [0.0]
    loop = FakeLoop()
    flusher = Flusher(loop, clock=lambda: now[0])
    conn, t = make_conn(loop, "a", "alice")
    conn.flusher = flusher

    cost = [0.0]
    write = t.write

    def timed_write(data: bytes) -> None:
        now[0] += cost[0]  # the pass "takes" this long: the clock moves while writing
        write(data)

    t.write = timed_write  # type: ignore[method-assign]

    def slow_flush(duration: float) -> None:
        cost[0] = duration

    # 1. A short pass: the next delivery is flushed in the next iteration.
    conn.send(b"{}")
    assert len(loop.soon) == 1 and not loop.later
    loop.run()
    conn.send(b"{}")
    assert len(loop.soon) == 1 and not loop.later
    # 2. A 3 ms pass, then a delivery 1 ms after it: saturated, wait 3 ms.
    slow_flush(0.003)
    loop.run()
    now[0] += 0.001
    conn.send(b"{}")
    assert not loop.soon and [d for d, _ in loop.later] == [0.003]
    loop.later.pop()[1]()
    assert len(t.writes) == 3
    # 3. A 20 ms pass, then a delivery at once: wait, but never more than 5 ms.
    slow_flush(0.020)
    conn.send(b"{}")
    loop.later.pop()[1]()
    conn.send(b"{}")
    assert [d for d, _ in loop.later] == [0.005]
    loop.later.pop()[1]()
    # 4. A 20 ms pass, then a delivery 12 ms later (a busy machine's slow pass at a
    #    moderate rate): no wait; nor after a quiet gap.
    now[0] += 0.012
    conn.send(b"{}")
    assert len(loop.soon) == 1 and not loop.later
    loop.run()
    cost[0] = 0.0
    now[0] += 1.0
    conn.send(b"{}")
    assert len(loop.soon) == 1 and not loop.later
    loop.run()
    assert len(t.writes) == 7


def test_hub_conflates_transcode_progress_for_a_backed_up_reader() -> None:
    hub = Hub()
    loop = FakeLoop()
    a, ta = make_conn(loop)
    hub.add(a)
    hub.subscribe(a, "transcode:j", SubState("e", 0))
    ta.backlog = HIGH_WATER + 1
    for seq in range(1, 6):
        hub.deliver(pub("transcode:j", seq, "transcode.progress"))
    hub.deliver(pub("transcode:j", 6, "transcode.complete"))
    hub.deliver(pub("transcode:j", 7, "transcode.progress"))
    assert a.outbox.drain() == [
        pub("transcode:j", 5, "transcode.progress").frame,
        pub("transcode:j", 6, "transcode.complete").frame,
        pub("transcode:j", 7, "transcode.progress").frame,
    ]
