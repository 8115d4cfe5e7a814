"""SyncPlay on the node (contract §8, §9): requests, the playback endpoint, REST, timeouts.

The pure engine (:mod:`revenge_ws.syncplay.machine`) decides; this module loads the room
from the :class:`~revenge_ws.syncplay.store.RoomStore` (memory, or Redis shared by every
node), runs the engine inside the store's atomic ``update``, and only then carries out the
effects in order: (un)subscribe connections to ``playback:{room_id}``, publish events,
send direct messages. An effect for a connection on another node travels as a control
message through the broker, so a room works across nodes and survives any one of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web

from ..auth import Claims
from ..codes import ErrorCode
from ..config import SyncplaySettings
from ..core.channels import Family
from ..core.connection import Connection
from ..core.node import Endpoint, Node, Request
from ..exceptions import BrokerUnavailable, ProtocolError, RequestError
from ..protocol import encode_message, now_ms
from ..syncplay import machine
from ..syncplay.machine import Actor, Direct, Outcome, Publish, Room, Subscribe, Unsubscribe
from ..syncplay.store import RoomStore
from .web import json_response, path_param, read_body, user_auth
from .web import op as web_op

__all__ = ["SyncPlay", "engine_settings", "install"]

log = logging.getLogger("revenge_ws.syncplay")
#: How often the node applies due timeouts (buffering, silent members, idle rooms), s.
TICK_INTERVAL = 1.0
REQUESTS = (
    "create",
    "list",
    "join",
    "leave",
    "end",
    "update",
    "invite",
    "kick",
    "transfer",
    "chat",
    "play",
    "pause",
    "seek",
    "rate",
    "set_content",
    "buffering",
    "ready",
    "ignore_wait",
    "report",
)


def engine_settings(cfg: SyncplaySettings) -> machine.Settings:
    return machine.Settings(
        sync_threshold_s=cfg.sync_threshold,
        min_lead_ms=cfg.min_lead_ms,
        buffering_timeout_first_ms=cfg.buffering_timeout_first * 1000,
        buffering_timeout_rebuffer_ms=cfg.buffering_timeout * 1000,
        idle_end_ms=cfg.idle_end_hours * 3600 * 1000,
    )


def actor_of(claims: Claims, session_id: str | None) -> Actor:
    return Actor(claims.sub, claims.display_name, session_id, claims.is_admin)


class SyncPlay:
    def __init__(self, node: Node, store: RoomStore, settings: machine.Settings) -> None:
        self.node = node
        self.store = store
        self.settings = settings
        self.ids: machine.IdSource = getattr(store, "ids", machine.SECURE_IDS)
        #: The room of each of this node's connections that is in one, by session id.
        self.rooms: dict[str, str] = {}

    # -- the one path every request takes -------------------------------------------------
    async def run(
        self, actor: Actor, mtype: str, data: dict[str, Any], conn: Connection | None = None
    ) -> dict[str, Any]:
        name = mtype.removeprefix("syncplay.")
        now = now_ms()
        if name == "list":
            rooms = await self.store.list_all()
            return machine.list_rooms(rooms, actor)
        previous = self.rooms.get(conn.session_id) if conn is not None else None
        if name == "create":
            outcome = machine.handle(
                None, name, data, actor, now, settings=self.settings, ids=self.ids
            )
            assert outcome.room is not None
            await self.store.create(outcome.room)
        else:
            room_id = data.get("room_id")
            if name == "join" and room_id is None and isinstance(data.get("invite_code"), str):
                found = await self.store.find_invite(data["invite_code"], now)
                if found is None:
                    raise RequestError(ErrorCode.NOT_FOUND, "no such invitation code")
                room_id = found.room_id
            if not isinstance(room_id, str) or not room_id:
                raise RequestError(ErrorCode.INVALID_MESSAGE, "'room_id' must be a string")

            def step(room: Room) -> Outcome:
                return machine.handle(
                    room, name, data, actor, now, settings=self.settings, ids=self.ids
                )

            outcome = await self.store.update(room_id, step)
        await self.apply(outcome)
        # A connection is in at most one room: only once the new one admitted it does it
        # leave the old one (a refused join leaves it where it was).
        if (
            name in ("create", "join")
            and conn is not None
            and outcome.room is not None
            and previous not in (None, outcome.room.room_id)
        ):
            assert previous is not None
            await self._leave(conn, actor, previous)
        if name in ("create", "join") and outcome.room is not None and outcome.room.public:
            await self._watching(actor, outcome.room)
        return outcome.reply

    async def _leave(self, conn: Connection, actor: Actor, old: str) -> None:
        """Leave ``old`` on behalf of a connection that moved to another room."""
        with contextlib.suppress(RequestError):
            outcome = await self.store.update(
                old,
                lambda r: machine.handle(
                    r, "leave", {"room_id": old}, actor, now_ms(), settings=self.settings
                ),
            )
            await self.apply(outcome)

    async def _watching(self, actor: Actor, room: Room) -> None:
        with contextlib.suppress(BrokerUnavailable):
            await self.node.publish(
                "activity",
                "activity.user_watching",
                {
                    "user_id": actor.user_id,
                    "name": actor.username,
                    "room_id": room.room_id,
                    "content": room.content,
                },
            )

    async def apply(self, outcome: Outcome) -> None:
        """Carry out the engine's effects, in order, after the room was stored."""
        published: dict[str, int] = {}
        for effect in outcome.effects:
            if isinstance(effect, Publish):
                pub = await self.node.publish(effect.channel, effect.type, effect.data)
                published[effect.channel] = pub.seq
            elif isinstance(effect, Direct):
                if effect.session_id is not None:
                    payload = encode_message(effect.type, effect.data)
                    await self.node.session_action(effect.session_id, "send", payload=payload)
            elif isinstance(effect, Subscribe):
                await self.node.session_action(
                    effect.session_id, "subscribe", channel=effect.channel
                )
            elif isinstance(effect, Unsubscribe):
                # After the publications it must still see (its own member_left, ended):
                # with Redis they come back asynchronously.
                await self.node.session_action(
                    effect.session_id,
                    "unsubscribe",
                    channel=effect.channel,
                    after_seq=published.get(effect.channel),
                )

    # -- node seams --------------------------------------------------------------------------
    async def handle_request(self, req: Request) -> dict[str, Any]:
        return await self.run(
            actor_of(req.claims, req.conn.session_id), req.envelope.type, req.data, req.conn
        )

    async def may_subscribe(self, claims: Claims, room_id: str) -> bool:
        room = await self.store.get(room_id)
        return room is not None and claims.sub in room.members

    def on_server_subscription(self, conn: Connection, channel: str, added: bool) -> None:
        """Keep :attr:`rooms` in step with the room effects applied to this node's
        connections (a connection is in at most one room: the playback channel it was
        subscribed to last)."""
        family, _, room_id = channel.partition(":")
        if family != Family.PLAYBACK.value:
            return
        if added:
            self.rooms[conn.session_id] = room_id
        elif self.rooms.get(conn.session_id) == room_id:
            del self.rooms[conn.session_id]

    async def on_disconnect(self, conn: Connection) -> None:
        room_id = self.rooms.pop(conn.session_id, None)
        if room_id is None:
            return
        with contextlib.suppress(RequestError):
            outcome = await self.store.update(
                room_id,
                lambda r: machine.disconnect(
                    r, conn.user_id, conn.session_id, now_ms(), settings=self.settings
                ),
            )
            await self.apply(outcome)

    async def admission(self, claims: Claims, room_id: str, query: dict[str, str]) -> None:
        """Refuse a playback-endpoint handshake that could not join (dry run on a copy)."""
        room = await self.store.get(room_id)
        if room is None:
            raise RequestError(ErrorCode.NOT_FOUND, "no such room")
        if claims.sub in room.members:
            return
        machine.handle(
            room,
            "join",
            _join_data(room_id, query),
            actor_of(claims, None),
            now_ms(),
            settings=self.settings,
            ids=self.ids,
        )

    async def join_on_connect(self, conn: Connection, room_id: str, query: dict[str, str]) -> None:
        actor = actor_of(conn.claims, conn.session_id)
        try:
            reply = await self.run(actor, "join", _join_data(room_id, query), conn)
        except ProtocolError as exc:
            conn.send(encode_message("error", exc.to_data()))
            return
        conn.send(encode_message("syncplay.joined", reply))

    async def tick_forever(self) -> None:
        while True:
            await asyncio.sleep(TICK_INTERVAL)
            try:
                await self.tick_once()
            except BrokerUnavailable as exc:
                log.warning("syncplay timeouts skipped: %s", exc)

    async def tick_once(self) -> None:
        """Apply the timeouts of the rooms that are due. The store's deadline index names
        them, so an idle second loads no room at all; several nodes ticking one room is
        harmless (``tick`` is idempotent and the store's compare-and-set lets one commit)."""
        now = now_ms()
        for room_id in await self.store.due(now):
            with contextlib.suppress(RequestError):
                outcome = await self.store.update(
                    room_id, lambda r: machine.tick(r, now, settings=self.settings)
                )
                await self.apply(outcome)

    # -- REST ----------------------------------------------------------------------------------
    def _rest(
        self,
        mtype: str,
        *,
        body: bool = False,
        extra: Callable[[web.Request], dict[str, Any]] | None = None,
    ) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.Response:
            claims = user_auth(request)
            data: dict[str, Any] = {}
            if body and request.can_read_body:
                import orjson

                try:
                    loaded = orjson.loads(await read_body(request))
                except orjson.JSONDecodeError:
                    raise ProtocolError(
                        ErrorCode.INVALID_JSON, "the body is not valid JSON"
                    ) from None
                if not isinstance(loaded, dict):
                    raise ProtocolError(ErrorCode.INVALID_MESSAGE, "the body must be an object")
                data.update(loaded)
            if "room_id" in request.match_info:
                data["room_id"] = request.match_info["room_id"]
            if extra is not None:
                data.update(extra(request))
            return json_response(await self.run(actor_of(claims, None), mtype, data))

        return handler

    async def rest_room(self, request: web.Request) -> web.Response:
        claims = user_auth(request)
        room = await self._visible(claims, request.match_info["room_id"])
        return json_response(
            {
                "room": room.view(),
                "state": room.state_view(self.settings),
                "members": room.members_view(),
            }
        )

    async def rest_participants(self, request: web.Request) -> web.Response:
        claims = user_auth(request)
        room = await self._visible(claims, request.match_info["room_id"])
        return json_response({"room_id": room.room_id, "members": room.members_view()})

    async def rest_chat(self, request: web.Request) -> web.Response:
        claims = user_auth(request)
        room = await self._visible(claims, request.match_info["room_id"])
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            raise RequestError(ErrorCode.INVALID_MESSAGE, "limit must be an integer") from None
        return json_response(machine.chat_history(room, actor_of(claims, None), limit=limit))

    async def rest_invitation(self, request: web.Request) -> web.Response:
        user_auth(request)
        room = await self.store.find_invite(request.match_info["code"], now_ms())
        if room is None:
            raise RequestError(ErrorCode.NOT_FOUND, "no such invitation code")
        return json_response({"room": room.view()})

    async def _visible(self, claims: Claims, room_id: str) -> Room:
        room = await self.store.get(room_id)
        if room is None or not (room.public or claims.is_admin or claims.sub in room.members):
            raise RequestError(ErrorCode.NOT_FOUND, "no such room")
        return room


