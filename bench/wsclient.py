"""A lean WebSocket client for load generation: one asyncio.Protocol per connection.

It exists so the load generator is cheap enough to drive a server from one core: the
upgrade request is a prebuilt byte string, server frames are parsed with a few byte
operations, and a publication is only counted (and, when latency is collected, its
``"t":`` stamp read with one regex search) — no per-message object, task or callback.

Speaks to the three server kinds of the bench:

- ``hub``: ``/api/v1/ws?token=…`` with subprotocol ``revenge.v1``; ready after the
  ``welcome`` (idle) or after the ``subscribe`` ack;
- ``aiohttp-*`` (bare aiohttp baseline): ``/ws``; ready on its first frame;
- ``socketio``: Engine.IO 4 over WebSocket; answers ``0{…}`` with ``40``, ready on
  ``40{…}``, answers pings (``2``) with pongs (``3``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

import orjson

from .common import HOST

__all__ = ["FIRST_ID", "HandshakeRefused", "Stats", "WSClient", "build_request", "open_ws"]

#: The id of the request a hub connection sends right after its ``welcome`` (``subscribe``
#: of :class:`WSClient`, or any other request): the connection is ready at its ``ack``.
FIRST_ID = "s1"

_T = re.compile(rb'"t":([0-9.]+)')
_RETRY = re.compile(rb"(?im)^retry-after:\s*([0-9.]+)")
_ZERO_MASK = b"\x00\x00\x00\x00"
_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
#: Publications are ~200 bytes; anything this short is protocol chatter (pings).
_SMALL = 16


class HandshakeRefused(ConnectionError):
    def __init__(self, status: int, retry_after: float | None) -> None:
        super().__init__(f"handshake refused with HTTP {status}")
        self.status = status
        self.retry_after = retry_after


class Stats:
    """Counters shared by every client of one load process."""

    __slots__ = (
        "close_codes",
        "closed",
        "collect",
        "frames",
        "lat",
        "nbytes",
        "reads",
        "waiter",
        "wake_at",
    )

    def __init__(self) -> None:
        self.frames = 0
        #: Socket reads that carried publications (frames / reads shows coalescing).
        self.reads = 0
        self.nbytes = 0
        self.collect = False
        self.lat: list[float] = []
        self.closed = 0
        self.close_codes: dict[int, int] = {}
        #: Wake ``waiter`` once ``frames`` reaches ``wake_at`` (the publisher's credit).
        self.wake_at = 0
        self.waiter: asyncio.Future[None] | None = None


def mask_frame(opcode: int, payload: bytes) -> bytes:
    """A client frame (FIN set), masked with a zero key (RFC 6455 allows any key)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + _ZERO_MASK + payload


def build_request(kind: str, port: int, token: str | None = None) -> bytes:
    if kind == "hub":
        path = f"/api/v1/ws?token={token}"
        extra = "Sec-WebSocket-Protocol: revenge.v1\r\n"
    elif kind == "socketio":
        path = "/socket.io/?EIO=4&transport=websocket"
        extra = ""
    else:
        path = "/ws"
        extra = ""
    return (
        f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {_KEY}\r\nSec-WebSocket-Version: 13\r\n"
        f"{extra}\r\n"
    ).encode()


