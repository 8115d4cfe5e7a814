"""Hostile input: what an attacker can send, and the clean refusal it gets.

Covers what ``test_protocol.py`` / ``test_ws.py`` do not: the decoder under mutation and
hostile numbers, every request handler under a bounded fuzzer (never ``INTERNAL``), a flood
of 10,000 malformed messages over 20 connections against a hub *process* (RSS measured from
/proc), RFC 6455 framing abuse on a raw socket (5,000-fragment messages, reserved bits,
bad opcodes, oversize lengths), the refused compression extension and a deflate bomb, the
exact message-size boundary, the conformance echo endpoint, and schemathesis against the
OpenAPI document. Figures are in ``docs/reliability.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import aiohttp
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from revenge_ws.auth import mint_token
from revenge_ws.codes import ErrorCode
from revenge_ws.exceptions import ProtocolError
from revenge_ws.protocol import MAX_DEPTH, decode_envelope

from .helpers import (
    API_KEY,
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_TEXT,
    WS,
    FrameReader,
    Hub,
    fragments,
    frame,
    handshake,
    make_settings,
    masked_text_frame,
    start_hub_process,
)


# -- raw sockets on the hub ------------------------------------------------------------------
def open_raw(
    hub: Hub, sub: str = "alice", rcvbuf: int = 1 << 20
) -> tuple[socket.socket, FrameReader]:
    sock, head = handshake(hub.port, f"/api/v1/ws?token={hub.token(sub)}")
    assert head.startswith(b"HTTP/1.1 101"), head[:200]
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    reader = FrameReader(sock)
    first = reader.next()
    assert first is not None and orjson.loads(first[1])["type"] == "welcome"
    return sock, reader


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# -- the decoder -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "outcome"),
    [
        # orjson refuses numbers that overflow a double: the frame is INVALID_JSON.
        ('{"type":"x","data":{"n":1e400}}', "INVALID_JSON"),
        ('{"type":"x","data":{"n":-1e400}}', "INVALID_JSON"),
        ('{"type":"x","data":{"n":' + "9" * 400 + "}}", "INVALID_JSON"),
        # Integers beyond 64 bits become (lossy) floats, up to 2**64-1 they stay ints.
        ('{"type":"x","data":{"n":' + str(2**70) + "}}", float(2**70)),
        ('{"type":"x","data":{"n":' + str(2**64 - 1) + "}}", 2**64 - 1),
        ('{"type":"x","data":{"n":' + str(-(2**63)) + "}}", -(2**63)),
        ('{"type":"x","data":{"n":1e-400}}', 0.0),
        # NaN/Infinity literals and lone surrogates are not JSON.
        ('{"type":"x","data":{"n":NaN}}', "INVALID_JSON"),
        ('{"type":"x","data":{"n":Infinity}}', "INVALID_JSON"),
        ('{"type":"x","data":{"s":"\\ud800"}}', "INVALID_JSON"),
        # Nesting: our guard (32 levels in data) answers INVALID_MESSAGE; beyond orjson's
        # own 1,024-level limit the parser refuses first (INVALID_JSON), without recursion.
        (
            '{"type":"x","data":' + '{"a":' * (MAX_DEPTH - 1) + "1" + "}" * (MAX_DEPTH - 1) + "}",
            {"a": {}},
        ),
        (
            '{"type":"x","data":' + '{"a":' * MAX_DEPTH + "1" + "}" * MAX_DEPTH + "}",
            "INVALID_MESSAGE",
        ),
        ('{"type":"x","data":{"a":' + "[" * 5000 + "]" * 5000 + "}}", "INVALID_JSON"),
        # Wrong types everywhere.
        ('{"type":["ping"]}', "INVALID_MESSAGE"),
        ('{"type":"x","id":{"a":1}}', "INVALID_MESSAGE"),
        ('{"type":"x","id":null}', None),
        ('{"type":"x","data":"{}"}', "INVALID_MESSAGE"),
        ('{"type":"x","timestamp":["2026"]}', "INVALID_MESSAGE"),
        ("null", "INVALID_MESSAGE"),
        ('"ping"', "INVALID_MESSAGE"),
        ("", "INVALID_JSON"),
    ],
)
def test_decoder_hostile_numbers_nesting_and_types(raw: str, outcome: object) -> None:
    try:
        env = decode_envelope(raw)
    except ProtocolError as exc:
        assert exc.code.value == outcome, exc.message
        return
    assert not isinstance(outcome, str), f"accepted, expected {outcome}"
    if isinstance(outcome, float | int) and not isinstance(outcome, bool):
        n = env.data["n"]
        assert n == outcome and type(n) is type(outcome)
    elif isinstance(outcome, dict):
        assert set(env.data) == set(outcome)


VALID = [
    b'{"type":"ping","id":"p1","data":{"t0":1}}',
    b'{"type":"subscribe","id":"s1","data":{"channels":["activity",'
    b'{"name":"library:l1","since":{"epoch":"ab","seq":4}}]}}',
    b'{"type":"notification.ack","id":"a","data":{"ids":["01J0000000000000000000000A"]}}',
    b'{"type":"syncplay.seek","id":"k","timestamp":"2026-01-01T00:00:00Z",'
    b'"data":{"room_id":"r","position":12.5}}',
]


@settings(max_examples=400, deadline=None)
@given(
    base=st.sampled_from(VALID),
    edits=st.lists(
        st.tuples(st.integers(0, 200), st.integers(0, 3), st.binary(min_size=0, max_size=6)),
        min_size=1,
        max_size=8,
    ),
)
def test_mutated_envelopes_are_refused_cleanly(
    base: bytes, edits: list[tuple[int, int, bytes]]
) -> None:
    """Byte-level mutations of valid envelopes (insert/replace/delete): the decoder returns an
    envelope or raises ProtocolError with INVALID_JSON/INVALID_MESSAGE, nothing else."""
    raw = bytearray(base)
    for pos, cut, ins in edits:
        p = pos % (len(raw) + 1)
        raw[p : p + cut] = ins
    try:
        env = decode_envelope(bytes(raw))
    except ProtocolError as exc:
        assert exc.code in (ErrorCode.INVALID_JSON, ErrorCode.INVALID_MESSAGE)
        assert exc.request_id is None or isinstance(exc.request_id, str)
        return
    assert isinstance(env.type, str) and 0 < len(env.type) <= 64
    assert isinstance(env.data, dict)
    assert env.id is None or (isinstance(env.id, str) and len(env.id) <= 128)


hostile_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
hostile_json = st.recursive(
    hostile_leaf,
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3)
    ),
    max_leaves=60,
)


@settings(max_examples=300, deadline=None)
@given(
    mtype=st.text(max_size=70) | st.integers() | st.none(),
    mid=st.text(max_size=140) | st.integers() | st.none(),
    data=hostile_json,
    depth=st.integers(0, 60),
)
def test_hostile_envelope_fields(mtype: object, mid: object, data: object, depth: int) -> None:
    """Any JSON in any field, nested up to 60 levels: a clean verdict, and the id survives
    into the error whenever it was a valid id."""
    for _ in range(depth):
        data = {"n": data}
    try:
        raw = orjson.dumps({"type": mtype, "id": mid, "data": data})
    except TypeError:
        return  # not representable as JSON (e.g. a lone surrogate)
    try:
        env = decode_envelope(raw)
    except ProtocolError as exc:
        assert exc.code in (ErrorCode.INVALID_JSON, ErrorCode.INVALID_MESSAGE)
        if isinstance(mid, str) and len(mid) <= 128:
            assert exc.request_id == mid
        return
    assert env.type == mtype and env.id == mid
    assert isinstance(env.data, dict) or data is None


# -- every request handler, fuzzed over the wire ---------------------------------------------
FIELDS = [
    "channels", "ids", "token", "preferences", "unread_only", "limit", "before", "room_id",
    "name", "content", "public", "password", "max_participants", "control_mode", "position",
    "rate", "message", "user_id", "invite_code", "code", "ignore", "is_playing",
    "is_buffering", "rtt_ms", "t0", "since", "settings", "id", "type",
]  # fmt: skip
BIG70 = "\x00big70"  # replaced by a literal 2**70 in the encoded frame
HOSTILE: list[Any] = [
    None, True, False, 0, -1, 1, 7, 2**31, 2**53 + 1, 2**63 - 1, 2**64 - 1, -(2**63), BIG70,
    1e308, -1e308, 5e-324, 0.5, -0.0, 3.0, "", " ", "x" * 5000, "\x00", "a:b", "activity",
    "library:l1", "notifications:bob", "playback:r1", "transcode:j1", "user:bob",
    "2026-01-01T00:00:00Z", "9999-12-31T23:59:59+23:59", "0000-01-01T00:00:00Z",
    "01JZZZZZZZZZZZZZZZZZZZZZZZ", "../../etc/passwd", "<script>alert(1)</script>", "é" * 200,
    "movie", "episode", "shared", "leader_only", [], [None], ["x"] * 300, [1, 2], [[[]]],
    ["activity", {"name": "library:l1", "since": {"epoch": "x", "seq": -1}}],
    [{"name": 5}], {}, {"a": {"b": {}}}, {"type": "movie", "id": "m1"}, {"type": 5, "id": []},
    {"epoch": "x", "seq": 2**64 - 1}, {"": True}, {"content.new_movie": "yes"},
]  # fmt: skip


def fuzz_data(rng: random.Random, room_id: str | None) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for name in rng.sample(FIELDS, rng.randint(0, 5)):
        data[name] = rng.choice(HOSTILE)
    if room_id is not None and rng.random() < 0.5:
        data["room_id"] = room_id
    if rng.random() < 0.1:
        data = {"n": data}
    return data


def encode_fuzz(mtype: str, mid: str, data: dict[str, Any]) -> str:
    text = orjson.dumps({"type": mtype, "id": mid, "data": data}).decode()
    return text.replace('"\\u0000big70"', str(2**70))


async def test_every_handler_fuzzed_never_internal(hub_with: Any) -> None:
    """Every registered request type × 30 hostile ``data`` objects (seeded, ~1,300 requests):
    each gets exactly one reply (ack or a typed error, never INTERNAL) and the connection
    stays open."""
    env = {"REVENGE_LIMITS_INBOUND_RATE": "100000", "REVENGE_LIMITS_INBOUND_BURST": "100000"}
    async with hub_with(env) as hub:
        types = sorted({*hub.node.handlers, "ping"})
        assert len(types) >= 25, types
        owner = await hub.connect("fuzzer", libraries=["l1"])
        created = await owner.request(
            "syncplay.create",
            {"name": "fuzz", "content": {"type": "movie", "id": "m1"}, "public": True},
        )
        room_id = created["data"]["room"]["room_id"] if created["type"] == "ack" else None
        ws = await hub.connect("fuzzer", libraries=["l1"])
        rng = random.Random(6455)
        unexpected: list[tuple[str, Any, Any]] = []
        sent = 0
        for mtype in types:
            for i in range(30):
                data = fuzz_data(rng, room_id)
                mid = f"{mtype}-{i}"
                await ws.ws.send_str(encode_fuzz(mtype, mid, data))
                sent += 1
                reply = await _reply(ws, mid)
                ws.backlog.clear()
                if reply is None:
                    unexpected.append((mtype, data, f"closed {ws.ws.close_code}"))
                    ws = await hub.connect("fuzzer", libraries=["l1"])
                    continue
                kind = reply["type"]
                code = reply["data"].get("code") if kind == "error" else None
                if kind not in ("ack", "error", "pong") or code == "INTERNAL":
                    unexpected.append((mtype, data, reply))
                elif kind == "error":
                    assert code in ErrorCode.__members__, reply
        assert sent == 30 * len(types)
        assert not unexpected, unexpected[:5]
        assert (await ws.request("ping", {"t0": 1}))["type"] == "pong"


async def _reply(ws: WS, mid: str, timeout: float = 10.0) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = await ws.ws.receive(timeout=max(0.1, deadline - time.monotonic()))
        if msg.type is not aiohttp.WSMsgType.TEXT:
            return None
        got: dict[str, Any] = orjson.loads(msg.data)
        if got.get("id") == mid:
            return got
    raise AssertionError(f"no reply to {mid}")


async def test_notification_preferences_bad_type_is_not_internal(hub: Hub) -> None:
    """Regression for the fuzzer's finding (an empty type was the store's ValueError, so
    an INTERNAL error; fixed in features/notifications.py)."""
    ws = await hub.connect("alice")
    reply = await ws.request("notification.preferences", {"preferences": {"": True}})
    assert reply["type"] == "error" and reply["data"]["code"] == "INVALID_MESSAGE"


async def test_notify_empty_user_id_is_not_500(hub: Hub) -> None:
    """Regression for schemathesis' findings (the store's ValueError was a 500 for an empty
    id in ``user_ids`` and for an empty type in preferences; fixed in
    features/notifications.py)."""
    status, body = await hub.request(
        "POST",
        "/api/v1/realtime/notify",
        json={"user_ids": [""], "notification_type": "x", "title": "t"},
    )
    assert status == 400 and body["error"]["code"] == "INVALID_MESSAGE", body
    status, body = await hub.request(
        "PUT",
        "/api/v1/notifications/preferences",
        json={"preferences": {"": True}},
        headers={"Authorization": f"Bearer {hub.token('alice')}"},
    )
    assert status == 400, body


# -- a flood of malformed messages -----------------------------------------------------------
MALFORMED = [
    "{nope",
    "[1,2,3]",
    '{"type":5}',
    '{"type":"x","data":[1]}',
    '{"type":"x","id":7}',
    '{"type":"ping","id":"n","data":{"n":1e400}}',
    '{"type":"x","id":"deep","data":' + '{"a":' * 100 + "1" + "}" * 100 + "}",
    '{"type":"' + "t" * 65 + '"}',
    '{"type":"no.such.type","id":"u"}',
    '{"a":' + "[" * 2000 + "]" * 2000 + "}",
    '{"type":"subscribe","id":"s","data":{"channels":123}}',
    '{"type":"x","data":{"s":"\\udc00"}}',
    '{"type":"x","id":"' + "i" * 200 + '"}',
    "",
]
FLOOD_TOTAL = 10_000
FLOOD_CONNECTIONS = 20
FLOOD_BATCH = 125


@pytest.mark.slow
async def test_flood_of_malformed_messages() -> None:
    """10,000 malformed frames over 20 concurrent abusers (default limits) against a hub
    process: every abuser gets typed errors, then RATE_LIMITED, then close 4004 (it then
    reconnects and goes on); the hub stays up, its RSS stays bounded, and a well-behaved
    client meanwhile receives every publication in order and still gets its pongs."""
    hp = await asyncio.to_thread(start_hub_process)
    try:
        async with aiohttp.ClientSession() as s:
            settings_ = make_settings()
            good = WS(
                await s.ws_connect(
                    f"{hp.ws_url}?token={mint_token(settings_.jwt, 'good')}",
                    protocols=["revenge.v1"],
                )
            )
            assert (await good.recv())["type"] == "welcome"
            await good.request("subscribe", {"channels": ["library:calm"]})
            rss_before = rss_kib(hp.proc.pid)
            codes: dict[str, int] = {}
            closes: dict[int | None, int] = {}
            limited: set[int] = set()
            sent = 0

            async def abuser(n: int, quota: int) -> None:
                nonlocal sent
                token = mint_token(settings_.jwt, f"abuser{n}")
                k = n
                connections = 0
                while quota > 0 and connections < 200:
                    connections += 1
                    ws = await s.ws_connect(f"{hp.ws_url}?token={token}")
                    await ws.receive(timeout=10)  # welcome
                    batch = min(FLOOD_BATCH, quota)
                    with contextlib.suppress(ConnectionError):
                        for _ in range(batch):
                            await ws.send_str(MALFORMED[k % len(MALFORMED)])
                            k += 1
                    quota -= batch
                    sent += batch
                    # One error per frame until the hub closes with 4004 (a very slow hub
                    # refills the bucket meanwhile: then every frame is answered).
                    for _ in range(batch):
                        msg = await ws.receive(timeout=10)
                        if msg.type is not aiohttp.WSMsgType.TEXT:
                            break
                        data = orjson.loads(msg.data)
                        assert data["type"] == "error", data
                        codes[data["data"]["code"]] = codes.get(data["data"]["code"], 0) + 1
                    if ws.close_code is None:
                        await ws.close()
                    closes[ws.close_code] = closes.get(ws.close_code, 0) + 1
                    if ws.close_code == 4004:
                        limited.add(n)

            async def publisher() -> int:
                n = 0
                for i in range(50):
                    async with s.post(
                        f"{hp.url}/api/v1/realtime/publish",
                        headers={"Authorization": f"Bearer {API_KEY}"},
                        json={"channel": "library:calm", "type": "calm", "data": {"i": i}},
                    ) as r:
                        assert r.status == 200, await r.text()
                    n += 1
                    await asyncio.sleep(0.02)
                return n

            share = FLOOD_TOTAL // FLOOD_CONNECTIONS
            published, *_ = await asyncio.wait_for(
                asyncio.gather(publisher(), *(abuser(n, share) for n in range(FLOOD_CONNECTIONS))),
                120,
            )
            rss_after = rss_kib(hp.proc.pid)
            got = [(await good.recv())["data"]["i"] for _ in range(published)]
            assert got == list(range(published))
            assert (await good.request("ping", {"t0": 0}))["type"] == "pong"
            assert not good.ws.closed
        assert sent == FLOOD_TOTAL
        # Each connection: its burst of typed errors, 50 RATE_LIMITED, then 4004.
        assert limited == set(range(FLOOD_CONNECTIONS)), closes
        assert set(closes) <= {4004, 1000}, closes
        assert codes.get("RATE_LIMITED", 0) >= 50 * closes[4004]
        assert {"INVALID_JSON", "INVALID_MESSAGE", "UNKNOWN_TYPE"} <= set(codes), codes
        assert "INTERNAL" not in codes
        # Memory bounded: what the flood left behind is small (generous bound: 64 MiB).
        assert rss_after - rss_before < 64 * 1024, (rss_before, rss_after)
        print(
            f"\nflood: sent={sent} replies={codes} closes={closes} "
            f"rss_kib {rss_before}->{rss_after}"
        )
        assert hp.proc.poll() is None
    finally:
        assert hp.stop() == 0


# -- framing abuse on a raw socket -------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "data", "code"),
    [
        ("binary frame", frame(OP_BINARY, b"\x00\x01"), 1003),
        ("RSV1 without negotiated compression", frame(OP_TEXT, b"{}", rsv1=True), 1002),
        ("RSV2 set", bytes([0x80 | 0x20 | OP_TEXT, 0x82]) + b"\x00" * 4 + b"{}", 1002),
        ("invalid UTF-8 in a text frame", frame(OP_TEXT, b'{"type":"\xff\xfe"}'), 1007),
        ("continuation without a start", frame(OP_CONT, b"abc"), 1002),
        (
            "new text frame inside a fragmented message",
            frame(OP_TEXT, b'{"ty', fin=False) + frame(OP_TEXT, b'pe":"ping"}'),
            1002,
        ),
        ("reserved data opcode 0x3", frame(0x3, b"x"), 1002),
        ("reserved control opcode 0xB", frame(0xB, b"x"), 1002),
        ("control frame over 125 bytes", frame(OP_PING, b"p" * 126), 1002),
        ("fragmented control frame", frame(OP_PING, b"p", fin=False), 1002),
        ("declared length 2**63", bytes([0x81, 0xFF]) + (2**63).to_bytes(8, "big"), 1009),
        ("declared length 2**64-1", bytes([0x81, 0xFF]) + b"\xff" * 8, 1009),
        ("declared length 16 MiB", bytes([0x81, 0xFF]) + (1 << 24).to_bytes(8, "big"), 1009),
        ("close code 999", frame(OP_CLOSE, (999).to_bytes(2, "big")), 1002),
        ("close payload of one byte", frame(OP_CLOSE, b"x"), 1002),
        ("close reason not UTF-8", frame(OP_CLOSE, b"\x03\xe8\xff"), 1007),
    ],
)
async def test_framing_abuse_is_closed(hub: Hub, name: str, data: bytes, code: int) -> None:
    def attack() -> int | None:
        sock, reader = open_raw(hub)
        try:
            sock.sendall(data)
            return reader.until_close()[1]
        finally:
            sock.close()

    assert await asyncio.to_thread(attack) == code, name
    for _ in range(100):
        if not len(hub.node.hub):
            break
        await asyncio.sleep(0.02)
    assert len(hub.node.hub) == 0
    ws = await hub.connect("bob")  # the hub still serves
    assert (await ws.request("ping", {"t0": 0}))["type"] == "pong"


async def test_5000_fragment_messages(hub: Hub) -> None:
    """A message in 5,000 frames is reassembled when it fits the 64 KiB limit (here 40,000
    bytes); 5,000 frames adding up to more (80,000 bytes) are refused with 1009 as soon as
    the total crosses the limit; 5,000 empty continuation frames cost nothing; a ping between
    fragments is answered (RFC 6455 §5.4)."""

    def ping_msg(mid: str, size: int) -> bytes:
        pre, post = f'{{"type":"ping","id":"{mid}","data":{{"pad":"'.encode(), b'"}}'
        return pre + b"x" * (size - len(pre) - len(post)) + post

    def attack() -> tuple[dict[str, Any], dict[str, Any], int | None]:
        sock, reader = open_raw(hub)
        try:
            sock.sendall(fragments(ping_msg("f1", 40_000), 5000))
            fits = reader.reply("f1")
            start = frame(OP_TEXT, ping_msg("f2", 30), fin=False)
            empties = frame(OP_CONT, b"", fin=False) * 4998
            sock.sendall(start + empties + frame(OP_PING, b"mid") + frame(OP_CONT, b""))
            got = reader.next()
            assert got == (0xA, b"mid"), got  # the pong comes first
            empty = reader.reply("f2")
            sock.sendall(fragments(ping_msg("f3", 80_000), 5000))
            return fits, empty, reader.until_close()[1]
        finally:
            sock.close()

    fits, empty, code = await asyncio.to_thread(attack)
    assert fits["type"] == "pong" and empty["type"] == "pong"
    assert code == 1009


async def test_message_size_boundary(hub: Hub) -> None:
    """Contract §7: 64 KiB messages pass, one byte more is closed with 1009."""
    limit = hub.settings.limits.message_size
    assert limit == 65536

    def send(size: int) -> tuple[str, int | None]:
        pre, post = b'{"type":"ping","id":"b","data":{"pad":"', b'"}}'
        sock, reader = open_raw(hub)
        try:
            sock.sendall(masked_text_frame(pre + b"y" * (size - len(pre) - len(post)) + post))
            if size <= limit:
                return str(reader.reply("b")["type"]), None
            texts, code = reader.until_close()
            return (orjson.loads(texts[0])["type"] if texts else ""), code
        finally:
            sock.close()

    assert await asyncio.to_thread(send, limit) == ("pong", None)
    assert await asyncio.to_thread(send, limit + 1) == ("", 1009)


async def test_compression_never_negotiated_and_a_deflate_bomb_is_refused(hub: Hub) -> None:
    """The hub never accepts permessage-deflate (whatever the offer), so a compressed frame
    (RSV1) is a protocol error: a 10 MiB deflate bomb (~10 KiB on the wire) is closed with
    1002 before anything is inflated."""
    offers = [
        "permessage-deflate",
        "permessage-deflate; client_max_window_bits",
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
        "x-webkit-deflate-frame",
    ]
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = comp.compress(b"\x00" * (10 << 20)) + comp.flush(zlib.Z_SYNC_FLUSH)
    bomb = bomb[:-4]  # permessage-deflate drops the 00 00 ff ff tail
    assert len(bomb) < 64 * 1024

    def attack(offer: str) -> tuple[bytes, int | None]:
        sock, head = handshake(
            hub.port, f"/api/v1/ws?token={hub.token()}", {"Sec-WebSocket-Extensions": offer}
        )
        try:
            assert head.startswith(b"HTTP/1.1 101"), head
            reader = FrameReader(sock)
            assert reader.next() is not None  # welcome, uncompressed
            sock.sendall(frame(OP_TEXT, bomb, rsv1=True))
            return head, reader.until_close()[1]
        finally:
            sock.close()

    for offer in offers:
        head, code = await asyncio.to_thread(attack, offer)
        assert b"sec-websocket-extensions" not in head.lower(), head
        assert code == 1002


# -- the conformance echo endpoint -----------------------------------------------------------
async def test_echo_endpoint_off_by_default(hub: Hub) -> None:
    status, _ = await hub.request("GET", "/debug/echo", headers={})
    assert status == 404
    sock, head = await asyncio.to_thread(handshake, hub.port, "/debug/echo")
    sock.close()
    assert head.startswith(b"HTTP/1.1 404")


async def test_echo_endpoint_echoes_within_the_hub_limits(hub_with: Any) -> None:
    env = {"REVENGE_DEBUG_ECHO": "1", "REVENGE_LIMITS_MESSAGE_SIZE": "4096"}
    async with hub_with(env) as hub:
        s = await hub.session()
        ws = await s.ws_connect(f"{hub.url}/debug/echo")
        await ws.send_str("héllo")
        assert (await ws.receive(timeout=5)).data == "héllo"
        await ws.send_bytes(b"\x00\xff")
        assert (await ws.receive(timeout=5)).data == b"\x00\xff"
        await ws.send_str("z" * 4096)  # exactly the limit passes, as on the hub
        assert (await ws.receive(timeout=5)).data == "z" * 4096
        await ws.send_str("z" * 4097)
        msg = await ws.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.CLOSE and ws.close_code == 1009

        def frames_and_bomb() -> tuple[bytes, int | None, int | None]:
            sock, _ = handshake(hub.port, "/debug/echo")
            reader = FrameReader(sock)
            try:
                sock.sendall(fragments(b"ab" * 500, 500))
                got = reader.next()
                assert got is not None
                sock.sendall(frame(OP_TEXT, b"x", rsv1=True))
                return got[1], reader.until_close()[1], None
            finally:
                sock.close()

        echoed, code, _ = await asyncio.to_thread(frames_and_bomb)
        assert echoed == b"ab" * 500 and code == 1002


# -- the HTTP API under schemathesis -----------------------------------------------------------
@pytest.mark.slow
async def test_openapi_fuzz_no_5xx(tmp_path: Path) -> None:
    """schemathesis (coverage + fuzzing phases, seeded, 15 examples per operation) against
    ``/api/v1/openapi.json`` of a hub process authenticated with an admin JWT (valid for
    both the backend and the user endpoints): no response is a 5xx."""
    st_bin = Path(sys.executable).with_name("st")
    if not st_bin.exists():
        if os.environ.get("CI"):
            pytest.fail("schemathesis is not installed (pip install 'schemathesis==4.32.5')")
        pytest.skip("schemathesis is not installed")
    hp = await asyncio.to_thread(
        start_hub_process, {"REVENGE_STORE_URL": f"sqlite:///{tmp_path / 'st.db'}"}
    )
    try:
        token = mint_token(make_settings().jwt, "fuzz-admin", role="admin", ttl=3600)
        junit = tmp_path / "junit.xml"
        proc = await asyncio.create_subprocess_exec(
            str(st_bin), "run", f"{hp.url}/api/v1/openapi.json", "--url", hp.url,
            "--checks", "not_a_server_error", "--phases", "coverage,fuzzing",
            "--max-examples", "15", "--seed", "6455", "--workers", "1",
            "--generation-database", "none", "--request-timeout", "10",
            "--header", f"Authorization: Bearer {token}", "--no-color",
            "--report", "junit", "--report-junit-path", str(junit),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**os.environ, "SCHEMATHESIS_TELEMETRY": "false", "NO_COLOR": "1"},
        )  # fmt: skip
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 150)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        text = out.decode(errors="replace")
        assert junit.exists(), text[-3000:]
        failed: set[str] = set()
        for case in ElementTree.parse(junit).getroot().iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.add(case.get("name", "?"))
        tested = re.search(r"(\d+) generated", text)
        assert tested and int(tested.group(1)) > 300, text[-3000:]
        assert not failed, text[-6000:]
        assert hp.proc.poll() is None
        print(f"\nschemathesis: {tested.group(1)} cases, {len(failed)} operations with a 5xx")
    finally:
        assert hp.stop() == 0
