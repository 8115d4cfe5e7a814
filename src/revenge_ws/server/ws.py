"""The aiohttp WebSocket adapter: aiohttp in, the core's :class:`Node` behind.

Serves an upgrade sent on a kept-alive HTTP connection (the direct engine,
``server/direct.py``, serves every other). Everything protocol-shaped happens in the core
and admission in ``server/admission.py``; this module only moves frames and reports the
socket's end. Frames are written straight to
the socket's transport (the core hands over complete, coalesced frames), so a
publication costs one buffer append per recipient and one ``write()`` per connection
per loop iteration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import WSMsgType, web

from ..codes import CloseCode
from ..features.web import NODE
from ..protocol import SUBPROTOCOL, now_ms
from .admission import (
    Upgrade,
    admit,
    control_frame,
    endpoint_opened,
    enter_handshake,
)
from .errors import Refusal

__all__ = ["AiohttpTransport", "close_reply", "websocket_handler"]

log = logging.getLogger("revenge_ws.ws")
#: A close handshake gets this long before the socket is simply dropped (s).
CLOSE_TIMEOUT = 2.0
_PING_FRAME = b"\x89\x00"


class AiohttpTransport:
    """:class:`~revenge_ws.core.connection.Transport` over an aiohttp WebSocket."""

    __slots__ = ("_closer", "_raw", "_ws", "buffered")

    def __init__(self, ws: web.WebSocketResponse, raw: asyncio.Transport) -> None:
        self._ws = ws
        self._raw = raw
        self._closer: asyncio.Task[Any] | None = None
        #: The transport's own method, not a wrapper: flush asks it on every write.
        self.buffered: Callable[[], int] = raw.get_write_buffer_size

    def write(self, data: bytes) -> None:
        raw = self._raw
        if not raw.is_closing():
            raw.write(data)

    def ping(self) -> None:
        self.write(_PING_FRAME)

    def close(self, code: int, reason: str) -> None:
        if self._closer is None:
            self._closer = asyncio.get_running_loop().create_task(self._close(code, reason))

    async def _close(self, code: int, reason: str) -> None:
        # No drain for a slow consumer: it would wait for a reader that never reads.
        drain = code != CloseCode.SLOW_CONSUMER
        try:
            await asyncio.wait_for(
                self._ws.close(code=code, message=reason.encode()[:120], drain=drain),
                CLOSE_TIMEOUT,
            )
        except (TimeoutError, ConnectionError, RuntimeError):
            self._raw.abort()

    async def wait_closed(self) -> None:
        if self._closer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._closer), CLOSE_TIMEOUT + 1)


def close_reply(received: int) -> int:
    """The code to answer a client's close frame with (RFC 6455 §5.5.1, §7.4).

    The client's own code when it may be sent back; 1002 for one that must never be on
    the wire (1005, 1006, 1015, below 1000, 5000 and above; aiohttp's reader refuses the
    others itself); 1000 when the close carried no code (``received`` 0).
    """
    if received == 0:
        return 1000
    if received < 1000 or received in (1005, 1006, 1015) or received >= 5000:
        return 1002  # protocol error
    return received


def _gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    """The upgrade and the connection's whole life, in ONE coroutine frame.

    The HTTP error middleware does not wrap this handler (each wrapping frame would live
    as long as the socket: ~1 KiB per idle connection), so the refusals before the
    upgrade are all answered here, a broker or store failure included (503).
    """
    node = request.app[NODE]
    busy = enter_handshake(node)
    if busy is not None:
        return busy.response()
    opening = True
    try:
        if _gone(request):  # the client left while its request waited: no work for it
            return web.Response(status=400)
        admitted = await admit(Upgrade.of(request), node)
        if isinstance(admitted, Refusal):
            return admitted.response()
        claims, session_id, extra, room_id = admitted
        try:
            if _gone(request):  # left during the checks
                return web.Response(status=400)
            ws = web.WebSocketResponse(
                protocols=(SUBPROTOCOL,),
                compress=False,
                # aiohttp refuses a message whose size is >= max_msg_size; the contract
                # allows exactly message_size bytes and closes with 1009 only above it.
                max_msg_size=node.settings.limits.message_size + 1,
                autoping=False,
                # The reply to a client's close is ours (close_reply): aiohttp's automatic
                # one is always 1000 and lets 1006 and codes >= 5000 pass.
                autoclose=False,
                timeout=CLOSE_TIMEOUT,
            )
            await ws.prepare(request)
            raw = request.transport
            if raw is None:  # the peer left during the upgrade
                return ws
            transport = AiohttpTransport(ws, raw)
            try:
                conn = await node.open(claims, transport, session_id, extra_channels=extra)
            finally:
                opening = False
                node.admission.handshakes.leave(time.monotonic())
            if room_id is not None:
                await endpoint_opened(node, conn, room_id, dict(request.query))
            try:
                while not conn.closed:
                    msg = await ws.receive()
                    t = now_ms()
                    kind = msg.type
                    if kind is WSMsgType.TEXT:
                        pending = node.receive(conn, msg.data, t)
                        if pending is not None:
                            await pending
                    elif kind is WSMsgType.PING or kind is WSMsgType.PONG:
                        if control_frame(node, conn) and kind is WSMsgType.PING:
                            with contextlib.suppress(ConnectionError, RuntimeError):
                                await ws.pong(msg.data)
                    elif kind is WSMsgType.BINARY:
                        conn.close(CloseCode.UNSUPPORTED_DATA, "binary frames are not supported")
                    elif kind is WSMsgType.CLOSE:
                        received = int(msg.data or 0)
                        conn.close(close_reply(received), "")
                        # What the client said (1005: no code).
                        conn.close_code = received or 1005
                        break
                    else:
                        # CLOSE / CLOSING / CLOSED / ERROR (e.g. too big: aiohttp sent 1009).
                        if kind is WSMsgType.ERROR and ws.close_code is not None:
                            conn.close_code = ws.close_code
                        break
            except ConnectionError:
                pass
            finally:
                await transport.wait_closed()
                await node.closed(conn, ws.close_code)
            return ws
        finally:
            await node.admission.release_if_unopened(claims, session_id)
    finally:
        if opening:
            node.admission.handshakes.leave(time.monotonic())
