"""``core/connection.py``: write coalescing, backpressure, closing, the Flusher."""

from __future__ import annotations

from revenge_ws.codes import CloseCode
from revenge_ws.core.connection import HIGH_WATER, Flusher
from revenge_ws.protocol import frame_text

from .core_fixtures import FakeLoop, make_conn


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


def test_lazy_frames_linger_until_the_linger_pass_or_a_reply() -> None:
    """During a storm a fan-out frame waits ``linger`` seconds so that the publications
    of that time leave in one write; a reply does not wait and takes them with it."""
    loop = FakeLoop()
    flusher = Flusher(loop, linger=1.0)
    conn, t = make_conn(loop, "a", "alice")
    conn.flusher = flusher
    other, t2 = make_conn(loop, "b", "bob")
    other.flusher = flusher

    for i in range(3):
        conn.send_frame(frame_text(b'{"p":%d}' % i), lazy=True)
    other.send_latest("transcode:j", frame_text(b'{"progress":1}'), lazy=True)
    assert not loop.soon and [d for d, _ in loop.later] == [1.0]  # one timer for all
    loop.later.pop()[1]()
    assert t.writes == [b"".join(frame_text(b'{"p":%d}' % i) for i in range(3))]
    assert t2.writes == [frame_text(b'{"progress":1}')]

    # A reply flushes the lingering frames in order, in one write, at once.
    conn.send_frame(frame_text(b'{"p":3}'), lazy=True)
    conn.send(b'{"reply":1}')
    loop.run()
    assert t.writes[-1] == frame_text(b'{"p":3}') + frame_text(b'{"reply":1}')
    loop.later.pop()[1]()  # the linger pass finds nothing left
    assert len(t.writes) == 2

    # A connection already due for a flush does not linger.
    conn.send(b'{"reply":2}')
    conn.send_frame(frame_text(b'{"p":4}'), lazy=True)
    assert not loop.later
    loop.run()
    assert t.writes[-1] == frame_text(b'{"reply":2}') + frame_text(b'{"p":4}')

    # linger 0: lazy frames leave in the next iteration like any other.
    flusher.linger = 0.0
    conn.send_frame(frame_text(b'{"p":5}'), lazy=True)
    assert not loop.later and loop.soon
    loop.run()
    assert t.writes[-1] == frame_text(b'{"p":5}')
