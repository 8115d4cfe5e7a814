"""``core/session.py``: the sans-I/O session (decode, rate limits, replay, liveness)."""

from __future__ import annotations

from typing import Any

import orjson

from revenge_ws.codes import CloseCode
from revenge_ws.core.session import Close, Dispatch, Replay, Reply, Session, SessionLimits

from .core_fixtures import make_session


def _err(action: Any) -> dict[str, Any]:
    assert isinstance(action, Reply)
    msg: dict[str, Any] = orjson.loads(action.payload)
    return msg


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


def test_session_control_frames_spend_the_inbound_budget() -> None:
    """Pure: a ping or pong frame costs one message of the budget; over it each one is a
    RATE_LIMITED error (no id), and the strike after the last allowed one closes 4004."""
    s = Session(
        "s1",
        "alice",
        expires_at=1e9,
        limits=SessionLimits(inbound_rate=10, inbound_burst=5, rate_limit_strikes=3),
        now=0.0,
    )
    assert [s.control(0.0) for _ in range(5)] == [None] * 5
    for _ in range(3):
        verdict = s.control(0.0)
        assert isinstance(verdict, Reply)
        err = orjson.loads(verdict.payload)
        assert err["type"] == "error" and "id" not in err
        assert err["data"]["code"] == "RATE_LIMITED" and err["data"]["retryable"] is True
    closed = s.control(0.0)
    assert isinstance(closed, Close) and closed.code == 4004
    # Control frames and messages share one budget.
    s = Session("s2", "bob", 1e9, SessionLimits(inbound_rate=10, inbound_burst=2), 0.0)
    assert s.control(0.0) is None
    assert isinstance(s.receive('{"type":"ping"}', 0.0), Dispatch)
    assert isinstance(s.receive('{"type":"ping"}', 0.0), Reply)
    assert isinstance(s.control(0.0), Reply)
    assert s.control(0.1) is None  # refilled: 10/s
    # And they prove liveness.
    s.control(50.0)
    assert s.last_seen == 50.0 and s.check(100.0) is None


def test_session_legitimate_pings_are_never_limited() -> None:
    """Default limits: a ping frame every 2 s for 20 minutes, alongside 90 messages/s and
    a pong frame every 2 s, is never refused."""
    s = Session("s1", "alice", 1e9, SessionLimits(), 0.0)
    t = 0.0
    for step in range(600):
        t = step * 2.0
        assert s.control(t) is None
        assert s.control(t + 0.5) is None  # a pong
        for i in range(180):
            assert isinstance(s.receive('{"type":"x"}', t + 0.01 + i / 90), Dispatch)
    assert s.strikes == 0
