"""The hub's own WebSocket engine: websockets' sans-I/O protocol on the raw transport.

Why it exists: aiohttp keeps ~14 KiB per idle WebSocket (the parsed upgrade request, its
HTTP protocol with two deques, the WebSocket reader, parser and writer, and a handler
task that lives as long as the socket) — more than the hub's whole budget of 16 KiB per
connection (docs/performance.md §4). A socket whose FIRST request is an upgrade to one of
the hub's WebSocket paths is therefore taken before aiohttp ever sees it
(:class:`Engine.wants`, called by the listener's first-request guard, ``server/listener.py``):
websockets' :class:`~websockets.server.ServerProtocol` parses the handshake and the
frames, the same admission as the aiohttp path (:func:`.ws.admit`) decides, and the
connection is then one :class:`Socket` object — no task while it is idle.

Everything else stays with aiohttp: the HTTP API, the pages, and an upgrade sent on a
kept-alive HTTP connection (served by :func:`.ws.websocket_handler`, same behaviour).
``server.ws_engine: aiohttp`` turns this engine off.

Frames the hub sends never pass through the sans-I/O object: the core hands over
complete, coalesced frames and :meth:`Socket.write` puts them on the transport, so a
delivery costs the same as on the aiohttp path. What websockets writes itself (pongs,
the close handshake, handshake responses) goes out in :meth:`Socket._flush`.

Behaviour beyond aiohttp's (RFC 6455, measured by ``tests/test_conformance.py``): an
unmasked client frame fails the connection with 1002, and invalid UTF-8 in a fragmented
text message fails it with 1007 at the first bad fragment, not at the end of the message.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import Iterable, Sequence
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from typing import Any, cast
from urllib.parse import parse_qsl, unquote

from aiohttp.log import access_logger as access_log
from websockets.datastructures import Headers
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import SEND_EOF, State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from ..codes import CloseCode, ErrorCode
from ..core.connection import Connection
from ..core.node import Node
from ..protocol import SUBPROTOCOL, now_ms
from .admission import (
    EXACT_PATH,
    KEYED_PATHS,
    Upgrade,
    admit,
    control_frame,
    endpoint_opened,
    enter_handshake,
)
from .errors import Refusal
from .logs import log_access
from .ws import CLOSE_TIMEOUT

__all__ = ["Engine", "Socket"]

log = logging.getLogger("revenge_ws.ws")
#: websockets logs the request line, ``?token=`` included, and every frame at DEBUG, and
#: "connection open" at INFO for every connection: its protocol objects get this logger,
#: which never has DEBUG on (credentials stay out of logs) and keeps only warnings (the
#: hub's own connect line already says it, and a line per connection is ~3 % of a
#: reconnect's CPU).
_WS_LOG = logging.getLogger("revenge_ws.ws.protocol")
_WS_LOG.setLevel(logging.WARNING)

_PING_FRAME = b"\x89\x00"
_PONG = 0x8A
_UPGRADE = re.compile(rb"(?im)^upgrade:[ \t]*websocket[ \t]*\r?$")
_ECHO = "/debug/echo"


class _FirstValues:
    """Case-insensitive header lookup keeping the first value of a repeated header
    (websockets' ``Headers.get`` raises on a repeated one; aiohttp returns the first)."""

    __slots__ = ("_d",)

    def __init__(self, headers: Headers) -> None:
        d: dict[str, str] = {}
        for key, value in headers.raw_items():
            d.setdefault(key.lower(), value)
        self._d = d

    def get(self, key: str, default: str | None = None) -> str | None:
        return self._d.get(key.lower(), default)


def _query(target: str) -> dict[str, str]:
    _, _, qs = target.partition("?")
    out: dict[str, str] = {}
    for key, value in parse_qsl(qs, keep_blank_values=True):
        out.setdefault(key, value)
    return out


def _cookies(header: str | None) -> dict[str, str]:
    if not header:
        return {}
    jar: SimpleCookie = SimpleCookie()
    with contextlib.suppress(CookieError):
        jar.load(header)
    return {key: morsel.value for key, morsel in jar.items()}


class _Protocol(ServerProtocol):
    """websockets' server protocol with the hub's subprotocol rule, and a close between
    the fragments of a message answered as a close.

    An override rather than the ``select_subprotocol`` argument: that one is stored as a
    method bound to the instance, a reference cycle that keeps every closed connection's
    protocol alive until the next full garbage collection."""

    def select_subprotocol(self, subprotocols: Sequence[Subprotocol]) -> Subprotocol | None:
        # A client that offers no subprotocol (or others) is served without one, as on
        # the aiohttp path: the contract's subprotocol is advisory for clients.
        return Subprotocol(SUBPROTOCOL) if SUBPROTOCOL in subprotocols else None

    def recv_frame(self, frame: Frame) -> None:
        # RFC 6455 §5.4 lets control frames come between the fragments of a message, a
        # close included; websockets fails the connection then (1002, "incomplete
        # fragmented message"). The unfinished message is dropped and the close answered
        # with its own code, as aiohttp does (Autobahn case 7.1.5).
        if frame.opcode is Opcode.CLOSE:
            self.current_size = None
        super().recv_frame(frame)


def _response(status: int, body: bytes, extra: Iterable[tuple[str, str]] = ()) -> Response:
    headers = Headers(
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
            *extra,
        ]
    )
    return Response(status, HTTPStatus(status).phrase, headers, body)


