"""The HTTP API (contract §9): backend publishing, operations, time.

Handlers are thin: parse and validate (pydantic), call the node, shape the answer.
Every refusal is ``{"error": {"code", "message"}}`` with the status of its code.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..codes import ErrorCode
from ..core.channels import parse_channel
from ..core.node import Node
from ..exceptions import (
    BrokerUnavailable,
    ProtocolError,
)
from ..features.web import (
    NODE,
    BodyTimeout,
    backend_auth,
    json_body,
    json_response,
    read_body,
    user_auth,
)
from ..protocol import StreamPosition, now_ms
from .errors import UNAVAILABLE_ERRORS, error_response, unavailable_response
from .ws import websocket_handler

__all__ = [
    "BodyTimeout",
    "PublishBody",
    "backend_auth",
    "json_body",
    "read_body",
    "routes",
    "user_auth",
]

log = logging.getLogger("revenge_ws.http")
M = TypeVar("M", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PublishBody(_Body):
    channel: str = Field(max_length=160)
    type: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    data: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str | None = Field(None, min_length=1, max_length=128)


class DisconnectBody(_Body):
    user_id: str = Field(min_length=1, max_length=128)
    code: int = Field(4503, ge=4000, le=4999)
    reason: str = Field("", max_length=120)


class RevokeBody(_Body):
    user_id: str = Field(min_length=1, max_length=128)


@web.middleware
def error_middleware(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
    """Errors to the contract's JSON answers. Not a coroutine itself: a WebSocket's
    handler is passed through untouched, so no frame of this middleware lives as long
    as the socket (the handler answers its own refusals)."""
    if request.match_info.handler is websocket_handler:
        return handler(request)
    return _answer_errors(request, handler)


async def _answer_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except BodyTimeout as exc:
        return await _answer_and_close(request, exc)
    except ProtocolError as exc:
        return error_response(exc.code, exc.message)
    except UNAVAILABLE_ERRORS as exc:
        log.warning("%s %s: unavailable: %s", request.method, request.path, exc)
        return unavailable_response()
    except web.HTTPException as exc:
        if exc.status >= 400 and exc.content_type != "application/json":
            code = {
                404: ErrorCode.NOT_FOUND,
                405: ErrorCode.INVALID_MESSAGE,
                413: ErrorCode.TOO_LARGE,
            }.get(exc.status, ErrorCode.INVALID_MESSAGE)
            resp = error_response(code, exc.reason or "refused")
            resp.set_status(exc.status)
            return resp
        raise
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(ErrorCode.INTERNAL, "internal error")


async def _answer_and_close(request: web.Request, exc: BodyTimeout) -> web.Response:
    """408 ``INVALID_MESSAGE``, then close the connection at once: the rest of the body
    may never come. Left to itself aiohttp would answer and then keep reading (and
    discarding) the body for up to 10 s more before closing, which is the hold the
    deadline is there to end."""
    resp = error_response(ErrorCode.INVALID_MESSAGE, str(exc))
    resp.set_status(408)
    resp.force_close()
    with contextlib.suppress(ConnectionError):
        await resp.prepare(request)
        await resp.write_eof()
    # The answer is in the transport's buffer, which close() flushes before the FIN.
    request.protocol.force_close()
    return resp


# -- backend -----------------------------------------------------------------------
async def publish(request: web.Request) -> web.Response:
    backend_auth(request)
    body = await json_body(request, PublishBody)
    node = request.app[NODE]
    parse_channel(body.channel)
    if len(orjson.dumps(body.data)) > node.settings.limits.message_size:
        raise ProtocolError(ErrorCode.TOO_LARGE, "data is larger than the message size limit")
    pub = await node.publish(
        body.channel, body.type, body.data, idempotency_key=body.idempotency_key
    )
    return json_response({"channel": pub.channel, "seq": pub.seq, "epoch": pub.epoch})


async def disconnect(request: web.Request) -> web.Response:
    backend_auth(request)
    body = await json_body(request, DisconnectBody)
    await request.app[NODE].disconnect_user(body.user_id, body.code, body.reason)
    return json_response({"user_id": body.user_id, "code": body.code})


async def revoke(request: web.Request) -> web.Response:
    backend_auth(request)
    body = await json_body(request, RevokeBody)
    at = await request.app[NODE].revoke_user(body.user_id)
    return json_response({"user_id": body.user_id, "revoked_before": at})


async def presence(request: web.Request) -> web.Response:
    backend_auth(request)
    channel = parse_channel(request.match_info["channel"]).name
    members = await request.app[NODE].subscriptions.presence(channel)
    return json_response({"channel": channel, "members": members})


async def history(request: web.Request) -> web.Response:
    backend_auth(request)
    channel = parse_channel(request.match_info["channel"]).name
    q = request.query
    try:
        limit = int(q.get("limit", "100"))
        since_seq = int(q["since"]) if "since" in q else None
    except ValueError:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "since and limit are integers") from None
    if not 0 < limit <= 1000:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "limit must be 1..1000")
    node = request.app[NODE]
    since = None
    if since_seq is not None:
        epoch = q.get("epoch")
        if not epoch:
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, "since needs epoch")
        since = StreamPosition(epoch, since_seq)
    res = await node.call(node.broker.history(channel, since, limit if since is None else 0))
    pubs = res.publications[:limit]
    return json_response(
        {
            "channel": channel,
            "epoch": res.position.epoch,
            "seq": res.position.seq,
            "recovered": res.recovered,
            "publications": [orjson.loads(p.payload) for p in pubs],
        }
    )


async def info(request: web.Request) -> web.Response:
    backend_auth(request)
    node = request.app[NODE]
    return json_response(node_info(node))


def node_info(node: Node) -> dict[str, Any]:
    hub = node.hub
    return {
        "node_id": node.node_id,
        "version": __version__,
        "protocol": "revenge.v1",
        "uptime": round(time.time() - node.started_at, 1),
        "connections": len(hub),
        "users": len(hub.by_user),
        "channels": len(hub.channels),
        "delivered": hub.delivered,
        "broker": node.settings.broker.url.split("://", 1)[0],
        "closing": node.closing,
    }


# -- everyone ------------------------------------------------------------------------
async def server_time(request: web.Request) -> web.Response:
    t1 = now_ms()
    return json_response({"t1": t1, "t2": now_ms()})


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    node = request.app[NODE]
    checks: dict[str, str] = {}
    try:
        await node.call(node.broker.ping())
        checks["broker"] = "ok"
    except BrokerUnavailable as exc:
        checks["broker"] = f"unavailable: {exc}"
    for name, probe in request.app[PROBES].items():
        try:
            await probe()
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"unavailable: {type(exc).__name__}"
    ok = all(v == "ok" for v in checks.values()) and not node.closing
    return json_response(
        {"status": "ok" if ok else "unavailable", "checks": checks, "closing": node.closing},
        status=200 if ok else 503,
    )


PROBES: web.AppKey[dict[str, Callable[[], Awaitable[None]]]] = web.AppKey("probes", dict)


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    resp = web.Response(body=generate_latest(registry))
    resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return resp


REGISTRY: web.AppKey[Any] = web.AppKey("registry", object)


def routes() -> list[web.RouteDef]:
    return [
        web.post("/api/v1/realtime/publish", publish),
        web.post("/api/v1/realtime/disconnect", disconnect),
        web.post("/api/v1/realtime/revoke", revoke),
        web.get("/api/v1/realtime/presence/{channel}", presence),
        web.get("/api/v1/realtime/history/{channel}", history),
        web.get("/api/v1/realtime/info", info),
        web.get("/api/v1/time", server_time),
        web.get("/healthz", healthz),
        web.get("/readyz", readyz),
        web.get("/metrics", metrics),
    ]
