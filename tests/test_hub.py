"""``core/hub.py``: fan-out with seq checks, gaps, pending buffers and conflation."""

from __future__ import annotations

from revenge_ws.codes import CloseCode
from revenge_ws.core.connection import HIGH_WATER, Flusher, SubState
from revenge_ws.core.hub import Hub

from .core_fixtures import FakeLoop, make_conn, pub


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
