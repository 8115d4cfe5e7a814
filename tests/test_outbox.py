"""``core/outbox.py``: the bounded outbound queue with per-key conflation."""

from __future__ import annotations

from revenge_ws.core.outbox import Outbox


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
