"""The WebSocket adapter: aiohttp in, the core's :class:`Node` behind.

Everything protocol-shaped happens in the core; this module only authenticates the
handshake, moves frames, and reports the socket's end. Frames are written straight to
the socket's transport (the core hands over complete, coalesced frames), so a
publication costs one buffer append per recipient and one ``write()`` per connection
per loop iteration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import WSMsgType, web

from ..auth import Claims
from ..codes import CloseCode, ErrorCode
from ..core.node import Node
from ..core.session import Close
from ..exceptions import AuthError, ProtocolError
from ..protocol import SUBPROTOCOL, now_ms
from .errors import UNAVAILABLE_ERRORS, error_response, unavailable_response

__all__ = ["AiohttpTransport", "close_reply", "extract_token", "websocket_handler"]

log = logging.getLogger("revenge_ws.ws")
NODE: web.AppKey[Node] = web.AppKey("node", Node)
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


def extract_token(request: web.Request) -> str | None:
    """The token from, in this order: ``Authorization: Bearer``, ``?token=``, cookie."""
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return request.query.get("token") or request.cookies.get("auth_token")


def origin_allowed(request: web.Request, allowed: list[str]) -> bool:
    origin = request.headers.get("Origin")
    # A request without Origin is a native app, not a browser: the contract lets it pass.
    return not allowed or origin is None or origin in allowed


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    """The upgrade and the connection's whole life, in ONE coroutine frame.

    The HTTP error middleware does not wrap this handler (each wrapping frame would live
    as long as the socket: ~1 KiB per idle connection), so the refusals before the
    upgrade are all answered here, a broker or store failure included (503).
    """
    node = request.app[NODE]
    try:
        admitted = await _admit(request, node)
    except UNAVAILABLE_ERRORS as exc:
        log.warning("handshake refused: unavailable: %s", exc)
        node.observer.handshake_refused(ErrorCode.UNAVAILABLE.value)
        return unavailable_response()
    if isinstance(admitted, web.Response):
        return admitted
    claims, session_id, extra, room_id = admitted
    try:
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
        conn = await node.open(claims, transport, session_id, extra_channels=extra)
        if room_id is not None:
            await node.join_room_on_connect(conn, room_id, dict(request.query))
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
                    verdict = conn.session.control(node.clock())
                    if verdict is None:
                        if kind is WSMsgType.PING:
                            with contextlib.suppress(ConnectionError, RuntimeError):
                                await ws.pong(msg.data)
                    elif isinstance(verdict, Close):
                        conn.close(verdict.code, verdict.reason)
                    else:
                        # Over budget: no pong, the RATE_LIMITED error a dropped message gets.
                        conn.send(verdict.payload)
                elif kind is WSMsgType.BINARY:
                    conn.close(CloseCode.UNSUPPORTED_DATA, "binary frames are not supported")
                elif kind is WSMsgType.CLOSE:
                    received = int(msg.data or 0)
                    conn.close(close_reply(received), "")
                    conn.close_code = received or 1005  # what the client said (1005: none)
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
        await node.release_if_unopened(claims, session_id)


async def _admit(
    request: web.Request, node: Node
) -> web.Response | tuple[Claims, str, tuple[str, ...], str | None]:
    """Every check before the upgrade: a refusal, or what the connection needs."""
    settings = node.settings
    if node.closing:
        return error_response(ErrorCode.UNAVAILABLE, "shutting down", retry_after=5)
    if not origin_allowed(request, settings.allowed_origins):
        node.observer.handshake_refused("FORBIDDEN")
        return error_response(ErrorCode.FORBIDDEN, "origin not allowed")
    early = _refuse_before_auth(node)
    if early is not None:
        node.observer.handshake_refused(ErrorCode.UNAVAILABLE.value)
        return early
    try:
        claims = node.authenticate(extract_token(request))
    except AuthError as exc:
        node.observer.handshake_refused(exc.code.value)
        return error_response(exc.code, exc.message)
    extra: tuple[str, ...] = ()
    job_id = request.match_info.get("job_id")
    room_id = request.match_info.get("room_id")
    try:
        if job_id is not None:
            extra = (await _check_channel(node, claims, f"transcode:{job_id}"),)
        if room_id is not None and node.room_admission is not None:
            await node.room_admission(claims, room_id, dict(request.query))
        elif room_id is not None:
            raise ProtocolError(ErrorCode.NOT_FOUND, "SyncPlay is not enabled on this hub")
    except ProtocolError as exc:
        node.observer.handshake_refused(exc.code.value)
        return error_response(exc.code, exc.message)
    session_id = node.new_session_id()
    try:
        await node.admit(claims, session_id)
    except AuthError as exc:
        node.observer.handshake_refused(exc.code.value)
        retry = node.retry_after() if exc.code is ErrorCode.UNAVAILABLE else None
        if exc.code is ErrorCode.RATE_LIMITED:
            retry = 5.0
        return error_response(exc.code, exc.message, retry_after=retry)
    return claims, session_id, extra, room_id


def _refuse_before_auth(node: Node) -> web.Response | None:
    """The node-wide admission checks, made before the token is verified.

    During a handshake storm the accept bucket is empty: every handshake, forged or
    valid, would cost a token verification only to be refused 503 by :meth:`Node.admit`.
    This looks at the bucket without spending from it, so only a handshake that is
    admitted spends a token (as before) and a storm of bad tokens cannot drain the
    bucket that legitimate clients need. ``admit`` still decides (the bucket may empty
    while a handshake awaits its checks); the per-user limits need the token's user and
    stay after it.
    """
    wait = node.admission_wait()
    if wait > 0:
        full = len(node.hub) >= node.settings.server.max_connections
        reason = "this node is full" if full else "too many handshakes, retry later"
        return error_response(ErrorCode.UNAVAILABLE, reason, retry_after=max(1.0, wait))
    return None


async def _check_channel(node: Node, claims: Claims, name: str) -> str:
    from ..core.channels import parse_channel

    await node.policy.check(claims, parse_channel(name))
    return name
