from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from revenge_ws.codes import CloseCode, ErrorCode, should_reconnect
from revenge_ws.exceptions import ProtocolError
from revenge_ws.protocol import (
    decode_envelope,
    encode_ack,
    encode_error,
    encode_message,
    encode_publication,
    frame_text,
    rfc3339,
)


def test_decode_minimal_and_full() -> None:
    env = decode_envelope('{"type": "ping"}')
    assert env.type == "ping" and env.id is None and env.data == {}
    env = decode_envelope(
        b'{"type":"subscribe","id":"c-1","timestamp":"2026-01-01T00:00:00Z","data":{"a":1},"x":2}'
    )
    assert (env.type, env.id, env.data, env.timestamp) == (
        "subscribe",
        "c-1",
        {"a": 1},
        "2026-01-01T00:00:00Z",
    )
    assert decode_envelope('{"type":"x","data":null}').data == {}


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("not json", ErrorCode.INVALID_JSON),
        (b"\xff\xfe", ErrorCode.INVALID_JSON),
        ("[1,2]", ErrorCode.INVALID_MESSAGE),
        ('{"id":"1"}', ErrorCode.INVALID_MESSAGE),
        ('{"type":""}', ErrorCode.INVALID_MESSAGE),
        ('{"type":5}', ErrorCode.INVALID_MESSAGE),
        ('{"type":"x","id":5}', ErrorCode.INVALID_MESSAGE),
        ('{"type":"x","data":[1]}', ErrorCode.INVALID_MESSAGE),
        ('{"type":"x","timestamp":5}', ErrorCode.INVALID_MESSAGE),
        ('{"type":"' + "t" * 65 + '"}', ErrorCode.INVALID_MESSAGE),
        ('{"type":"x","id":"' + "i" * 129 + '"}', ErrorCode.INVALID_MESSAGE),
    ],
)
def test_decode_refusals(raw: str | bytes, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_envelope(raw)
    assert info.value.code is code


def test_deep_nesting_refused_and_keeps_id() -> None:
    deep = '{"type":"x","id":"d","data":' + '{"a":' * 40 + "1" + "}" * 40 + "}"
    with pytest.raises(ProtocolError) as info:
        decode_envelope(deep)
    assert info.value.code is ErrorCode.INVALID_MESSAGE
    assert info.value.request_id == "d"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256) | st.text(max_size=256).map(str.encode))
def test_decoder_never_raises_anything_but_protocol_error(raw: bytes) -> None:
    try:
        decode_envelope(raw)
    except ProtocolError as exc:
        assert exc.code in (ErrorCode.INVALID_JSON, ErrorCode.INVALID_MESSAGE)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["type", "id", "data", "timestamp", "x"]), json_values))
def test_structured_fuzz(obj: dict[str, object]) -> None:
    try:
        raw = orjson.dumps(obj)
    except TypeError:
        return
    try:
        env = decode_envelope(raw)
    except ProtocolError:
        return
    assert isinstance(env.type, str) and isinstance(env.data, dict)


def test_encoders_roundtrip() -> None:
    assert orjson.loads(encode_ack("1", {"a": 1})) == {"type": "ack", "id": "1", "data": {"a": 1}}
    err = orjson.loads(encode_error("2", ErrorCode.NOT_FOUND, "nope", False))
    assert err == {
        "type": "error",
        "id": "2",
        "data": {"code": "NOT_FOUND", "message": "nope", "retryable": False},
    }
    assert "id" not in orjson.loads(encode_error(None, ErrorCode.INTERNAL, "x", True))
    assert orjson.loads(encode_message("welcome", {})) == {"type": "welcome", "data": {}}
    pub = orjson.loads(encode_publication("activity", "t", 3, "e", {"k": 1}, "ts"))
    assert pub == {
        "type": "t",
        "channel": "activity",
        "seq": 3,
        "epoch": "e",
        "timestamp": "ts",
        "data": {"k": 1},
    }
    assert rfc3339(0).startswith("1970-01-01T00:00:00.000") and rfc3339(0).endswith("Z")


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_frame_text_headers(size: int) -> None:
    payload = b"a" * size
    frame = frame_text(payload)
    assert frame[0] == 0x81
    if size < 126:
        assert frame[1] == size and frame[2:] == payload
    elif size < 65536:
        assert frame[1] == 126 and int.from_bytes(frame[2:4], "big") == size
        assert frame[4:] == payload
    else:
        assert frame[1] == 127 and int.from_bytes(frame[2:10], "big") == size
        assert frame[10:] == payload


@pytest.mark.parametrize(
    ("code", "reconnect"),
    [
        (None, True),
        (1000, False),
        (1001, True),
        (1003, False),
        (1006, True),
        (1008, False),
        (1009, False),
        (1011, True),
        (1012, True),
        (CloseCode.TOKEN_EXPIRED, True),
        (CloseCode.SLOW_CONSUMER, True),
        (CloseCode.HEARTBEAT_TIMEOUT, True),
        (CloseCode.RATE_LIMITED, True),
        (4100, True),
        (4499, True),
        (CloseCode.UNAUTHORIZED, False),
        (CloseCode.DISCONNECTED, False),
        (4999, False),
        (3000, True),
        (5000, False),
    ],
)
def test_reconnect_classes(code: int | None, reconnect: bool) -> None:
    assert should_reconnect(code) is reconnect


def test_encoded_messages_occupy_their_own_size() -> None:
    """The hub keeps encoded messages for minutes (history, remembered replies); each
    must cost about its length, not the JSON encoder's whole output buffer."""
    import tracemalloc

    from revenge_ws.protocol import encode_ack, encode_publication

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [encode_ack(f"r{i}", {}) for i in range(1000)]
        kept += [
            encode_publication("user:u", "device.updated", i, "e", {"x": "y" * 600}, "t")
            for i in range(1000)
        ]
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    length = sum(len(k) for k in kept)
    assert used < 2 * length + 200_000, (used, length)