def _join_data(room_id: str, query: dict[str, str]) -> dict[str, Any]:
    data: dict[str, Any] = {"room_id": room_id}
    if query.get("invite"):
        data["invite_code"] = query["invite"]
    if query.get("password"):
        data["password"] = query["password"]
    return data


def install(node: Node, app: web.Application, store: RoomStore) -> SyncPlay:
    feature = SyncPlay(node, store, engine_settings(node.settings.syncplay))
    for name in REQUESTS:
        node.register(f"syncplay.{name}", feature.handle_request)
    node.policy.set_checker(Family.PLAYBACK, feature.may_subscribe)
    node.on_disconnect.append(feature.on_disconnect)
    node.endpoints["playback"] = Endpoint(feature.admission, feature.join_on_connect)
    node.on_server_subscription.append(feature.on_server_subscription)
    base = "/api/v1/syncplay"
    r = app.router
    r.add_get(f"{base}/rooms", feature._rest("list"))
    r.add_post(f"{base}/rooms", feature._rest("create", body=True))
    r.add_get(f"{base}/rooms/{{room_id}}", feature.rest_room)
    r.add_put(f"{base}/rooms/{{room_id}}", feature._rest("update", body=True))
    r.add_delete(f"{base}/rooms/{{room_id}}", feature._rest("end"))
    r.add_post(f"{base}/rooms/{{room_id}}/join", feature._rest("join", body=True))
    r.add_post(f"{base}/rooms/{{room_id}}/leave", feature._rest("leave"))
    r.add_get(f"{base}/rooms/{{room_id}}/participants", feature.rest_participants)
    r.add_get(f"{base}/rooms/{{room_id}}/chat", feature.rest_chat)
    r.add_post(f"{base}/rooms/{{room_id}}/chat", feature._rest("chat", body=True))
    r.add_post(f"{base}/rooms/{{room_id}}/invitations", feature._rest("invite", body=True))
    r.add_get(f"{base}/invitations/{{code}}", feature.rest_invitation)
    return feature


