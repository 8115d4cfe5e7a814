"""Admission of a WebSocket upgrade, shared by both engines (the direct engine and
aiohttp's handler): the hub's WebSocket routes, what admission needs from a request
(:class:`Upgrade`, whichever stack parsed it), the token's place, the Origin rule, the
bound on handshakes in progress, every check before the upgrade (:func:`admit`), the
keyed endpoints, and the inbound budget of control frames.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..auth import Claims
from ..codes import ErrorCode
from ..core.connection import Connection
from ..core.node import Endpoint, Node
from ..core.session import Close
from ..exceptions import AuthError, ProtocolError
from ..features.web import extract_token
from .errors import UNAVAILABLE, UNAVAILABLE_ERRORS, Refusal

__all__ = [
    "EXACT_PATH",
    "KEYED_PATHS",
    "Admitted",
    "Upgrade",
    "admit",
    "control_frame",
    "endpoint_opened",
    "enter_handshake",
    "extract_token",
    "origin_allowed",
]

log = logging.getLogger("revenge_ws.ws")

#: The hub's WebSocket routes: the main endpoint, and the keyed ones (prefix -> the
#: :class:`Upgrade` field their one path segment fills).
EXACT_PATH = "/api/v1/ws"
KEYED_PATHS = {"/api/v1/ws/playback/": "room_id", "/api/v1/ws/transcode/": "job_id"}


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


def origin_allowed(up: Upgrade, allowed: list[str]) -> bool:
    origin = up.headers.get("Origin")
    # A request without Origin is a native app, not a browser: the contract lets it pass.
    return not allowed or origin is None or origin in allowed


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
    taken: the adapter gives it back (``node.admission.handshakes.leave()``) once the
    connection is open or refused. Else the 503 to answer: no place left, or the node's
    loop runs late (``server.max_loop_lag``)."""
    admission = node.admission
    if admission.overloaded():
        reason = "the node is overloaded, retry later"
    elif admission.handshakes.enter():
        admission.storm.handshake(time.monotonic())
        return None
    else:
        reason = "too many handshakes in progress, retry later"
    node.observer.handshake_refused(ErrorCode.UNAVAILABLE.value)
    return Refusal(ErrorCode.UNAVAILABLE, reason, 1, admission.spread_window())


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
