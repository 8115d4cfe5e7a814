"""Cluster-wide control messages, typed.

The broker carries them to every node (:meth:`~revenge_ws.broker.base.Broker.publish_control`)
as JSON objects with an ``"op"``; this module is the one place that knows that shape.
Nodes of one release and the next must understand each other during a rolling upgrade,
so fields are only ever added, and :func:`decode` ignores what it does not know (an
unknown ``op``, a malformed field: ``None``, never an exception).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..codes import CloseCode

__all__ = [
    "Broadcast",
    "ControlMessage",
    "DeviceTakeover",
    "Disconnect",
    "EndChannel",
    "RemoteCommand",
    "RemoteReply",
    "Revoke",
    "SessionAction",
    "SubscribeUser",
    "decode",
    "encode",
]


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Close every connection of ``user_id`` with ``code`` (backend ``disconnect``)."""

    user_id: str
    code: int = CloseCode.DISCONNECTED
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Revoke:
    """The user's tokens were revoked: close their connections with 4501."""

    user_id: str
    code: int = CloseCode.UNAUTHORIZED
    reason: str = "token revoked"


@dataclass(frozen=True, slots=True)
class SubscribeUser:
    """Subscribe every connection of ``user_id`` to ``channel`` (a transcode job started)."""

    user_id: str
    channel: str


@dataclass(frozen=True, slots=True)
class SessionAction:
    """Act on one connection, on whichever node holds it (SyncPlay effects)."""

    session_id: str
    action: Literal["send", "subscribe", "unsubscribe"]
    channel: str | None = None
    #: A direct message, for ``send`` (JSON text).
    payload: str | None = None
    #: ``unsubscribe`` waits (bounded) until the connection got this ``seq``.
    after_seq: int | None = None


@dataclass(frozen=True, slots=True)
class EndChannel:
    """A channel ended (a finished transcode job): tell its subscribers, unsubscribe them."""

    channel: str


@dataclass(frozen=True, slots=True)
class Broadcast:
    """A direct message to every connection of ``user_id``."""

    user_id: str
    payload: str


@dataclass(frozen=True, slots=True)
class DeviceTakeover:
    """Another connection said ``device.hello`` with the device ``session_id`` was."""

    session_id: str
    device_id: str


@dataclass(frozen=True, slots=True)
class RemoteCommand:
    """Deliver a remote command to the device held by ``session_id`` on ``node_id``;
    the result goes back to ``origin`` (a node id) as a :class:`RemoteReply`."""

    node_id: str
    session_id: str
    device_id: str
    command_id: str
    origin: str
    command: str
    args: dict[str, Any]
    #: Who asked: a user id (None: the backend), and their device if they are one.
    from_user: str | None
    from_device: str | None
    timeout_ms: int


@dataclass(frozen=True, slots=True)
class RemoteReply:
    """The one answer to a :class:`RemoteCommand`, for the node ``node_id`` that waits.
    ``code`` is empty when the device said ok."""

    node_id: str
    command_id: str
    code: str = ""
    message: str = ""
    state: dict[str, Any] | None = None


ControlMessage = (
    Disconnect
    | Revoke
    | SubscribeUser
    | SessionAction
    | EndChannel
    | Broadcast
    | DeviceTakeover
    | RemoteCommand
    | RemoteReply
)

_OPS: dict[type[ControlMessage], str] = {
    Disconnect: "disconnect",
    Revoke: "revoke",
    SubscribeUser: "subscribe_user",
    SessionAction: "session",
    EndChannel: "end_channel",
    Broadcast: "broadcast",
    DeviceTakeover: "device_takeover",
    RemoteCommand: "remote_command",
    RemoteReply: "remote_reply",
}
_ACTIONS = ("send", "subscribe", "unsubscribe")


def encode(msg: ControlMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"op": _OPS[type(msg)]}
    for name in msg.__slots__:
        out[name] = getattr(msg, name)
    return out


def _str(raw: dict[str, Any], key: str) -> str | None:
    value = raw.get(key)
    return value if isinstance(value, str) else None


def _int(raw: dict[str, Any], key: str) -> int | None:
    value = raw.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def decode(raw: dict[str, Any]) -> ControlMessage | None:
    """The message ``raw`` describes, or None when it is unknown or malformed."""
    op = raw.get("op")
    user = _str(raw, "user_id")
    if op in ("disconnect", "revoke") and user is not None:
        if op == "revoke":
            return Revoke(user)
        code = _int(raw, "code")
        reason = _str(raw, "reason") or ""
        return Disconnect(user, CloseCode.DISCONNECTED if code is None else code, reason[:120])
    if op == "subscribe_user" and user is not None and (ch := _str(raw, "channel")):
        return SubscribeUser(user, ch)
    if op == "session" and (sid := _str(raw, "session_id")) and raw.get("action") in _ACTIONS:
        return SessionAction(
            sid, raw["action"], _str(raw, "channel"), _str(raw, "payload"), _int(raw, "after_seq")
        )
    if op == "end_channel" and (ch := _str(raw, "channel")):
        return EndChannel(ch)
    if op == "broadcast" and user is not None and (payload := _str(raw, "payload")) is not None:
        return Broadcast(user, payload)
    if (
        op == "device_takeover"
        and (sid := _str(raw, "session_id"))
        and (dev := _str(raw, "device_id"))
    ):
        return DeviceTakeover(sid, dev)
    if op == "remote_command":
        return _remote_command(raw)
    if op == "remote_reply" and (node := _str(raw, "node_id")) and (cid := _str(raw, "command_id")):
        state = raw.get("state")
        return RemoteReply(
            node,
            cid,
            _str(raw, "code") or "",
            _str(raw, "message") or "",
            state if isinstance(state, dict) else None,
        )
    return None


def _remote_command(raw: dict[str, Any]) -> RemoteCommand | None:
    strings = [
        _str(raw, k)
        for k in ("node_id", "session_id", "device_id", "command_id", "origin", "command")
    ]
    args, timeout = raw.get("args"), _int(raw, "timeout_ms")
    if any(s is None for s in strings) or not isinstance(args, dict) or timeout is None:
        return None
    node, sid, dev, cid, origin, command = (s or "" for s in strings)
    return RemoteCommand(
        node,
        sid,
        dev,
        cid,
        origin,
        command,
        args,
        _str(raw, "from_user"),
        _str(raw, "from_device"),
        timeout,
    )
