"""The wire contract ``revenge.v1``, sans I/O: bytes in, envelopes out, and back.

Nothing here touches a socket or a clock of its own; the server and the Python client
both build on it. Encoding uses orjson, so a publication is serialized exactly once and
the same bytes go to every recipient (and, framed once, to every socket).
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from .codes import CloseCode, ErrorCode, should_reconnect
from .exceptions import ProtocolError

__all__ = [
    "SUBPROTOCOL",
    "CloseCode",
    "Envelope",
    "ErrorCode",
    "StreamPosition",
    "decode_envelope",
    "encode",
    "encode_ack",
    "encode_error",
    "encode_message",
    "encode_publication",
    "frame_text",
    "now_ms",
    "rfc3339",
    "should_reconnect",
]

SUBPROTOCOL = "revenge.v1"

# Envelopes nested deeper than this are refused before anything walks them.
MAX_DEPTH = 32


def now_ms() -> float:
    """Wall-clock milliseconds since the Unix epoch (the contract's time unit)."""
    return time.time() * 1000.0


def rfc3339(ts_ms: float | None = None) -> str:
    """An RFC 3339 UTC timestamp with millisecond precision."""
    t = time.time() if ts_ms is None else ts_ms / 1000.0
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class StreamPosition:
    """Where a channel's history stands: ``seq`` of the last publication in ``epoch``."""

    epoch: str
    seq: int


@dataclass(slots=True)
class Envelope:
    """One decoded client message (contract §2)."""

    type: str
    id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    timestamp: str | None = None


def _depth(value: Any, limit: int) -> int:
    # Iterative so that a hostile nesting cannot exhaust the interpreter stack.
    stack: list[tuple[Any, int]] = [(value, 1)]
    deepest = 0
    while stack:
        item, d = stack.pop()
        if d > deepest:
            deepest = d
            if deepest > limit:
                return deepest
        if isinstance(item, dict):
            stack.extend((v, d + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, d + 1) for v in item)
    return deepest


def decode_envelope(raw: str | bytes) -> Envelope:
    """Decode and validate one client frame.

    Raises :class:`ProtocolError` with ``INVALID_JSON`` when the frame is not JSON and
    ``INVALID_MESSAGE`` when it is JSON but not an envelope. The error keeps the
    request ``id`` when one could be read, so the reply can carry it.
    """
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(ErrorCode.INVALID_JSON, f"not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "an envelope must be a JSON object")
    msg_id = obj.get("id")
    if msg_id is not None and not isinstance(msg_id, str):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "'id' must be a string")
    if msg_id is not None and len(msg_id) > 128:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "'id' is longer than 128 characters")
    mtype = obj.get("type")
    data = obj.get("data", {})
    ts = obj.get("timestamp")
    problem = None
    if not isinstance(mtype, str) or not mtype:
        problem = "'type' must be a non-empty string"
    elif len(mtype) > 64:
        problem = "'type' is longer than 64 characters"
    elif data is None:
        data = {}
    elif not isinstance(data, dict):
        problem = "'data' must be an object"
    elif ts is not None and not isinstance(ts, str):
        problem = "'timestamp' must be an RFC 3339 string"
    elif _depth(data, MAX_DEPTH) > MAX_DEPTH:
        problem = f"'data' is nested deeper than {MAX_DEPTH} levels"
    if problem is not None:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, problem, request_id=msg_id)
    assert isinstance(mtype, str)
    return Envelope(type=mtype, id=msg_id, data=data, timestamp=ts)


def encode(obj: Any) -> bytes:
    """Serialize one JSON value (UTF-8 bytes), in a bytes object of its own size.

    orjson (3.12 and later) hands out its whole output buffer: a 40-byte ack occupies
    4 KiB, a 700-byte publication 4-16 KiB, whatever ``len()`` says. The hub keeps many
    encoded messages for minutes (channel history, the replies remembered for repeated
    request ids, presence entries), so every encoder here copies the output to its
    exact size (~0.2 µs): without it a node with 10,000 devices held 420 MiB more.
    """
    return memoryview(orjson.dumps(obj)).tobytes()


def encode_message(mtype: str, data: dict[str, Any], msg_id: str | None = None) -> bytes:
    """A server message with no ``seq`` (replies, ``welcome``, direct messages)."""
    if msg_id is None:
        return encode({"type": mtype, "data": data})
    return encode({"type": mtype, "id": msg_id, "data": data})


def encode_ack(msg_id: str, data: dict[str, Any]) -> bytes:
    return encode({"type": "ack", "id": msg_id, "data": data})


def encode_error(
    msg_id: str | None, code: ErrorCode, message: str, retryable: bool = False
) -> bytes:
    data = {"code": code.value, "message": message, "retryable": retryable}
    if msg_id is None:
        return encode({"type": "error", "data": data})
    return encode({"type": "error", "id": msg_id, "data": data})


def encode_publication(
    channel: str, mtype: str, seq: int, epoch: str, data: dict[str, Any], timestamp: str
) -> bytes:
    """A publication on a channel (contract §2), encoded once for every recipient."""
    return encode(
        {
            "type": mtype,
            "channel": channel,
            "seq": seq,
            "epoch": epoch,
            "timestamp": timestamp,
            "data": data,
        }
    )


_H1 = struct.Struct("!BB").pack
_H2 = struct.Struct("!BBH").pack
_H3 = struct.Struct("!BBQ").pack


def frame_text(payload: bytes) -> bytes:
    """Wrap a payload in one unmasked, uncompressed RFC 6455 text frame (server side).

    The hub frames a publication once and writes the same bytes to every socket, and it
    coalesces several queued frames into one ``write()``; no WebSocket library exposes
    a frame encoder for that, and a server frame is only a 2-10 byte header.
    """
    n = len(payload)
    if n < 126:
        return _H1(0x81, n) + payload
    if n < 65536:
        return _H2(0x81, 126, n) + payload
    return _H3(0x81, 127, n) + payload
