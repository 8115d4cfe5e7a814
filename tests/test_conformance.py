"""RFC 6455 conformance, an Autobahn|Testsuite-style suite of our own.

Autobahn cannot run on this machine class (its fuzzing client needs Python 2 or Docker), so
these cases mirror its sections (1 framing, 2 pings/pongs, 3 reserved bits, 4 opcodes,
5 fragmentation, 6 UTF-8, 7 close, 9 a small performance smoke) with raw frames on a real
socket against the conformance echo endpoint ``/debug/echo`` (``REVENGE_DEBUG_ECHO=1``), which
runs on the hub's own WebSocket stack and limits — once for each engine
(``server.ws_engine``): ``direct`` (websockets' sans-I/O protocol, the default) and
``aiohttp``.

Every case asserts what RFC 6455 requires, except where aiohttp deviates: those cases assert
what the ``aiohttp`` engine actually does, carry an id ending in ``-aiohttp-deviation`` and are
listed in docs/reliability.md ("RFC 6455 conformance (our Autobahn-style suite)"); the
``direct`` engine is held to the RFC in the same cases.

The hub runs once per engine for the module, in a thread with its own event loop; the cases
are plain blocking-socket code with a timeout on every read, and every socket is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from revenge_ws.auth import mint_token
from revenge_ws.config import Settings

from .helpers import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameReader,
    frame,
    handshake,
    make_settings,
    running_hub,
)

pytestmark = pytest.mark.timeout(30)

#: A non-zero mask key (RFC 6455 §5.7's example), so the server really has to unmask.
KEY = b"\x37\xfa\x21\x3d"
#: How long a case waits for one frame; the whole module runs in well under 30 s.
READ_TIMEOUT = 5.0


# -- the hub and a raw client ----------------------------------------------------------------
@dataclass
class EchoHub:
    port: int
    #: ``limits.message_size``: a message of exactly this many bytes passes.
    limit: int
    settings: Settings
    #: ``server.ws_engine``: "direct" or "aiohttp".
    engine: str = "direct"


@pytest.fixture(scope="module", params=["direct", "aiohttp"])
def echo_hub(request: pytest.FixtureRequest) -> Iterator[EchoHub]:
    """One in-process hub with the echo endpoint on, in a thread with its own loop."""
    engine: str = request.param
    settings = make_settings({"REVENGE_DEBUG_ECHO": "1", "REVENGE_SERVER_WS_ENGINE": engine})
    started = threading.Event()
    box: dict[str, Any] = {}

    def run() -> None:
        async def main() -> None:
            done = asyncio.Event()
            async with running_hub(settings) as hub:
                box.update(port=hub.port, loop=asyncio.get_running_loop(), done=done)
                started.set()
                await done.wait()

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported by the fixture, not lost in the thread
            box["error"] = exc
            started.set()

    thread = threading.Thread(target=run, name="conformance-hub", daemon=True)
    thread.start()
    assert started.wait(20), "hub did not start"
    if "error" in box:
        raise box["error"]
    try:
        yield EchoHub(box["port"], settings.limits.message_size, settings, engine)
    finally:
        box["loop"].call_soon_threadsafe(box["done"].set)
        thread.join(30)
        assert not thread.is_alive(), "hub did not stop"
        if "error" in box:
            raise box["error"]


@dataclass
class Outcome:
    """What the server sent: frames before its close frame, then the close."""

    frames: list[tuple[int, bytes]] = field(default_factory=list)
    #: The close code (1005 for a close frame without one, None if no close frame came).
    close: int | None = None
    reason: bytes = b""
    #: The server closed TCP after the closing handshake (RFC 6455 §7.1.1).
    eof: bool = False
    #: Server frames seen with FIN unset, a reserved bit or the MASK bit (none allowed).
    bad_headers: list[int] = field(default_factory=list)

    @property
    def texts(self) -> list[bytes]:
        return [p for op, p in self.frames if op == OP_TEXT]


@contextlib.contextmanager
def echo_socket(hub: EchoHub, extra: dict[str, str] | None = None) -> Iterator[socket.socket]:
    sock, head = handshake(hub.port, "/debug/echo", extra, timeout=READ_TIMEOUT)
    try:
        assert head.startswith(b"HTTP/1.1 101"), head[:200]
        # No extension is ever negotiated, so every reserved bit must stay unset.
        assert b"sec-websocket-extensions" not in head.lower(), head
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        yield sock
    finally:
        sock.close()


def send(sock: socket.socket, data: bytes, chunk: int | None = None) -> None:
    """Send ``data`` (in ``chunk``-byte writes if given); the server may already be gone."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        if chunk is None:
            sock.sendall(data)
            return
        for i in range(0, len(data), chunk):
            sock.sendall(data[i : i + chunk])