class WSClient(asyncio.Protocol):
    """One connection. ``fast``: publications are only counted (and stamped);
    ``track``: publications are decoded to remember the channel position (storm)."""

    def __init__(
        self,
        kind: str,
        request: bytes,
        stats: Stats,
        *,
        subscribe: bytes | None = None,
        track: bool = False,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.kind = kind
        self.request = request
        self.stats = stats
        self.subscribe = subscribe
        self.track = track
        self.fast = not track
        self.transport: asyncio.Transport | None = None
        self.upgraded = False
        self.ready = False
        self.ready_fut: asyncio.Future[Any] = loop.create_future()
        self.closed_fut: asyncio.Future[int | None] = loop.create_future()
        self.close_code: int | None = None
        self.close_reason = ""
        self.ack: dict[str, Any] | None = None
        self.epoch: str | None = None
        self.seq = 0
        self._buf = b""

    # -- asyncio.Protocol ----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready_fut.done():
            self.ready_fut.set_exception(ConnectionError(f"closed before ready ({exc})"))
            # Retrieved by whoever awaits it; mark it so a dropped one is not reported.
            self.ready_fut.exception()
        elif self.ready:
            self.stats.closed += 1
            code = self.close_code or 1006
            self.stats.close_codes[code] = self.stats.close_codes.get(code, 0) + 1
        if not self.closed_fut.done():
            self.closed_fut.set_result(self.close_code)

    def data_received(self, data: bytes) -> None:
        if self._buf:
            data = self._buf + data
            self._buf = b""
        if not self.upgraded:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > 65536:
                    self._fail(ConnectionError("oversized handshake response"))
                else:
                    self._buf = data
                return
            self._handshake(data[:end])
            if not self.upgraded:
                return
            data = data[end + 4 :]
        n = len(data)
        i = 0
        stats = self.stats
        fast = self.fast and self.ready
        count = 0
        nbytes = 0
        collect = stats.collect
        now = time.time() if collect else 0.0
        while n - i >= 2:
            ln = data[i + 1] & 0x7F
            if ln < 126:
                h = 2
            elif ln == 126:
                if n - i < 4:
                    break
                ln = (data[i + 2] << 8) | data[i + 3]
                h = 4
            else:
                if n - i < 10:
                    break
                ln = int.from_bytes(data[i + 2 : i + 10], "big")
                h = 10
            end = i + h + ln
            if end > n:
                break
            if fast and ln > _SMALL and data[i] & 0x0F == 1:
                count += 1
                nbytes += ln
                if collect:
                    m = _T.search(data, i + h, end)
                    if m is not None:
                        stats.lat.append(now - float(m.group(1)))
            else:
                self._frame(data[i] & 0x0F, data[i + h : end])
                fast = self.fast and self.ready
            i = end
        if i < n:
            self._buf = data[i:]
        if count:
            stats.reads += 1
            stats.frames += count
            stats.nbytes += nbytes
            waiter = stats.waiter
            if waiter is not None and stats.frames >= stats.wake_at and not waiter.done():
                waiter.set_result(None)

    # -- internals -----------------------------------------------------------------
    def _handshake(self, head: bytes) -> None:
        status = int(head[9:12]) if head[:9] == b"HTTP/1.1 " and head[9:12].isdigit() else 0
        if status == 101:
            self.upgraded = True
            return
        m = _RETRY.search(head)
        self._fail(HandshakeRefused(status, float(m.group(1)) if m else None))

    def _fail(self, exc: Exception) -> None:
        if not self.ready_fut.done():
            self.ready_fut.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def _set_ready(self) -> None:
        self.ready = True
        if not self.ready_fut.done():
            self.ready_fut.set_result(None)

    def send_text(self, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(mask_frame(0x1, payload))

    def _frame(self, op: int, payload: bytes) -> None:
        if op == 0x1:
            self._text(payload)
        elif op == 0x9:  # ping
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(mask_frame(0xA, payload))
        elif op == 0x8:  # close: echo the code, then drop the socket
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self.close_code = code
            self.close_reason = payload[2:].decode(errors="replace")
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(mask_frame(0x8, payload[:2]))
                self.transport.close()
            if not self.ready_fut.done():
                self.ready_fut.set_exception(ConnectionError(f"closed with {code}"))
                self.ready_fut.exception()

    def _text(self, p: bytes) -> None:
        kind = self.kind
        if kind == "socketio" and p == b"2":
            self.send_text(b"3")
            return
        if not self.ready:
            if kind == "hub":
                msg = orjson.loads(p)
                mtype = msg.get("type")
                if mtype == "welcome":
                    if self.subscribe is None:
                        self._set_ready()
                    else:
                        self.send_text(self.subscribe)
                elif mtype == "ack" and msg.get("id") == FIRST_ID:
                    self.ack = msg.get("data") or {}
                    self._set_ready()
                elif mtype == "error":
                    self._fail(ConnectionError(f"hub error: {msg.get('data')}"))
            elif kind == "socketio":
                if p[:1] == b"0":
                    self.send_text(b"40")
                elif p[:2] == b"40":
                    self._set_ready()
            else:
                self._set_ready()
            return
        self.stats.frames += 1
        self.stats.nbytes += len(p)
        if self.track and kind == "hub":
            msg = orjson.loads(p)
            if "seq" in msg and "epoch" in msg:
                self.epoch = msg["epoch"]
                self.seq = msg["seq"]

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(Exception):
                self.transport.write(mask_frame(0x8, (1000).to_bytes(2, "big")))
            self.transport.close()


async def open_ws(
    kind: str,
    port: int,
    stats: Stats,
    *,
    token: str | None = None,
    subscribe: bytes | None = None,
    track: bool = False,
    timeout: float = 10.0,
) -> WSClient:
    """Connect, upgrade and wait until ready; raises HandshakeRefused, OSError,
    ConnectionError or TimeoutError."""
    request = build_request(kind, port, token)
    return await open_client(
        lambda: WSClient(kind, request, stats, subscribe=subscribe, track=track), port, timeout
    )


C = TypeVar("C", bound=WSClient)


async def open_client(factory: Callable[[], C], port: int, timeout: float) -> C:
    """Connect a :class:`WSClient` (or a subclass) made by ``factory`` and wait until it is
    ready, each step within ``timeout``; the socket is dropped on failure."""
    loop = asyncio.get_running_loop()
    transport, proto = await asyncio.wait_for(loop.create_connection(factory, HOST, port), timeout)
    try:
        await asyncio.wait_for(proto.ready_fut, timeout)
    except BaseException:
        transport.abort()
        raise
    return proto


def subscribe_message(channel: str, since: tuple[str, int] | None = None) -> bytes:
    item: dict[str, Any] = {"name": channel}
    if since is not None:
        item["since"] = {"epoch": since[0], "seq": since[1]}
    return orjson.dumps({"type": "subscribe", "id": FIRST_ID, "data": {"channels": [item]}})
