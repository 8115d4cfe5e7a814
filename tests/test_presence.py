"""The presence coalescer (contract v1.1 §11) as a pure unit, on a fake clock."""

from __future__ import annotations

import pytest

from revenge_ws.core.presence import PresenceChange, PresenceCoalescer

W, G = 1.0, 10.0


def flush_at(co: PresenceCoalescer, now: float) -> PresenceChange | None:
    assert co.flush_due(now)
    return co.flush(now)


def settle(co: PresenceCoalescer, now: float, connected: set[str]) -> None:
    """What the driver does with users whose grace ended: ask the cluster."""
    for user, deadline in co.due(now):
        if user in connected:
            co.cancel_offline(user, deadline)
        else:
            co.confirm_offline(user, deadline, now)


def test_changes_in_one_window_make_one_publication() -> None:
    co = PresenceCoalescer(W, G)
    for i in range(500):
        co.online(f"u{i}", f"User {i}", 100.0 + i / 1000)
    assert not co.flush_due(100.9)
    assert co.flush(100.9) is None
    change = flush_at(co, 101.0)
    assert change is not None
    assert len(change.online) == 500 and change.offline == {}
    assert change.data()["online"][0] == {"user_id": "u0", "name": "User 0"}
    assert co.next_wakeup() is None


def test_a_storm_costs_about_its_duration_over_the_window() -> None:
    """N users arriving over T seconds: at most T / window + 1 publications."""
    co = PresenceCoalescer(W, G)
    published, reported = 0, 0
    t = 0.0
    for i in range(10_000):
        t = i * 0.001  # 10,000 users over 10 s
        co.online(f"u{i}", "", t)
        change = co.flush(t)
        if change is not None:
            published += 1
            reported += len(change.online)
    change = co.flush(t + W)
    assert change is not None
    published += 1
    reported += len(change.online)
    assert reported == 10_000
    assert published <= 10 / W + 1


def test_offline_waits_for_the_grace_and_a_return_cancels_it() -> None:
    co = PresenceCoalescer(W, G)
    co.online("alice", "Alice", 0.0)
    flush_at(co, 1.0)
    deadline = co.offline("alice", "Alice", 5.0)
    assert deadline == 15.0
    assert co.next_wakeup() == 15.0
    assert co.due(14.9) == []
    co.online("alice", "Alice", 12.0)  # reconnected within the grace
    assert co.in_grace == 0
    assert co.due(20.0) == []
    assert co.flush(30.0, force=True) is None  # nothing to say


def test_offline_is_reported_once_confirmed() -> None:
    co = PresenceCoalescer(W, G)
    co.offline("bob", "Bob", 0.0)
    assert co.flush(5.0, force=True) is None  # still in the grace
    settle(co, 10.0, connected=set())
    change = flush_at(co, 11.0)
    assert change is not None
    assert change.offline == {"bob": "Bob"} and change.online == {}


def test_a_user_connected_elsewhere_is_not_reported_offline() -> None:
    co = PresenceCoalescer(W, G)
    co.offline("bob", "Bob", 0.0)
    settle(co, 10.0, connected={"bob"})
    assert co.in_grace == 0
    assert co.next_wakeup() is None


def test_came_and_went_within_the_window_is_in_neither_list() -> None:
    co = PresenceCoalescer(W, 0.0)
    co.online("carol", "Carol", 0.0)
    co.offline("carol", "Carol", 0.2)
    settle(co, 0.2, connected=set())
    co.online("dave", "Dave", 0.3)
    assert flush_at(co, 1.0) == PresenceChange(online={"dave": "Dave"}, offline={})


def test_went_and_came_back_within_the_window_is_in_neither_list() -> None:
    co = PresenceCoalescer(W, 0.0)
    co.offline("erin", "Erin", 0.0)
    settle(co, 0.0, connected=set())
    co.online("erin", "Erin", 0.5)
    assert co.flush_due(1.0)
    assert co.flush(1.0) is None  # cancelled out: no publication


def test_a_later_close_restarts_the_grace() -> None:
    co = PresenceCoalescer(W, G)
    first = co.offline("fay", "Fay", 0.0)
    co.online("fay", "Fay", 3.0)
    second = co.offline("fay", "Fay", 4.0)
    co.confirm_offline("fay", first, 10.0)  # stale: ignored
    assert co.in_grace == 1
    assert co.due(10.0) == []
    assert co.due(14.0) == [("fay", second)]


def test_unchecked_users_are_due_again() -> None:
    co = PresenceCoalescer(W, G)
    deadline = co.offline("gus", "Gus", 0.0)
    due = co.due(10.0)
    assert due == [("gus", deadline)]
    co.requeue(due)  # the broker was down
    assert co.due(10.0) == [("gus", deadline)]


def test_suppressed_arrivals_are_not_reported() -> None:
    co = PresenceCoalescer(W, G)
    co.online("hal", "Hal", 2.0)
    co.online("ivy", "Ivy", 2.5)
    assert co.online_since() == {"hal": 2.0, "ivy": 2.5}
    co.suppress_online("hal")  # still in its grace on another node
    assert flush_at(co, 3.0) == PresenceChange(online={"ivy": "Ivy"}, offline={})


def test_stopping_forgets_the_graces() -> None:
    co = PresenceCoalescer(W, G)
    co.offline("jo", "Jo", 0.0)
    co.online("kim", "Kim", 0.0)
    assert co.drop_graces() == 1
    assert co.due(100.0) == []
    assert co.flush(0.1, force=True) == PresenceChange(online={"kim": "Kim"}, offline={})


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="window"):
        PresenceCoalescer(0.0, 1.0)
    with pytest.raises(ValueError, match="grace"):
        PresenceCoalescer(1.0, -1.0)


def test_a_large_batch_names_a_bounded_number_of_users() -> None:
    co = PresenceCoalescer(W, 0.0)
    for i in range(250):
        co.online(f"u{i}", f"U{i}", 0.0)
    for i in range(3):
        co.offline(f"x{i}", f"X{i}", 0.0)
    settle(co, 0.0, connected=set())
    change = flush_at(co, 1.0)
    assert change is not None
    data = change.data(100)
    assert len(data["online"]) == 100 and len(data["offline"]) == 3
    assert data["more"] == {"online": 150, "offline": 0}
    assert "more" not in change.data(1000)
