"""Library and user-data updates, coalesced so a scan of 10,000 items is not 10,000 pushes.

* ``POST /api/v1/realtime/library/{library_id}/events`` ``{events: [{kind, item_id}]}``:
  item added/updated/removed events of one library are merged for
  ``channels.library_coalesce_window`` seconds (default 2 s; Jellyfin batches over 30 s,
  which users see as lag) into ONE ``library.changed`` ``{library_id, added, updated,
  removed}`` on ``library:{id}``. An item added and removed in one window is not reported;
  one added then updated is reported as added; updated then removed as removed.
* ``POST /api/v1/realtime/user/{user_id}/data_changed`` ``{item_ids}``: debounced per user
  (``channels.user_data_debounce``, default 0.5 s) into one ``user.data_changed`` on
  ``user:{id}``.
* Scan progress, server events and session events need no merging: the backend publishes
  them with ``POST /api/v1/realtime/publish`` on ``server`` (admins) or ``user:{id}``.

Batches live in this node's memory until their window ends; a node that dies inside a
window loses that batch (at most one window of updates; clients reload on reconnect).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from ..core.channels import parse_channel
from ..core.node import Node
from ..exceptions import BrokerUnavailable
from .web import backend_auth, json_body, json_response, op, path_param

__all__ = ["Coalescer", "install"]

log = logging.getLogger("revenge_ws.library")
#: Items one batch may hold before it is flushed early (bounded memory).
MAX_BATCH = 10_000


class LibraryEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["added", "updated", "removed"]
    item_id: str = Field(min_length=1, max_length=128)


class LibraryEventsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[LibraryEvent] = Field(min_length=1, max_length=MAX_BATCH)


class DataChangedBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item_ids: list[str] = Field(default_factory=list, max_length=MAX_BATCH)


class _Batch:
    __slots__ = ("added", "removed", "updated")

    def __init__(self) -> None:
        self.added: dict[str, None] = {}
        self.updated: dict[str, None] = {}
        self.removed: dict[str, None] = {}

    def add(self, kind: str, item: str) -> None:
        if kind == "added":
            self.removed.pop(item, None)
            self.updated.pop(item, None)
            self.added[item] = None
        elif kind == "updated":
            if item not in self.added and item not in self.removed:
                self.updated[item] = None
        elif item in self.added:
            del self.added[item]  # added and removed in one window: nothing happened
        else:
            self.updated.pop(item, None)
            self.removed[item] = None

    def __len__(self) -> int:
        return len(self.added) + len(self.updated) + len(self.removed)


class Coalescer:
    """Merges events per key for a window, then publishes one message per key."""

    def __init__(self, node: Node, window: float) -> None:
        self.node = node
        self.window = window
        self._batches: dict[str, _Batch] = {}

    def add(self, library_id: str, events: list[tuple[str, str]]) -> None:
        batch = self._batches.get(library_id)
        first = batch is None
        if batch is None:
            batch = self._batches[library_id] = _Batch()
        for kind, item in events:
            batch.add(kind, item)
        if len(batch) >= MAX_BATCH:
            self.node.spawn(self.flush(library_id), name=f"library-{library_id}")
        elif first:
            self.node.spawn(self._flush_later(library_id), name=f"library-{library_id}")

    async def _flush_later(self, library_id: str) -> None:
        await asyncio.sleep(self.window)
        await self.flush(library_id)

    async def flush_all(self) -> None:
        """Shutdown: publish every open batch now rather than lose it."""
        for library_id in list(self._batches):
            await self.flush(library_id)

    async def flush(self, library_id: str) -> None:
        batch = self._batches.pop(library_id, None)
        if not batch:
            return
        data = {
            "library_id": library_id,
            "added": list(batch.added),
            "updated": list(batch.updated),
            "removed": list(batch.removed),
        }
        try:
            await self.node.publish(f"library:{library_id}", "library.changed", data)
        except BrokerUnavailable as exc:
            log.warning("library.changed for %s lost: %s", library_id, exc)


class Debouncer:
    """``user.data_changed`` at most once per window per user, with the union of items."""

    def __init__(self, node: Node, window: float) -> None:
        self.node = node
        self.window = window
        self._pending: dict[str, dict[str, None]] = {}

    def add(self, user_id: str, items: list[str]) -> None:
        first = user_id not in self._pending
        bucket = self._pending.setdefault(user_id, {})
        for item in items:
            if len(bucket) < MAX_BATCH:
                bucket[item] = None
        if first:
            self.node.spawn(self._flush_later(user_id), name=f"user-data-{user_id}")

    async def _flush_later(self, user_id: str) -> None:
        await asyncio.sleep(self.window)
        await self.flush(user_id)

    async def flush_all(self) -> None:
        for user_id in list(self._pending):
            await self.flush(user_id)

    async def flush(self, user_id: str) -> None:
        if user_id not in self._pending:
            return
        items = self._pending.pop(user_id)
        try:
            await self.node.publish(
                f"user:{user_id}",
                "user.data_changed",
                {"user_id": user_id, "item_ids": list(items)},
            )
        except BrokerUnavailable as exc:
            log.warning("user.data_changed for %s lost: %s", user_id, exc)


def install(node: Node, app: web.Application) -> tuple[Coalescer, Debouncer]:
    settings = node.settings.channels
    library = Coalescer(node, settings.library_coalesce_window)
    users = Debouncer(node, settings.user_data_debounce)

    async def library_events(request: web.Request) -> web.Response:
        backend_auth(request)
        library_id = request.match_info["library_id"]
        parse_channel(f"library:{library_id}")
        body = await json_body(request, LibraryEventsBody)
        library.add(library_id, [(e.kind, e.item_id) for e in body.events])
        return json_response({"library_id": library_id, "accepted": len(body.events)})

    async def data_changed(request: web.Request) -> web.Response:
        backend_auth(request)
        user_id = request.match_info["user_id"]
        parse_channel(f"user:{user_id}")
        body = await json_body(request, DataChangedBody)
        users.add(user_id, body.item_ids)
        return json_response({"user_id": user_id, "accepted": len(body.item_ids)})

    node.on_stop.append(library.flush_all)
    node.on_stop.append(users.flush_all)
    app.router.add_post("/api/v1/realtime/library/{library_id}/events", library_events)
    app.router.add_post("/api/v1/realtime/user/{user_id}/data_changed", data_changed)
    return library, users


def openapi_paths() -> dict[str, Any]:
    """This feature's HTTP routes, for ``/api/v1/openapi.json``."""
    return {
        "/api/v1/realtime/library/{library_id}/events": {
            "post": op(
                "Library item events, coalesced into library.changed",
                security="backend",
                body="LibraryEventsBody",
                params=[path_param("library_id")],
            )
        },
        "/api/v1/realtime/user/{user_id}/data_changed": {
            "post": op(
                "A user's data changed (debounced user.data_changed)",
                security="backend",
                body="DataChangedBody",
                params=[path_param("user_id")],
            )
        },
    }


#: The request bodies :func:`openapi_paths` names.
OPENAPI_MODELS: dict[str, type[BaseModel]] = {
    "LibraryEventsBody": LibraryEventsBody,
    "DataChangedBody": DataChangedBody,
}
