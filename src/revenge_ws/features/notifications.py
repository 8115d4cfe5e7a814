"""Notifications (contract §5): stored durably first, pushed, redelivered until acked.

Order of operations for ``POST /api/v1/realtime/notify``: the store commits, then the
notification is published on ``notifications:{user_id}`` (every node, every connection).
A store failure refuses the call (503, nothing accepted); a broker failure after the
commit loses nothing either: the notification is redelivered on the next (re)connect.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Annotated, Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..codes import ErrorCode
from ..core.batch import Coalescer
from ..core.connection import Connection
from ..core.node import Node, Request
from ..exceptions import BrokerUnavailable, RequestError, StoreUnavailable
from ..protocol import encode
from ..store.base import Notification, NotificationStore
from .web import backend_auth, json_body, json_response, op, path_param, query_param, user_auth

__all__ = ["NotifyBody", "install"]

log = logging.getLogger("revenge_ws.notifications")
PRIORITIES = ("critical", "high", "normal", "low")
#: Redelivered after a (re)connect, oldest first; the rest follow once these are acked.
REDELIVER_LIMIT = 100
#: The re-send waits this long for other connections' (s): after a restart the store is
#: asked once per batch of reconnecting users, not once per user.
REDELIVER_GATHER = 0.02


UserId = Annotated[str, Field(min_length=1, max_length=128)]
NotificationType = Annotated[str, Field(min_length=1, max_length=64)]


class NotifyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: str | None = Field(None, min_length=1, max_length=128)
    user_ids: list[UserId] | None = Field(None, min_length=1, max_length=10_000)
    notification_type: NotificationType
    title: str = Field(min_length=1, max_length=500)
    body: str | None = Field(None, max_length=5000)
    priority: str = Field("normal", pattern="^(critical|high|normal|low)$")
    content_id: str | None = Field(None, max_length=128)
    icon_url: str | None = Field(None, max_length=2048)
    action_url: str | None = Field(None, max_length=2048)
    dedupe_key: str | None = Field(None, max_length=128)

    @model_validator(mode="after")
    def _one_target(self) -> NotifyBody:
        if (self.user_id is None) == (self.user_ids is None):
            raise ValueError("give exactly one of user_id and user_ids")
        return self

    def targets(self) -> list[str]:
        return [self.user_id] if self.user_id is not None else list(self.user_ids or [])


class PreferencesBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    preferences: dict[NotificationType, bool | None] = Field(max_length=1000)


def _ids(data: dict[str, Any]) -> list[str]:
    ids = data.get("ids")
    if (
        not isinstance(ids, list)
        or not ids
        or len(ids) > 1000
        or not all(isinstance(i, str) and 0 < len(i) <= 64 for i in ids)
    ):
        raise RequestError(ErrorCode.INVALID_MESSAGE, "'ids' must be a list of 1-1000 ids")
    return ids


#: Muted-type lists are cached this long (s): a burst to 1,000 users must not cost 1,000
#: preference queries. A change made through this node applies at once; through another
#: node, within this time.
PREFS_TTL = 10.0
PREFS_CACHE_MAX = 100_000


class Notifications:
    def __init__(self, node: Node, store: NotificationStore) -> None:
        self.node = node
        self.store = store
        self._muted_cache: dict[str, tuple[float, list[str]]] = {}
        #: The redelivery reads of connections opened together share one store query.
        self._pending: Coalescer[str, list[Notification]] = Coalescer(
            self._pending_many, gather=REDELIVER_GATHER
        )

    async def _muted(self, user_id: str) -> list[str]:
        now = time.monotonic()
        hit = self._muted_cache.get(user_id)
        if hit is not None and now - hit[0] < PREFS_TTL:
            return hit[1]
        prefs = await self.store.get_preferences(user_id)
        muted = [t for t, pushed in prefs.items() if not pushed]
        if len(self._muted_cache) >= PREFS_CACHE_MAX:
            self._muted_cache.clear()
        self._muted_cache[user_id] = (now, muted)
        return muted

    # -- delivery ----------------------------------------------------------------------
    async def notify(self, body: NotifyBody) -> dict[str, Any]:
        created = await self.store.create_many(
            body.targets(),
            notification_type=body.notification_type,
            title=body.title,
            body=body.body,
            priority=body.priority,
            content_id=body.content_id,
            icon_url=body.icon_url,
            action_url=body.action_url,
            dedupe_key=body.dedupe_key,
        )
        pushed = 0
        for note, is_new in created:
            if not is_new:
                continue  # a duplicate within the window was already pushed
            if body.notification_type in await self._muted(note.user_id):
                continue
            try:
                await self.node.publish(
                    f"notifications:{note.user_id}", "notification", note.to_wire()
                )
                pushed += 1
            except BrokerUnavailable as exc:
                # Stored: the next (re)connect redelivers it.
                log.warning("notification %s stored, push deferred: %s", note.id, exc)
        return {
            "ids": [n.id for n, _ in created],
            "created": [n.id for n, new in created if new],
            "pushed": pushed,
        }

    async def redeliver(self, conn: Connection) -> None:
        """After every (re)connect: what the user has not acknowledged yet."""
        pending = await self._pending.get(conn.user_id)
        channel = f"notifications:{conn.user_id}"
        for note in pending:
            conn.send(_direct(channel, note))

    async def _pending_many(self, user_ids: Sequence[str]) -> dict[str, list[Notification]]:
        return await self.store.pending_many(user_ids, REDELIVER_LIMIT)

    # -- requests ------------------------------------------------------------------------
    async def ack(self, req: Request) -> dict[str, Any]:
        ids = _ids(req.data)
        done = await self.store.ack(req.claims.sub, ids)
        _refuse_unknown(ids, done)
        return {"ids": done}

    async def read(self, req: Request) -> dict[str, Any]:
        ids = _ids(req.data)
        done = await self.store.mark_read(req.claims.sub, ids)
        _refuse_unknown(ids, done)
        return {"ids": done}

    async def read_all(self, req: Request) -> dict[str, Any]:
        return {"count": await self.store.read_all(req.claims.sub)}

    async def list(self, req: Request) -> dict[str, Any]:
        d = req.data
        unread = d.get("unread_only", False)
        limit = d.get("limit", 50)
        before = d.get("before")
        if not isinstance(unread, bool) or not isinstance(limit, int) or isinstance(limit, bool):
            raise RequestError(ErrorCode.INVALID_MESSAGE, "unread_only is a bool, limit an int")
        if before is not None and not isinstance(before, str):
            raise RequestError(ErrorCode.INVALID_MESSAGE, "'before' must be an id or a time")
        items, unread_count = await self.store.list_notifications(
            req.claims.sub, unread, limit, before
        )
        return {"items": [n.to_wire() for n in items], "unread_count": unread_count}

    async def preferences(self, req: Request) -> dict[str, Any]:
        prefs = req.data.get("preferences")
        if prefs is not None:
            if (
                not isinstance(prefs, dict)
                or len(prefs) > 1000
                or not all(
                    isinstance(k, str) and 0 < len(k) <= 64 and (v is None or isinstance(v, bool))
                    for k, v in prefs.items()
                )
            ):
                raise RequestError(
                    ErrorCode.INVALID_MESSAGE, "'preferences' maps types to true/false/null"
                )
            await self.store.set_preferences(req.claims.sub, prefs)
            self._muted_cache.pop(req.claims.sub, None)
        return {"preferences": await self.store.get_preferences(req.claims.sub)}

    # -- HTTP ----------------------------------------------------------------------------
    async def http_notify(self, request: web.Request) -> web.Response:
        backend_auth(request)
        body = await json_body(request, NotifyBody)
        return json_response(await self.notify(body))

    async def http_list(self, request: web.Request) -> web.Response:
        claims = user_auth(request)
        q = request.query
        try:
            limit = int(q.get("limit", "50"))
        except ValueError:
            raise RequestError(ErrorCode.INVALID_MESSAGE, "limit must be an integer") from None
        unread = q.get("unread", "false").lower() in ("1", "true", "yes")
        items, unread_count = await self.store.list_notifications(
            claims.sub, unread, limit, q.get("before")
        )
        return json_response({"items": [n.to_wire() for n in items], "unread_count": unread_count})

    async def http_read(self, request: web.Request) -> web.Response:
        claims = user_auth(request)
        nid = request.match_info["id"]
        if not await self.store.mark_read(claims.sub, [nid]):
            raise RequestError(ErrorCode.NOT_FOUND, "no such notification")
        note = await self.store.get(claims.sub, nid)
        return json_response(note.to_wire() if note else {"id": nid})

    async def http_read_all(self, request: web.Request) -> web.Response:
        claims = user_auth(request)
        return json_response({"count": await self.store.read_all(claims.sub)})

    async def http_preferences(self, request: web.Request) -> web.Response:
        claims = user_auth(request)
        if request.method == "PUT":
            body = await json_body(request, PreferencesBody)
            await self.store.set_preferences(claims.sub, body.preferences)
            self._muted_cache.pop(claims.sub, None)
        return json_response({"preferences": await self.store.get_preferences(claims.sub)})

    async def cleanup_forever(self, interval: float) -> None:
        while True:
            try:
                removed = await self.store.cleanup()
                if removed:
                    log.info("retention removed %d notifications", removed)
            except StoreUnavailable as exc:
                log.warning("notification cleanup skipped: %s", exc)
            await asyncio.sleep(interval)


def _direct(channel: str, note: Notification) -> bytes:
    # A redelivery is a direct message: the channel says whose, no seq (contract §2).
    return encode({"type": "notification", "channel": channel, "data": note.to_wire()})


def _refuse_unknown(ids: list[str], done: list[str]) -> None:
    unknown = [i for i in ids if i not in set(done)]
    if unknown:
        raise RequestError(ErrorCode.NOT_FOUND, f"no such notification: {', '.join(unknown[:10])}")


def install(node: Node, app: web.Application, store: NotificationStore) -> Notifications:
    feature = Notifications(node, store)
    node.register("notification.ack", feature.ack)
    node.register("notification.read", feature.read)
    node.register("notification.read_all", feature.read_all)
    node.register("notification.list", feature.list)
    node.register("notification.preferences", feature.preferences)
    node.on_connect.append(feature.redeliver)
    app.router.add_post("/api/v1/realtime/notify", feature.http_notify)
    app.router.add_get("/api/v1/notifications", feature.http_list)
    app.router.add_patch("/api/v1/notifications/{id}/read", feature.http_read)
    app.router.add_post("/api/v1/notifications/read-all", feature.http_read_all)
    app.router.add_get("/api/v1/notifications/preferences", feature.http_preferences)
    app.router.add_put("/api/v1/notifications/preferences", feature.http_preferences)
    return feature


def openapi_paths() -> dict[str, Any]:
    """This feature's HTTP routes, for ``/api/v1/openapi.json``."""
    listing = {
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"type": "object"}},
            "unread_count": {"type": "integer"},
        },
    }
    return {
        "/api/v1/realtime/notify": {
            "post": op(
                "Store and push a notification to one or more users",
                security="backend",
                body="NotifyBody",
                ok={
                    "type": "object",
                    "properties": {
                        "ids": {"type": "array", "items": {"type": "string"}},
                        "created": {"type": "array", "items": {"type": "string"}},
                        "pushed": {"type": "integer"},
                    },
                },
            )
        },
        "/api/v1/notifications": {
            "get": op(
                "The caller's notifications, newest first",
                security="user",
                ok=listing,
                params=[
                    query_param("unread", "boolean"),
                    query_param("limit", "integer"),
                    query_param("before"),
                ],
                errors=(400, 401, 404, 503),
            )
        },
        "/api/v1/notifications/{id}/read": {
            "patch": op(
                "Mark one notification read",
                security="user",
                params=[path_param("id")],
                errors=(401, 404, 503),
            )
        },
        "/api/v1/notifications/read-all": {
            "post": op("Mark every notification read", security="user", errors=(401, 503))
        },
        "/api/v1/notifications/preferences": {
            "get": op("Which types are pushed in-app", security="user", errors=(401, 503)),
            "put": op(
                "Set which types are pushed in-app",
                security="user",
                body="PreferencesBody",
                errors=(400, 401, 503),
            ),
        },
    }


#: The request bodies :func:`openapi_paths` names.
OPENAPI_MODELS: dict[str, type[BaseModel]] = {
    "NotifyBody": NotifyBody,
    "PreferencesBody": PreferencesBody,
}