def read_outcome(sock: socket.socket, reader: FrameReader, *, closed_by_us: bool) -> Outcome:
    """Read frames until the server's close frame; answer it if the server started the
    closing handshake; then wait for the server to close TCP."""
    out = Outcome()
    deadline = time.monotonic() + READ_TIMEOUT
    while True:
        got = reader.next(max(0.05, deadline - time.monotonic()))
        if got is None:
            return out  # EOF without a close frame
        op, payload = got
        if reader.last_b0 & 0x70 or not reader.last_b0 & 0x80 or reader.last_masked:
            out.bad_headers.append(reader.last_b0)
        if op == OP_CLOSE:
            out.close = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            out.reason = payload[2:]
            break
        out.frames.append((op, payload))
    if not closed_by_us:
        send(sock, frame(OP_CLOSE, payload[:2], key=KEY))
    try:
        out.eof = reader.next(READ_TIMEOUT) is None
    except TimeoutError:
        out.eof = False
    return out


def exchange(
    hub: EchoHub,
    data: bytes,
    *,
    close_after: bool,
    chunk: int | None = None,
    extra: dict[str, str] | None = None,
) -> Outcome:
    """One connection: send ``data``; if ``close_after`` (the cases where the server should
    still be open), follow it with a clean close (1000) of our own; read the outcome."""
    with echo_socket(hub, extra) as sock:
        reader = FrameReader(sock)
        send(sock, data, chunk)
        if close_after:
            send(sock, frame(OP_CLOSE, (1000).to_bytes(2, "big") + b"bye", key=KEY))
        return read_outcome(sock, reader, closed_by_us=close_after)


def assert_echo(out: Outcome, expected: list[tuple[int, bytes]]) -> None:
    """The server answered exactly ``expected``, then our close with 1000, then closed TCP."""
    assert [(op, len(p)) for op, p in out.frames] == [(op, len(p)) for op, p in expected]
    assert out.frames == expected
    assert out.close == 1000 and out.eof and not out.bad_headers, out


def assert_failed(out: Outcome, code: int, before: list[tuple[int, bytes]] | None = None) -> None:
    """The server failed the connection with ``code`` after answering ``before``."""
    assert out.frames == (before or []), out.frames
    assert out.close == code, out
    assert out.eof and not out.bad_headers, out


def text(payload: bytes, **kw: Any) -> bytes:
    return frame(OP_TEXT, payload, key=KEY, **kw)


def cont(payload: bytes, **kw: Any) -> bytes:
    return frame(OP_CONT, payload, key=KEY, **kw)


def split(op: int, message: bytes, sizes: list[int] | int) -> bytes:
    """``message`` as a fragmented ``op`` message: pieces of the given sizes (the last one
    takes the rest), or pieces of ``sizes`` bytes each."""
    if isinstance(sizes, int):
        cuts = list(range(0, len(message), sizes)) or [0]
    else:
        cuts = [0]
        for s in sizes:
            cuts.append(cuts[-1] + s)
    pieces = [message[a:b] for a, b in zip(cuts, [*cuts[1:], len(message)], strict=True)]
    return b"".join(
        frame(op if i == 0 else OP_CONT, p, fin=i == len(pieces) - 1, key=KEY)
        for i, p in enumerate(pieces)
    )