def openapi_paths() -> dict[str, Any]:
    """SyncPlay REST (contract §9): user JWT; bodies are the WebSocket requests' data."""
    base = "/api/v1/syncplay"
    room = [path_param("room_id")]
    errors = (400, 401, 403, 404, 409, 503)
    obj = {"type": "object"}

    def op(
        summary: str, params: list[dict[str, Any]] | None = None, body: bool = False
    ) -> dict[str, Any]:
        o = web_op(summary, security="user", params=params, errors=errors)
        if body:
            o["requestBody"] = {"required": False, "content": {"application/json": {"schema": obj}}}
        return o

    return {
        f"{base}/rooms": {
            "get": op("Rooms the caller may see"),
            "post": op("Create a room (data of syncplay.create)", body=True),
        },
        f"{base}/rooms/{{room_id}}": {
            "get": op("A room, its state and members", room),
            "put": op("Change a room's settings (leader)", room, body=True),
            "delete": op("End a room (leader or admin)", room),
        },
        f"{base}/rooms/{{room_id}}/join": {
            "post": op("Join (password or invite_code)", room, body=True)
        },
        f"{base}/rooms/{{room_id}}/leave": {"post": op("Leave", room)},
        f"{base}/rooms/{{room_id}}/participants": {"get": op("Members", room)},
        f"{base}/rooms/{{room_id}}/chat": {
            "get": op("Chat history", room),
            "post": op("Send a chat message", room, body=True),
        },
        f"{base}/rooms/{{room_id}}/invitations": {
            "post": op("Create an invitation code", room, body=True)
        },
        f"{base}/invitations/{{code}}": {
            "get": op("The room an invitation code admits to", [path_param("code")])
        },
    }