#: Which of our endpoints, and its room or job: ``("hub" | "echo", room_id, job_id)``.
Route = tuple[str, str | None, str | None]


class Engine:
    """Recognises the upgrades this engine serves and builds their :class:`Socket`."""

    __slots__ = ("echo", "node")

    def __init__(self, node: Node, *, echo: bool = False) -> None:
        self.node = node
        #: Serve the conformance echo endpoint (``debug.echo``) on this engine too.
        self.echo = echo

    def route(self, target: str) -> Route | None:
        """The :data:`Route` of one of our paths, else None."""
        path = target.partition("?")[0]
        if path == EXACT_PATH:
            return "hub", None, None
        if self.echo and path == _ECHO:
            return "echo", None, None
        for prefix, name in KEYED_PATHS.items():
            if path.startswith(prefix):
                segment = path[len(prefix) :]
                if not segment or "/" in segment:
                    return None
                value = unquote(segment)
                return ("hub", value, None) if name == "room_id" else ("hub", None, value)
        return None

    def wants(self, head: bytes) -> Route | None:
        """The route of this complete request head if it is an upgrade to one of our
        paths, else None."""
        line = head[: head.find(b"\r\n")].split(b" ")
        if len(line) != 3 or line[0] != b"GET" or line[2] != b"HTTP/1.1":
            return None
        try:
            target = line[1].decode("ascii")
        except UnicodeDecodeError:
            return None
        if _UPGRADE.search(head) is None:
            return None
        return self.route(target)

    def take(self, transport: asyncio.Transport, head: bytes, tail: bytes, route: Route) -> Socket:
        """Serve the upgrade in ``head`` (a complete request head whose route
        :meth:`wants` gave) on ``transport``; ``tail`` is what the client sent after it."""
        sock = Socket(self, transport, tail)
        transport.set_protocol(sock)
        sock.start(head, route)
        return sock