def payload_of(n: int) -> bytes:
    return (b"0123456789abcdef" * (n // 16 + 1))[:n]


# -- 1 framing --------------------------------------------------------------------------------
LENGTHS = [0, 1, 125, 126, 127, 128, 65535, 65536]


@pytest.mark.parametrize("n", LENGTHS, ids=[f"1.1-text-{n}" for n in LENGTHS])
def test_1_text_echo(echo_hub: EchoHub, n: int) -> None:
    assert n <= echo_hub.limit
    out = exchange(echo_hub, text(payload_of(n)), close_after=True)
    assert_echo(out, [(OP_TEXT, payload_of(n))])


@pytest.mark.parametrize("n", LENGTHS, ids=[f"1.2-binary-{n}" for n in LENGTHS])
def test_1_binary_echo(echo_hub: EchoHub, n: int) -> None:
    """The echo endpoint echoes binary messages (documented in docs/reliability.md; the hub's
    own endpoint closes binary frames with 1003, its protocol being JSON text)."""
    data = bytes(range(256)) * (n // 256 + 1)
    out = exchange(echo_hub, frame(OP_BINARY, data[:n], key=KEY), close_after=True)
    assert_echo(out, [(OP_BINARY, data[:n])])


def test_1_text_at_the_limit_and_one_byte_over(echo_hub: EchoHub) -> None:
    """A message of exactly ``limits.message_size`` bytes is echoed, one byte more is
    closed with 1009, as on the hub's own endpoint (text, binary and fragmented alike)."""
    limit = echo_hub.limit
    assert_echo(exchange(echo_hub, text(payload_of(limit)), close_after=True), [
        (OP_TEXT, payload_of(limit))
    ])  # fmt: skip
    assert_failed(exchange(echo_hub, text(payload_of(limit + 1)), close_after=False), 1009)
    over_binary = frame(OP_BINARY, payload_of(limit + 1), key=KEY)
    assert_failed(exchange(echo_hub, over_binary, close_after=False), 1009)
    over_fragmented = split(OP_TEXT, payload_of(limit + 1), 4096)
    assert_failed(exchange(echo_hub, over_fragmented, close_after=False), 1009)


def test_1_frame_written_one_byte_at_a_time(echo_hub: EchoHub) -> None:
    """Autobahn's chopped writes: a 300-byte frame (16-bit length) in 1-byte TCP writes."""
    out = exchange(echo_hub, text(payload_of(300)), close_after=True, chunk=1)
    assert_echo(out, [(OP_TEXT, payload_of(300))])


def test_1_zero_mask_key_and_several_frames_in_one_write(echo_hub: EchoHub) -> None:
    data = frame(OP_TEXT, b"zero-key") + text(b"a") + frame(OP_BINARY, b"b", key=KEY)
    out = exchange(echo_hub, data, close_after=True)
    assert_echo(out, [(OP_TEXT, b"zero-key"), (OP_TEXT, b"a"), (OP_BINARY, b"b")])


def test_1_unmasked_client_frame_aiohttp_deviation(echo_hub: EchoHub) -> None:
    """RFC 6455 §5.1: a server MUST close the connection on an unmasked client frame (1002).
    aiohttp deviation: it ignores the MASK bit and echoes the frame."""
    aiohttp = echo_hub.engine == "aiohttp"
    out = exchange(echo_hub, frame(OP_TEXT, b"unmasked", key=None), close_after=aiohttp)
    if aiohttp:
        assert_echo(out, [(OP_TEXT, b"unmasked")])
    else:
        assert_failed(out, 1002)


# -- 2 pings and pongs ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="2.1-empty"),
        pytest.param(b"Hello, world!", id="2.2-text"),
        pytest.param(bytes([0x00, 0xFF, 0xFE, 0xFD, 0xFC, 0xFB, 0x00, 0xFF]), id="2.3-binary"),
        pytest.param(payload_of(125), id="2.4-125-bytes"),
    ],
)
def test_2_ping_is_answered_with_the_same_payload(echo_hub: EchoHub, payload: bytes) -> None:
    out = exchange(echo_hub, frame(OP_PING, payload, key=KEY), close_after=True)
    assert_echo(out, [(OP_PONG, payload)])


def test_2_ping_of_125_bytes_in_1_byte_writes(echo_hub: EchoHub) -> None:
    out = exchange(echo_hub, frame(OP_PING, payload_of(125), key=KEY), close_after=True, chunk=1)
    assert_echo(out, [(OP_PONG, payload_of(125))])


def test_2_ping_of_126_bytes_fails(echo_hub: EchoHub) -> None:
    """§5.5: control frames carry at most 125 bytes."""
    out = exchange(echo_hub, frame(OP_PING, payload_of(126), key=KEY), close_after=False)
    assert_failed(out, 1002)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(frame(OP_PONG, b"", key=KEY), id="2.7-unsolicited-pong-empty"),
        pytest.param(frame(OP_PONG, b"unsolicited", key=KEY), id="2.8-unsolicited-pong"),
    ],
)
def test_2_unsolicited_pong_is_ignored(echo_hub: EchoHub, data: bytes) -> None:
    """§5.5.3: an unsolicited pong needs no answer; the next messages are served as usual."""
    out = exchange(
        echo_hub, data + frame(OP_PING, b"after", key=KEY) + text(b"t"), close_after=True
    )
    assert_echo(out, [(OP_PONG, b"after"), (OP_TEXT, b"t")])


@pytest.mark.parametrize("chunk", [None, 1], ids=["2.10-ten-pings", "2.11-ten-pings-chopped"])
def test_2_ten_pings_ten_pongs_in_order(echo_hub: EchoHub, chunk: int | None) -> None:
    pings = b"".join(frame(OP_PING, f"ping-{i}".encode(), key=KEY) for i in range(10))
    out = exchange(echo_hub, pings, close_after=True, chunk=chunk)
    assert_echo(out, [(OP_PONG, f"ping-{i}".encode()) for i in range(10)])


