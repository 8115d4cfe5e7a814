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
import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import WSMsgType, web

from ..auth import Claims
from ..codes import CloseCode, ErrorCode
from ..core.connection import Connection
from ..core.node import Endpoint, Node
from ..core.session import Close
from ..exceptions import AuthError, ProtocolError
from ..protocol import SUBPROTOCOL, now_ms
from .errors import UNAVAILABLE, UNAVAILABLE_ERRORS, Refusal

__all__ = [
    "AiohttpTransport",
    "Refusal",
    "Upgrade",
    "admit",
    "close_reply",
    "control_frame",
    "endpoint_opened",
    "enter_handshake",
    "extract_token",
    "websocket_handler",
]

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


@dataclass(frozen=True, slots=True)
class Upgrade:
    """What admission needs from an upgrade request, whichever stack parsed it."""

    #: Case-insensitive ``.get`` (aiohttp's ``CIMultiDictProxy``, websockets' ``Headers``).
    headers: Any
    query: Mapping[str, str]
    cookies: Mapping[str, str]
    room_id: str | None = None
    job_id: str | None = None

    @classmethod
    def of(cls, request: web.Request) -> Upgrade:
        info = request.match_info
        return cls(
            request.headers,
            request.query,
            request.cookies,
            info.get("room_id"),
            info.get("job_id"),
        )


#: Admitted: the token's claims, the new session id, extra channels, the room to join.
Admitted = tuple[Claims, str, tuple[str, ...], str | None]


def extract_token(request: web.Request | Upgrade) -> str | None:
    """The token from, in this order: ``Authorization: Bearer``, ``?token=``, cookie."""
    header = request.headers.get("Authorization", "") or ""
    if header[:7].lower() == "bearer ":
        return str(header[7:].strip())
    return request.query.get("token") or request.cookies.get("auth_token")


def origin_allowed(up: Upgrade, allowed: list[str]) -> bool:
    origin = up.headers.get("Origin")
    # A request without Origin is a native app, not a browser: the contract lets it pass.
    return not allowed or origin is None or origin in allowed


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
        if request.transport is None or request.transport.is_closing():
            # The client left while its request waited: no work for it.
            return web.Response(status=400)
        admitted = await admit(Upgrade.of(request), node)
        if isinstance(admitted, Refusal):
            return admitted.response()
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
            try:
                conn = await node.open(claims, transport, session_id, extra_channels=extra)
            finally:
                opening = False
                node.admission.handshakes.leave()
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
            node.admission.handshakes.leave()


def control_frame(node: Node, conn: Connection) -> bool:
    """A ping or pong arrived; True when a ping may be answered. Control frames spend
    the inbound budget (extension f21): over it, no pong but the ``RATE_LIMITED`` error
    a dropped message gets, and a flood closes the connection."""
    verdict = conn.session.control(node.clock())
    if verdict is None:
        return True
    if isinstance(verdict, Close):
        node.close_connection(conn, verdict.code, verdict.reason)
    else:
        conn.send(verdict.payload)
    return False


def enter_handshake(node: Node) -> Refusal | None:
    """Take one of the node's places for a handshake in progress (contract v1.1 §12),
    before anything about the request is looked at, its token included. None when
    taken: the adapter gives it back (``node.admission.handshakes.leave()``) once the connection is
    open or refused. Else the 503 to answer."""
    if node.admission.handshakes.enter():
        return None
    node.observer.handshake_refused(ErrorCode.UNAVAILABLE.value)
    return Refusal(
        ErrorCode.UNAVAILABLE,
        "too many handshakes in progress, retry later",
        1,
        node.admission.spread_window(),
    )


async def admit(up: Upgrade, node: Node) -> Refusal | Admitted:
    """Every check before the upgrade: a refusal, or what the connection needs. A broker
    or store failure is a refusal too (503, retry in a second). Every 503 advises the
    node's spread window (contract v1.1 §12)."""
    try:
        result = await _admit(up, node)
    except UNAVAILABLE_ERRORS as exc:
        log.warning("handshake refused: unavailable: %s", exc)
        node.observer.handshake_refused(ErrorCode.UNAVAILABLE.value)
        result = UNAVAILABLE
    if isinstance(result, Refusal) and result.code is ErrorCode.UNAVAILABLE:
        return dataclasses.replace(result, window=node.admission.spread_window())
    return result


async def _admit(up: Upgrade, node: Node) -> Refusal | Admitted:
    settings = node.settings
    if node.closing:
        return Refusal(ErrorCode.UNAVAILABLE, "shutting down", 5)
    if not origin_allowed(up, settings.allowed_origins):
        node.observer.handshake_refused("FORBIDDEN")
        return Refusal(ErrorCode.FORBIDDEN, "origin not allowed")
    early = _refuse_before_auth(node)
    if early is not None:
        node.observer.handshake_refused(ErrorCode.UNAVAILABLE.value)
        return early
    try:
        claims = node.authenticate(extract_token(up))
    except AuthError as exc:
        node.observer.handshake_refused(exc.code.value)
        return Refusal(exc.code, exc.message)
    extra: tuple[str, ...] = ()
    job_id = up.job_id
    room_id = up.room_id
    try:
        if job_id is not None:
            extra = (await _check_channel(node, claims, f"transcode:{job_id}"),)
        if room_id is not None:
            await _playback(node).admit(claims, room_id, dict(up.query))
    except ProtocolError as exc:
        node.observer.handshake_refused(exc.code.value)
        return Refusal(exc.code, exc.message)
    session_id = node.new_session_id()
    try:
        await node.admission.admit(claims, session_id)
    except AuthError as exc:
        node.observer.handshake_refused(exc.code.value)
        retry = node.admission.retry_after() if exc.code is ErrorCode.UNAVAILABLE else None
        if exc.code is ErrorCode.RATE_LIMITED:
            retry = 5.0
        return Refusal(exc.code, exc.message, retry)
    return claims, session_id, extra, room_id


def _playback(node: Node) -> Endpoint:
    """The playback endpoint's feature (SyncPlay), or NOT_FOUND when it is off."""
    endpoint = node.endpoints.get("playback")
    if endpoint is None:
        raise ProtocolError(ErrorCode.NOT_FOUND, "SyncPlay is not enabled on this hub")
    return endpoint


async def endpoint_opened(
    node: Node, conn: Connection, room_id: str, query: dict[str, str]
) -> None:
    """The playback endpoint joins its room right after the ``welcome``."""
    await _playback(node).opened(conn, room_id, query)


def _refuse_before_auth(node: Node) -> Refusal | None:
    """The node-wide admission checks, made before the token is verified.

    During a handshake storm the accept bucket is empty: every handshake, forged or
    valid, would cost a token verification only to be refused 503 by :meth:`Node.admit`.
    This looks at the bucket without spending from it, so only a handshake that is
    admitted spends a token (as before) and a storm of bad tokens cannot drain the
    bucket that legitimate clients need. ``admit`` still decides (the bucket may empty
    while a handshake awaits its checks); the per-user limits need the token's user and
    stay after it.
    """
    wait = node.admission.wait()
    if wait > 0:
        full = len(node.hub) >= node.settings.server.max_connections
        reason = "this node is full" if full else "too many handshakes, retry later"
        return Refusal(ErrorCode.UNAVAILABLE, reason, max(1.0, wait))
    return None


async def _check_channel(node: Node, claims: Claims, name: str) -> str:
    from ..core.channels import parse_channel

    await node.policy.check(claims, parse_channel(name))
    return name