class Socket(asyncio.Protocol):
    """One WebSocket: the handshake, then frames in, and the core's
    :class:`~revenge_ws.core.connection.Transport` for frames out."""

    __slots__ = (
        "_backlog",
        "_busy",
        "_closer",
        "_decoder",
        "_engine",
        "_failed",
        "_kind",
        "_opcode",
        "_parts",
        "_path",
        "_proto",
        "_started",
        "_t",
        "_tail",
        "buffered",
        "conn",
    )

    def __init__(self, engine: Engine, transport: asyncio.Transport, tail: bytes) -> None:
        self._engine = engine
        self._t = transport
        self._tail = tail
        self._proto = _Protocol(
            subprotocols=[Subprotocol(SUBPROTOCOL)],
            max_size=engine.node.settings.limits.message_size,
            logger=_WS_LOG,
        )
        self._kind = "hub"
        self._path = EXACT_PATH
        self.conn: Connection | None = None
        #: Frames that arrived while a request was being handled (requests run in order).
        self._backlog: deque[Frame] | None = None
        self._busy = False
        #: We failed the connection (invalid UTF-8): nothing after it is processed.
        self._failed = False
        self._parts: list[bytes] | None = None
        self._opcode = Opcode.TEXT
        self._decoder: codecs.IncrementalDecoder | None = None
        self._closer: asyncio.TimerHandle | None = None
        self._started = time.monotonic()
        #: The transport's own method, not a wrapper: flush asks it on every write.
        self.buffered = transport.get_write_buffer_size

    # -- handshake ---------------------------------------------------------------------
    def start(self, head: bytes, route: Route) -> None:
        self._kind = route[0]
        proto = self._proto
        proto.receive_data(head)
        events = proto.events_received()
        request = events[0] if events else None
        if not isinstance(request, Request):
            reason = str(proto.handshake_exc or "malformed request")
            self._refuse(Refusal(ErrorCode.INVALID_MESSAGE, f"bad upgrade request: {reason}"))
            return
        self._path = request.path.partition("?")[0]
        node = self._engine.node
        # Counted from here, not when the task runs: handshakes queued behind a busy loop
        # are work in progress too.
        busy = enter_handshake(node)
        if busy is not None:
            self._refuse(busy)
            return
        # Nothing more is read until the handshake is decided (admission awaits).
        self._t.pause_reading()
        node.spawn(self._handshake(request, route), "ws-handshake")

    async def _handshake(self, request: Request, route: Route) -> None:
        try:
            await self._open(request, route)
            # websockets' parser keeps the request in its generator frame for the
            # connection's life (~2.5 KiB of parsed headers per idle connection): empty it.
            request.headers.clear()
            request.path = ""
        except Exception:
            # A bug, not a refusal: answered 500 (as aiohttp answers a handler's error), or
            # the socket dropped once the upgrade has been sent.
            log.exception("WebSocket handshake failed")
            if self._proto.state is State.CONNECTING:
                self._refuse(Refusal(ErrorCode.INTERNAL, "internal error"))
            else:
                self._t.abort()
        finally:
            self._engine.node.admission.handshakes.leave(time.monotonic())

    async def _open(self, request: Request, route: Route) -> None:
        node = self._engine.node
        _, room, job = route
        headers = _FirstValues(request.headers)
        up = Upgrade(headers, _query(request.path), _cookies(headers.get("Cookie")), room, job)
        if self._kind == "echo":
            if self._accept(request):
                self._resume()
            return
        if self._t.is_closing():
            return  # the client left while its handshake waited: no work for it
        admitted = await admit(up, node)
        if isinstance(admitted, Refusal):
            self._refuse(admitted)
            return
        claims, session_id, extra, room_id = admitted
        try:
            if self._t.is_closing() or not self._accept(request):
                return  # the peer left during the checks, or a bad WebSocket request
            conn = self.conn = await node.open(claims, self, session_id, extra_channels=extra)
            if self._t.is_closing():  # gone while opening: connection_lost saw no conn
                await node.closed(conn, 1006)
                return
            if room_id is not None:
                try:
                    await endpoint_opened(node, conn, room_id, dict(up.query))
                except Exception:
                    log.exception("joining room %s on connect failed", room_id)
                    conn.close(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            await node.admission.release_if_unopened(claims, session_id)
        self._resume()

    def _accept(self, request: Request) -> bool:
        proto = self._proto
        response = proto.accept(request)
        if response.status_code != 101:
            # A bad key, version or Connection header: websockets' status and headers,
            # the contract's JSON body.
            body = Refusal(
                ErrorCode.INVALID_MESSAGE, f"invalid WebSocket handshake: {proto.handshake_exc}"
            ).body()
            skip = {"content-type", "content-length", "connection"}
            extra = [(k, v) for k, v in response.headers.raw_items() if k.lower() not in skip]
            status = response.status_code
            if _FirstValues(request.headers).get("Sec-WebSocket-Version") != "13":
                # RFC 6455 §4.4: an unsupported version gets the versions we speak.
                status = 426
                extra.append(("Sec-WebSocket-Version", "13"))
            response = _response(status, body, extra)
            proto.send_response(response)
            self._log(status)
            self._flush()
            return False
        proto.send_response(response)
        self._flush()
        return True

    def _refuse(self, refusal: Refusal) -> None:
        """Answer the upgrade with ``refusal`` (the contract's JSON body) and close."""
        self._proto.send_response(_response(refusal.status, refusal.body(), refusal.headers()))
        self._log(refusal.status)
        self._flush()

    def _resume(self) -> None:
        if self._t.is_closing():
            return  # gone meanwhile: connection_lost has run
        tail, self._tail = self._tail, b""
        if tail:
            self._feed(tail)
        if not self._busy and not self._t.is_closing():
            self._t.resume_reading()

    def _log(self, status: int) -> None:
        if access_log.isEnabledFor(logging.INFO):
            peer = self._t.get_extra_info("peername")
            log_access(
                access_log,
                "GET",
                self._path,
                status,
                time.monotonic() - self._started,
                peer[0] if peer else None,
            )

    # -- frames in ---------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._proto.state is State.CONNECTING:
            self._tail += data  # only before the handshake is decided (reading paused)
            return
        self._feed(data)

    def eof_received(self) -> bool | None:
        # Not passed to websockets: the transport closes itself (and connection_lost
        # follows); websockets would only store an EOFError whose traceback references
        # the protocol, a cycle that outlives the connection.
        return None

    def _feed(self, data: bytes) -> None:
        proto = self._proto
        proto.receive_data(data)
        frames = proto.events_received()
        if self._busy:
            assert self._backlog is not None
            self._backlog.extend(frames)  # type: ignore[arg-type]
            return
        self._frames(frames)  # type: ignore[arg-type]
        if proto.parser_exc is not None and self.conn is not None and not self.conn.closed:
            # websockets failed the connection (1002, 1007, 1009): tell the core.
            sent = proto.close_sent
            self.conn.close(sent.code if sent is not None else 1006, "")
        if not self._busy:
            self._flush()

    def _frames(self, frames: Iterable[Frame]) -> None:
        it = iter(frames)
        for frame in it:
            if self._failed:
                return  # we failed the connection: what the client sent after is ignored
            self._frame(frame)
            if self._busy:
                # A request is being handled: the rest waits for it (requests run in order).
                assert self._backlog is not None
                self._backlog.extend(it)
                return

    def _frame(self, frame: Frame) -> None:
        op = frame.opcode
        # Received frames carry bytes (websockets types them as any bytes-like).
        data = cast(bytes, frame.data)
        if op is Opcode.TEXT or op is Opcode.BINARY:
            if frame.fin:
                self._message(op, data)
                return
            self._opcode = op
            self._parts = [data]
            if op is Opcode.TEXT:
                self._decoder = codecs.getincrementaldecoder("utf-8")()
                self._check_utf8(data, False)
        elif op is Opcode.CONT:
            parts = self._parts
            if parts is None:  # websockets refused it already; nothing to assemble
                return
            parts.append(data)
            if self._decoder is not None:
                self._check_utf8(data, frame.fin)
                if self._failed:
                    return
            if frame.fin:
                self._parts = None
                self._decoder = None
                self._message(self._opcode, b"".join(parts))
        elif op is Opcode.PING:
            # Answered here, in order with the other frames, and only within the
            # inbound budget (extension f21); websockets' automatic pong is dropped.
            if self._control():
                self.write(Frame(Opcode.PONG, data).serialize(mask=False))
        elif op is Opcode.PONG:
            self._control()
        elif op is Opcode.CLOSE:
            self._peer_closed()

    def _check_utf8(self, data: bytes, final: bool) -> None:
        """Fail fast (RFC 6455 §8.1): at the first fragment that cannot be UTF-8."""
        assert self._decoder is not None
        try:
            self._decoder.decode(data, final)
        except UnicodeDecodeError:
            self._fail(CloseCode.INVALID_PAYLOAD, "invalid UTF-8")

    def _message(self, op: Opcode, data: bytes) -> None:
        conn = self.conn
        if op is Opcode.TEXT:
            try:
                text = data.decode()
            except UnicodeDecodeError:
                self._fail(CloseCode.INVALID_PAYLOAD, "invalid UTF-8")
                return
            if self._kind == "echo":
                self._echo(op, data)
                return
            if conn is None or conn.closed:
                return
            pending = self._engine.node.receive(conn, text, now_ms())
            if pending is not None:
                self._wait(pending)
        elif self._kind == "echo":
            self._echo(op, data)
        elif conn is not None:
            conn.close(CloseCode.UNSUPPORTED_DATA, "binary frames are not supported")

    def _echo(self, op: Opcode, data: bytes) -> None:
        # Straight to the transport, like the hub's frames: websockets has already
        # queued its answer to a close that came in the same read, and what was received
        # before that close must be answered before it.
        self.write(Frame(op, data).serialize(mask=False))

    def _control(self) -> bool:
        conn = self.conn
        if conn is None or conn.closed:
            return True
        return control_frame(self._engine.node, conn)

    def _peer_closed(self) -> None:
        """The client's close frame; websockets has answered it with the same code
        (1002 for a code that must not be sent, as :func:`.ws.close_reply`)."""
        conn = self.conn
        if conn is None or conn.closed:
            return
        rcvd = self._proto.close_rcvd
        conn.close(rcvd.code if rcvd is not None else 1005, "")  # records what it said

    def _fail(self, code: int, reason: str) -> None:
        self._failed = True
        self._parts = None
        self._decoder = None
        self._proto.fail(code, reason)
        if self.conn is not None:
            self.conn.close(code, reason)

    def _wait(self, pending: Any) -> None:
        self._busy = True
        if self._backlog is None:
            self._backlog = deque()
        self._t.pause_reading()
        self._engine.node.spawn(self._handled(pending), "ws-request")

    async def _handled(self, pending: Any) -> None:
        try:
            await pending
        finally:
            self._busy = False  # cancelled (shutdown): the socket is being closed anyway
        backlog = self._backlog
        self._backlog = None
        if backlog:
            self._frames(backlog)
        if not self._busy:
            self._flush()
            if not self._t.is_closing():
                self._t.resume_reading()

    # -- frames out (the core's Transport) ---------------------------------------------
    def write(self, data: bytes) -> None:
        t = self._t
        if not t.is_closing():
            t.write(data)

    def ping(self) -> None:
        self.write(_PING_FRAME)

    def close(self, code: int, reason: str) -> None:
        """Start the close handshake; the socket is dropped if it is not finished within
        ``CLOSE_TIMEOUT`` (a slow consumer's close frame waits behind its full buffer)."""
        if self._closer is not None:
            return
        proto = self._proto
        if proto.state is State.OPEN:
            proto.send_close(code, reason.encode()[:120].decode(errors="ignore"))
            self._flush()
        self._closer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self._t.abort)

    def _flush(self) -> None:
        """Write what websockets queued (handshake responses, the close handshake) but its
        automatic pongs; its end of stream closes the socket."""
        t = self._t
        for chunk in self._proto.data_to_send():
            if chunk is SEND_EOF or not chunk:
                t.close()  # after the buffered bytes
                return
            if chunk[0] != _PONG and not t.is_closing():  # pongs: see _frame
                t.write(chunk)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._closer is not None:
            self._closer.cancel()
            self._closer = None
        # websockets' parser is a generator whose frame references its protocol: closing
        # it (nothing is parsed after this) lets the protocol go without the collector.
        with contextlib.suppress(Exception):
            self._proto.parser.close()
        conn = self.conn
        if conn is not None:
            # The connection and this socket point at each other: break the cycle, so both
            # are freed when node.closed is done, not at the next full garbage collection
            # (rare in the hub's process: app.tune_gc).
            self.conn = None
            node = self._engine.node
            if conn.close_code is None:
                sent = self._proto.close_sent
                conn.close_code = sent.code if sent is not None else 1006
            self._log(101)
            node.spawn(node.closed(conn, conn.close_code), "ws-closed")