# -- 3 reserved bits --------------------------------------------------------------------------
RSV_CASES = [
    # (Autobahn case, RSV bits, frame, a valid text echoed first?)
    ("3.1-rsv3-text", 1, OP_TEXT, False),
    ("3.2-rsv2-text-after-valid", 2, OP_TEXT, True),
    ("3.3-rsv2-rsv3-text-after-valid", 3, OP_TEXT, True),
    ("3.4-rsv1-text-after-valid", 4, OP_TEXT, True),
    ("3.5-rsv1-rsv3-binary", 5, OP_BINARY, False),
    ("3.6-rsv1-rsv2-ping", 6, OP_PING, False),
    ("3.7-all-rsv-close", 7, OP_CLOSE, False),
]


@pytest.mark.parametrize(
    ("rsv", "op", "valid_first"), [c[1:] for c in RSV_CASES], ids=[c[0] for c in RSV_CASES]
)
def test_3_reserved_bits_fail(echo_hub: EchoHub, rsv: int, op: int, valid_first: bool) -> None:
    """§5.2: a reserved bit without a negotiated extension fails the connection (1002), even
    when the client offered permessage-deflate (the hub never accepts it)."""
    payload = (1000).to_bytes(2, "big") if op == OP_CLOSE else b"reserved"
    data = (text(b"valid") if valid_first else b"") + frame(op, payload, rsv=rsv, key=KEY)
    data += frame(OP_PING, b"not answered", key=KEY)
    offer = {"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"}
    out = exchange(echo_hub, data, close_after=False, extra=offer)
    assert_failed(out, 1002, [(OP_TEXT, b"valid")] if valid_first else [])


# -- 4 opcodes --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "opcode",
    [*range(0x3, 0x8), *range(0xB, 0x10)],
    ids=[f"4.{1 if op < 8 else 2}-opcode-{op:#x}" for op in [*range(0x3, 0x8), *range(0xB, 0x10)]],
)
def test_4_reserved_opcodes_fail(echo_hub: EchoHub, opcode: int) -> None:
    """§5.2: reserved non-control (3–7) and control (0xB–0xF) opcodes fail with 1002; the
    valid text before is echoed, the ping after is never answered."""
    data = text(b"before") + frame(opcode, b"x", key=KEY) + frame(OP_PING, b"after", key=KEY)
    out = exchange(echo_hub, data, close_after=False)
    assert_failed(out, 1002, [(OP_TEXT, b"before")])


# -- 5 fragmentation --------------------------------------------------------------------------
MSG = b"fragmented message, reassembled by the server"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(split(OP_TEXT, MSG, [10]), MSG, id="5.3-text-2-fragments"),
        pytest.param(split(OP_TEXT, MSG, 1), MSG, id="5.x-text-1-byte-fragments"),
        pytest.param(split(OP_TEXT, MSG * 100, 9), MSG * 100, id="5.x-text-500-fragments"),
        pytest.param(split(OP_TEXT, MSG, [0, 0, len(MSG), 0]), MSG, id="5.x-text-empty-fragments"),
        pytest.param(split(OP_TEXT, b"", [0, 0]), b"", id="5.x-text-all-fragments-empty"),
        pytest.param(split(OP_BINARY, bytes(range(256)), 7), bytes(range(256)), id="5.x-binary"),
    ],
)
def test_5_fragmented_message_is_echoed_whole(
    echo_hub: EchoHub, data: bytes, expected: bytes
) -> None:
    op = OP_BINARY if data[0] & 0x0F == OP_BINARY else OP_TEXT
    out = exchange(echo_hub, data, close_after=True)
    assert_echo(out, [(op, expected)])


@pytest.mark.parametrize("chunk", [None, 1], ids=["5.6-ping-between", "5.7-ping-between-chopped"])
def test_5_ping_between_fragments(echo_hub: EchoHub, chunk: int | None) -> None:
    """§5.4: control frames may be injected between fragments; the pong comes first."""
    data = text(b"frag", fin=False) + frame(OP_PING, b"mid", key=KEY) + cont(b"ment")
    out = exchange(echo_hub, data, close_after=True, chunk=chunk)
    assert_echo(out, [(OP_PONG, b"mid"), (OP_TEXT, b"fragment")])


def test_5_pong_between_fragments_is_ignored(echo_hub: EchoHub) -> None:
    data = text(b"frag", fin=False) + frame(OP_PONG, b"unsolicited", key=KEY) + cont(b"ment")
    assert_echo(exchange(echo_hub, data, close_after=True), [(OP_TEXT, b"fragment")])


