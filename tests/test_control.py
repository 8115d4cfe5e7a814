"""Cluster control messages (core/control.py): typed, and tolerant of what they do not know."""

from __future__ import annotations

from typing import Any

import pytest

from revenge_ws.core import control
from revenge_ws.core.control import (
    Broadcast,
    Disconnect,
    EndChannel,
    Revoke,
    SessionAction,
    SubscribeUser,
)


@pytest.mark.parametrize(
    "msg",
    [
        Disconnect("u1", 4503, "bye"),
        Revoke("u1"),
        SubscribeUser("u1", "transcode:j1"),
        SessionAction("s1", "send", payload='{"type": "x"}'),
        SessionAction("s1", "unsubscribe", channel="playback:r1", after_seq=7),
        EndChannel("transcode:j1"),
        Broadcast("u1", '{"type": "y"}'),
    ],
)
def test_every_message_survives_the_wire(msg: control.ControlMessage) -> None:
    assert control.decode(control.encode(msg)) == msg


def test_the_wire_shape_is_the_one_older_nodes_speak() -> None:
    """Rolling upgrades: nodes of the previous release send and expect these objects."""
    assert control.encode(Revoke("u1")) == {
        "op": "revoke",
        "user_id": "u1",
        "code": 4501,
        "reason": "token revoked",
    }
    assert control.decode({"op": "revoke", "user_id": "u1", "code": 4501}) == Revoke("u1")
    assert control.decode({"op": "disconnect", "user_id": "u1", "code": 4400}) == Disconnect(
        "u1", 4400, ""
    )
    assert control.encode(SubscribeUser("u", "c")) == {
        "op": "subscribe_user",
        "user_id": "u",
        "channel": "c",
    }


@pytest.mark.parametrize(
    "raw",
    [
        {},
        {"op": "explode"},
        {"op": "disconnect"},
        {"op": "disconnect", "user_id": 7},
        {"op": "subscribe_user", "user_id": "u"},
        {"op": "session", "session_id": "s", "action": "delete"},
        {"op": "end_channel", "channel": ""},
        {"op": "broadcast", "user_id": "u", "payload": 3},
    ],
)
def test_what_a_node_does_not_understand_is_ignored(raw: dict[str, Any]) -> None:
    assert control.decode(raw) is None


def test_malformed_fields_fall_back_to_safe_values() -> None:
    msg = control.decode({"op": "disconnect", "user_id": "u", "code": True, "reason": "x" * 500})
    assert msg == Disconnect("u", 4503, "x" * 120)
    action = control.decode(
        {"op": "session", "session_id": "s", "action": "send", "after_seq": "9"}
    )
    assert action == SessionAction("s", "send")
