"""The listener's first protocol: every socket starts here until its first request is
known (``FirstRequestDeadline``), then belongs to the direct WebSocket engine or to aiohttp.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from .direct import Engine

__all__ = ["HEAD_LIMIT", "FirstRequestDeadline", "guarded", "mark_seen"]


#: A first request head longer than this goes to aiohttp, which answers it (431/400).
HEAD_LIMIT = 16 * 1024


class FirstRequestDeadline(asyncio.Protocol):
    """The listener's protocol until a socket's first request is known.

    A socket that has not sent a complete request within the handshake timeout is
    dropped (slowloris). When the first request is a WebSocket upgrade that the direct
    engine serves (``server.ws_engine``), the socket is handed to it and aiohttp never
    sees it; otherwise aiohttp's protocol gets everything, this object staying in front
    only to pass calls through (its deadline ends when aiohttp's handler is reached).
    """

    __slots__ = ("_buf", "_deadline", "_engine", "_factory", "_inner", "_timeout", "_transport")

    def __init__(self, factory: Callable[[], Any], timeout: float, engine: Engine | None) -> None:
        self._factory = factory
        self._inner: Any = None
        self._engine = engine
        self._timeout = timeout
        self._deadline: asyncio.TimerHandle | None = None
        self._transport: Any = None
        self._buf = b""

    def connection_made(self, transport: Any) -> None:
        self._transport = transport
        self._deadline = asyncio.get_running_loop().call_later(
            self._timeout, self._check, transport
        )
        if self._engine is None:
            self._delegate(b"")

    def _delegate(self, data: bytes) -> None:
        # aiohttp's own connection_made turns Nagle off for small frames.
        self._inner = self._factory()
        self._inner.connection_made(self._transport)
        if data:
            self._inner.data_received(data)

    def _check(self, transport: Any) -> None:
        self._deadline = None
        if not transport.is_closing():
            transport.abort()

    def request_seen(self) -> None:
        """A complete request arrived: the deadline is met (and its timer, which holds
        this socket's protocol, is released at once rather than after the timeout)."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)
            return
        buf = self._buf + data if self._buf else data
        # Only a GET can be an upgrade: anything else goes to aiohttp at its first byte.
        if b"GET "[: len(buf)] != buf[:4]:
            self._buf = b""
            self._delegate(buf)
            return
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > HEAD_LIMIT:
                self._buf = b""
                self._delegate(buf)
            else:
                self._buf = buf
            return
        self._buf = b""
        head = buf[: end + 4]
        assert self._engine is not None
        route = self._engine.wants(head)
        if route is not None:
            self.request_seen()
            self._engine.take(self._transport, head, buf[end + 4 :], route)
        else:
            self._delegate(buf)

    def eof_received(self) -> bool | None:
        if self._inner is None:
            return None  # nothing to answer: the transport closes
        result: bool | None = self._inner.eof_received()
        return result

    def connection_lost(self, exc: Exception | None) -> None:
        # A pending deadline would keep this socket's protocol and buffers alive for the
        # whole handshake timeout after it closed (memory under connect/close storms).
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


def guarded(runner: web.AppRunner, timeout: float, engine: Engine | None) -> Callable[[], Any]:
    """The listener's protocol factory: the first-request deadline in front of aiohttp's
    protocol, and the direct WebSocket engine when it is on."""
    factory = runner.server
    assert factory is not None
    return lambda: FirstRequestDeadline(factory, timeout, engine)


@web.middleware
def mark_seen(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> Awaitable[web.StreamResponse]:
    # The handshake timeout only concerns sockets that never completed a request.
    # Not a coroutine: nothing to do afterwards, so no frame kept for a socket's life.
    transport = request.transport
    if transport is not None:
        guard = transport.get_protocol()
        if isinstance(guard, FirstRequestDeadline):
            guard.request_seen()
    return handler(request)