@pytest.mark.parametrize(
    ("data", "before"),
    [
        pytest.param(frame(OP_PING, b"p", fin=False, key=KEY), [], id="5.1-fragmented-ping"),
        pytest.param(frame(OP_PONG, b"p", fin=False, key=KEY), [], id="5.2-fragmented-pong"),
        pytest.param(cont(b"orphan"), [], id="5.9-continuation-fin-without-start"),
        pytest.param(cont(b"orphan", fin=False), [], id="5.10-continuation-without-start"),
        pytest.param(cont(b"a", fin=False) + cont(b"b"), [], id="5.12-continuations-without-start"),
        pytest.param(
            text(b"done") + cont(b"late"),
            [(OP_TEXT, b"done")],
            id="5.x-continuation-after-a-complete-message",
        ),
        pytest.param(
            text(b"open", fin=False) + text(b"new"), [], id="5.x-new-text-inside-fragmented"
        ),
        pytest.param(
            text(b"open", fin=False) + frame(OP_BINARY, b"new", key=KEY),
            [],
            id="5.x-new-binary-inside-fragmented",
        ),
        pytest.param(
            text(b"ok", fin=False) + cont(b"1") + cont(b"x", fin=False) + text(b"y"),
            [(OP_TEXT, b"ok1")],
            id="5.15-continuation-then-text-fragment",
        ),
    ],
)
def test_5_fragmentation_errors_fail(
    echo_hub: EchoHub, data: bytes, before: list[tuple[int, bytes]]
) -> None:
    out = exchange(echo_hub, data + frame(OP_PING, b"after", key=KEY), close_after=False)
    assert_failed(out, 1002, before)


# -- 6 UTF-8 ----------------------------------------------------------------------------------
VALID_UTF8 = [
    pytest.param("κόσμε".encode(), id="6.2-greek"),
    pytest.param("Hello-µ@ßöäüàá-UTF-8!!".encode(), id="6.2-latin"),
    pytest.param(b"\xf0\x9f\x98\x80 \xe2\x82\xac", id="6.x-emoji-and-euro"),
    pytest.param(b"\x00", id="6.x-nul"),
    pytest.param(b"\xc2\x80 \xdf\xbf \xe0\xa0\x80 \xef\xbf\xbf", id="6.x-2-and-3-byte-edges"),
    pytest.param(b"\xed\x9f\xbf \xee\x80\x80", id="6.x-around-surrogates"),
    pytest.param(b"\xef\xbf\xbe \xef\xbf\xbf", id="6.x-noncharacters-U+FFFE-U+FFFF"),
    pytest.param(b"\xf0\x90\x80\x80 \xf4\x8f\xbf\xbf", id="6.x-U+10000-and-U+10FFFF"),
]


@pytest.mark.parametrize("payload", VALID_UTF8)
def test_6_valid_utf8_is_echoed(echo_hub: EchoHub, payload: bytes) -> None:
    """Whole, and fragmented at every byte (code points split across frames)."""
    assert_echo(exchange(echo_hub, text(payload), close_after=True), [(OP_TEXT, payload)])
    out = exchange(echo_hub, split(OP_TEXT, payload, 1), close_after=True)
    assert_echo(out, [(OP_TEXT, payload)])


INVALID_UTF8 = [
    pytest.param(b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited", id="6.3.1"),
    pytest.param(b"\xff", id="6.x-byte-ff"),
    pytest.param(b"\xfe\xfe\xff\xff", id="6.x-bytes-fe-ff"),
    pytest.param(b"\x80", id="6.x-lone-continuation"),
    pytest.param(b"a\xce", id="6.x-truncated-2-byte-at-end"),
    pytest.param(b"a\xe1\xbd", id="6.x-truncated-3-byte-at-end"),
    pytest.param(b"\xce\x41", id="6.x-lead-then-ascii"),
    pytest.param(b"\xc0\xaf", id="6.x-overlong-2-byte-slash"),
    pytest.param(b"\xc1\xbf", id="6.x-overlong-2-byte-max"),
    pytest.param(b"\xe0\x80\xaf", id="6.x-overlong-3-byte-slash"),
    pytest.param(b"\xe0\x9f\xbf", id="6.x-overlong-3-byte-max"),
    pytest.param(b"\xf0\x80\x80\xaf", id="6.x-overlong-4-byte-slash"),
    pytest.param(b"\xf0\x8f\xbf\xbf", id="6.x-overlong-4-byte-max"),
    pytest.param(b"\xed\xa0\x80", id="6.x-surrogate-D800"),
    pytest.param(b"\xed\xbf\xbf", id="6.x-surrogate-DFFF"),
    pytest.param(b"\xed\xa0\x80\xed\xb0\x80", id="6.x-surrogate-pair-encoded"),
    pytest.param(b"\xf4\x90\x80\x80", id="6.x-U+110000"),
    pytest.param(b"\xf5\x80\x80\x80", id="6.x-lead-f5"),
    pytest.param(b"\xf7\xbf\xbf\xbf", id="6.x-U+1FFFFF"),
    pytest.param(b"\xf8\x88\x80\x80\x80", id="6.x-5-byte-form"),
    pytest.param(b"\xfc\x84\x80\x80\x80\x80", id="6.x-6-byte-form"),
]


@pytest.mark.parametrize("payload", INVALID_UTF8)
def test_6_invalid_utf8_fails_1007(echo_hub: EchoHub, payload: bytes) -> None:
    """§8.1: invalid UTF-8 in a text message fails the connection with 1007."""
    assert_failed(exchange(echo_hub, text(payload), close_after=False), 1007)


INVALID_SPLIT = [
    # (id, fragments) - the bad sequence in the second fragment, at a code point boundary
    ("6.x-split-at-boundary", [b"\xce\xba\xe1\xbd\xb9", b"\xed\xa0\x80edited"]),
    # a code point cut in the middle, completed with an invalid continuation
    ("6.x-split-mid-code-point", [b"\xce\xba\xe1", b"\xbd\xb9\xcf\x83\xed\xa0\x80"]),
    ("6.x-split-mid-then-ascii", [b"abc\xe1\xbd", b"z"]),
    ("6.x-split-truncated-at-end", [b"\xce\xba", b"\xe1\xbd"]),
    ("6.x-split-surrogate", [b"\xed", b"\xa0", b"\x80"]),
    ("6.x-split-U+110000", [b"\xf4\x90", b"\x80\x80"]),
]


@pytest.mark.parametrize("parts", [c[1] for c in INVALID_SPLIT], ids=[c[0] for c in INVALID_SPLIT])
def test_6_invalid_utf8_across_fragments_fails_1007(echo_hub: EchoHub, parts: list[bytes]) -> None:
    data = split(OP_TEXT, b"".join(parts), [len(p) for p in parts[:-1]])
    assert_failed(exchange(echo_hub, data, close_after=False), 1007)


def test_6_4_invalid_fragment_no_fail_fast_aiohttp_deviation(echo_hub: EchoHub) -> None:
    """Autobahn 6.4.1: a valid first fragment, a wait, a second fragment that makes the
    sequence invalid (U+110000), a wait, the rest. RFC 6455 §8.1: the endpoint MUST fail
    the connection (1007) on invalid UTF-8, and Autobahn's OK is a close right after the
    second fragment (fail fast). aiohttp validates a text message only once it is
    complete: nothing happens until the last fragment, then 1007 (Autobahn: NON-STRICT)."""
    with echo_socket(echo_hub) as sock:
        reader = FrameReader(sock)
        send(sock, text(b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5", fin=False))
        with pytest.raises(TimeoutError):  # valid so far: no answer is right
            reader.next(0.3)
        send(sock, cont(b"\xf4\x90\x80\x80", fin=False))
        if echo_hub.engine == "direct":  # RFC (strict): a close 1007 here, at once
            assert_failed(read_outcome(sock, reader, closed_by_us=False), 1007)
            return
        with pytest.raises(TimeoutError):
            reader.next(0.5)
        send(sock, cont(b"edited"))
        assert_failed(read_outcome(sock, reader, closed_by_us=False), 1007)


# -- 7 close ----------------------------------------------------------------------------------
def close_frame(code: int | None, reason: bytes = b"") -> bytes:
    body = b"" if code is None else code.to_bytes(2, "big") + reason
    return frame(OP_CLOSE, body, key=KEY)


def client_close(hub: EchoHub, data: bytes) -> Outcome:
    with echo_socket(hub) as sock:
        reader = FrameReader(sock)
        send(sock, data)
        return read_outcome(sock, reader, closed_by_us=True)


def test_7_close_without_payload(echo_hub: EchoHub) -> None:
    """7.3.1: a close with no payload is answered with a close (aiohttp's carries 1000; the
    direct engine echoes the empty one, read as 1005; RFC 6455 §5.5.1 allows both, §7.4.1
    forbids putting 1005 on the wire) and the server closes TCP."""
    out = client_close(echo_hub, close_frame(None))
    expected = 1000 if echo_hub.engine == "aiohttp" else 1005
    assert out.frames == [] and out.close == expected and out.eof and not out.bad_headers


def test_7_text_then_close(echo_hub: EchoHub) -> None:
    """7.1.1: a message before the close is echoed first."""
    out = client_close(echo_hub, text(b"last words") + close_frame(1000))
    assert out.frames == [(OP_TEXT, b"last words")] and out.close == 1000 and out.eof


def test_7_nothing_after_close_is_answered(echo_hub: EchoHub) -> None:
    """7.1.2–7.1.5: after the close, further frames (close, ping, text, a fragment) are
    ignored: the only answer is one close frame."""
    data = close_frame(1000) + close_frame(1001) + frame(OP_PING, b"p", key=KEY) + text(b"t")
    out = client_close(echo_hub, data + text(b"frag", fin=False))
    assert out.frames == [] and out.close == 1000 and out.eof


def test_7_close_between_fragments_is_a_normal_close(echo_hub: EchoHub) -> None:
    """7.1.5: fragment 1, close, fragment 2: the close is answered with its own code; the
    unfinished message and what follows the close are dropped."""
    data = text(b"frag1", fin=False) + close_frame(1000) + frame(OP_CONT, b"frag2", key=KEY)
    out = client_close(echo_hub, data)
    assert out.frames == [] and out.close == 1000 and out.eof


def test_7_close_with_reason(echo_hub: EchoHub) -> None:
    out = client_close(echo_hub, close_frame(1000, b"normal closure, see you"))
    assert out.frames == [] and out.close == 1000 and out.eof


def test_7_close_with_123_byte_reason(echo_hub: EchoHub) -> None:
    """7.3.5: 2 + 123 bytes is the largest close payload (§5.5)."""
    out = client_close(echo_hub, close_frame(1000, payload_of(123)))
    assert out.close == 1000 and out.eof


def test_7_close_with_124_byte_reason_fails(echo_hub: EchoHub) -> None:
    """7.3.6: 2 + 124 bytes is a control frame over 125 bytes: 1002."""
    out = client_close(echo_hub, close_frame(1000, payload_of(124)))
    assert out.close == 1002 and out.eof


def test_7_close_with_one_byte_payload_fails(echo_hub: EchoHub) -> None:
    """7.3.2: a close payload must be empty or start with a two-byte code."""
    out = client_close(echo_hub, frame(OP_CLOSE, b"\x03", key=KEY))
    assert out.close == 1002 and out.eof


def test_7_close_reason_not_utf8_fails_1007(echo_hub: EchoHub) -> None:
    """7.5.1: the close reason is UTF-8 (§5.5.1)."""
    out = client_close(echo_hub, close_frame(1000, b"\xce\xba\xe1\xbd\xb9\xed\xa0\x80"))
    assert out.close == 1007 and out.eof


#: Autobahn 7.7.1-7.7.13.
VALID_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999]
#: Registered with IANA after RFC 6455 (Autobahn tests them in neither direction).
IANA_LATER = [1012, 1013, 1014]


@pytest.mark.parametrize(
    "code",
    [*VALID_CODES, *IANA_LATER],
    ids=[f"7.7.{i}-{c}" for i, c in enumerate(VALID_CODES, 1)]
    + [f"7.x-{c}-iana-registered" for c in IANA_LATER],
)
def test_7_valid_close_codes_are_echoed(echo_hub: EchoHub, code: int) -> None:
    """§7.4: a close with a valid code gets a close back carrying the same code (RFC 6455
    §5.5.1: the reply "typically echos" it; the hub answers a close itself,
    ``server/ws.py`` ``close_reply``, instead of aiohttp's automatic 1000)."""
    out = client_close(echo_hub, close_frame(code, b"ok"))
    assert out.frames == [] and out.close == code and out.eof and not out.bad_headers


INVALID_CODES = [
    pytest.param(0, 1002, id="7.9.1-0"),
    pytest.param(999, 1002, id="7.9.2-999"),
    pytest.param(1004, 1002, id="7.9.3-1004"),
    pytest.param(1005, 1002, id="7.9.4-1005"),
    # 1006 is reserved and MUST NOT be sent (§7.4.1). aiohttp's reader lets it through
    # (its allow-list is its WSCloseCode enum, which has ABNORMAL_CLOSURE = 1006: aiohttp's
    # one Autobahn FAILED case, 7.9.5); the hub's own close reply refuses it.
    pytest.param(1006, 1002, id="7.9.5-1006"),
    pytest.param(1015, 1002, id="7.x-1015"),
    pytest.param(1016, 1002, id="7.9.6-1016"),
    pytest.param(1100, 1002, id="7.9.7-1100"),
    pytest.param(2000, 1002, id="7.9.8-2000"),
    pytest.param(2999, 1002, id="7.9.9-2999"),
    # Codes >= 5000 are outside every range of §7.4.2 (Autobahn 7.13.x only records what
    # happens). aiohttp's reader checks only codes below 3000; the hub's reply refuses them.
    pytest.param(5000, 1002, id="7.13.1-5000"),
    pytest.param(65535, 1002, id="7.13.2-65535"),
]


@pytest.mark.parametrize(("code", "answer"), INVALID_CODES)
def test_7_invalid_close_codes_fail(echo_hub: EchoHub, code: int, answer: int) -> None:
    """§7.4: 0–999, 1004–1006, 1015, unassigned 1016–2999 and >= 5000 are not valid on
    the wire; RFC 6455 requires 1002 for each."""
    out = client_close(echo_hub, close_frame(code, b"bad"))
    assert out.frames == [] and out.close == answer and out.eof


@pytest.mark.parametrize(
    ("data", "code"),
    [
        pytest.param(text(b"\xff"), 1007, id="invalid-utf8"),
        pytest.param(text(payload_of(70_000)), 1009, id="too-big"),
        pytest.param(frame(0x3, b"", key=KEY), 1002, id="bad-opcode"),
    ],
)
def test_7_failed_connection_drops_tcp_at_once(echo_hub: EchoHub, data: bytes, code: int) -> None:
    """§7.1.7: when the server fails the connection it sends its close frame and closes
    TCP without waiting for the client's close (aiohttp does so at once)."""
    with echo_socket(echo_hub) as sock:
        reader = FrameReader(sock)
        send(sock, data)
        assert reader.until_close(READ_TIMEOUT)[1] == code
        t0 = time.monotonic()
        assert reader.next(READ_TIMEOUT) is None  # EOF, no more frames
        assert time.monotonic() - t0 < 1.0


# -- the deviations on the hub's own endpoint -------------------------------------------------
PING_ENVELOPE = b'{"type":"ping","id":"u1","data":{"t0":0}}'


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(
            frame(OP_TEXT, PING_ENVELOPE, key=None), "pong", id="unmasked-frame-aiohttp-deviation"
        ),
        pytest.param(close_frame(1006, b"x"), 1002, id="close-1006-refused"),
        pytest.param(close_frame(5000, b"x"), 1002, id="close-5000-refused"),
        pytest.param(close_frame(4321, b"x"), 4321, id="close-4321-echoed"),
        pytest.param(close_frame(3000, b"x"), 3000, id="close-3000-echoed"),
        pytest.param(
            text(b'{"type":"ping","id":"u1","data":{"pad":"\xce\xba', fin=False),
            "silent",
            id="no-utf8-fail-fast-aiohttp-deviation",
        ),
    ],
)
def test_deviations_are_the_hubs_own(echo_hub: EchoHub, data: bytes, expected: object) -> None:
    """The hub's own endpoint (``/api/v1/ws``) behaves as the echo endpoint does: the
    remaining deviations are the stack's, and the close replies are the hub's."""
    token = mint_token(echo_hub.settings.jwt, "conformance")
    sock, head = handshake(echo_hub.port, f"/api/v1/ws?token={token}", timeout=READ_TIMEOUT)
    try:
        assert head.startswith(b"HTTP/1.1 101"), head[:200]
        reader = FrameReader(sock)
        welcome = reader.next(READ_TIMEOUT)
        assert welcome is not None and orjson.loads(welcome[1])["type"] == "welcome"
        send(sock, data)
        if expected == "pong" and echo_hub.engine == "direct":  # the RFC, not the deviation
            assert read_outcome(sock, reader, closed_by_us=False).close == 1002
        elif expected == "pong":
            assert reader.reply("u1", READ_TIMEOUT)["type"] == "pong"
        elif expected == "silent":
            with pytest.raises(TimeoutError):
                reader.next(0.5)
        else:
            assert read_outcome(sock, reader, closed_by_us=True).close == expected
    finally:
        sock.close()


# -- 9 performance smoke ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("op", "fragment"),
    [(OP_TEXT, None), (OP_BINARY, None), (OP_TEXT, 4096)],
    ids=["9.1-text", "9.2-binary", "9.4-text-16-fragments"],
)
def test_9_hundred_64k_messages(echo_hub: EchoHub, op: int, fragment: int | None) -> None:
    """100 messages of 64 KiB echoed intact and in order (no timing asserted). A writer
    thread sends while this one reads, so neither side's buffers can deadlock."""
    size, count = 64 * 1024, 100
    assert size <= echo_hub.limit
    messages = [bytes([65 + i % 26]) * size for i in range(count)]
    wire = b"".join(
        frame(op, m, key=KEY) if fragment is None else split(op, m, fragment) for m in messages
    )
    with echo_socket(echo_hub) as sock:
        reader = FrameReader(sock)
        writer = threading.Thread(target=send, args=(sock, wire), daemon=True)
        writer.start()
        try:
            for i, m in enumerate(messages):
                got = reader.next(READ_TIMEOUT)
                assert got == (op, m), f"message {i}: {got and (got[0], len(got[1]))}"
        finally:
            writer.join(READ_TIMEOUT)
        assert not writer.is_alive()
        send(sock, close_frame(1000))
        out = read_outcome(sock, reader, closed_by_us=True)
    assert out.frames == [] and out.close == 1000 and out.eof
