"""The OpenAPI 3.1 document of the HTTP API, served at ``/api/v1/openapi.json``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from .. import __version__
from .errors import STATUS

__all__ = ["openapi_document"]

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "enum": sorted(c.value for c in STATUS)},
                "message": {"type": "string"},
            },
        }
    },
}


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema(ref_template="#/components/schemas/{model}")


def _op(
    summary: str,
    *,
    security: str | None,
    body: str | None = None,
    ok: dict[str, Any] | None = None,
    errors: tuple[int, ...] = (400, 401, 403, 503),
    params: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    responses: dict[str, Any] = {
        "200": {
            "description": "OK",
            "content": {"application/json": {"schema": ok or {"type": "object"}}},
        }
    }
    for status in errors:
        responses[str(status)] = {"$ref": "#/components/responses/Error"}
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if security:
        op["security"] = [{security: []}]
    if body:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}},
        }
    if params:
        op["parameters"] = params
    return op


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _query(name: str, kind: str = "string") -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": {"type": kind}}


def openapi_document(
    models: dict[str, type[BaseModel]], extra_paths: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Build the document; features add their paths through ``extra_paths``."""
    schemas: dict[str, Any] = {"Error": _ERROR}
    for name, model in models.items():
        schema = _schema(model)
        schemas.update(schema.pop("$defs", {}))
        schemas[name] = schema
    position = {
        "type": "object",
        "required": ["channel", "seq", "epoch"],
        "properties": {
            "channel": {"type": "string"},
            "seq": {"type": "integer"},
            "epoch": {"type": "string"},
        },
    }
    paths: dict[str, Any] = {
        "/api/v1/realtime/publish": {
            "post": _op(
                "Publish on a channel",
                security="backend",
                body="PublishBody",
                ok=position,
                errors=(400, 401, 403, 404, 413, 503),
            )
        },
        "/api/v1/realtime/disconnect": {
            "post": _op(
                "Disconnect a user on every node", security="backend", body="DisconnectBody"
            )
        },
        "/api/v1/realtime/revoke": {
            "post": _op(
                "Refuse a user's tokens issued before now; close with 4501",
                security="backend",
                body="RevokeBody",
            )
        },
        "/api/v1/realtime/presence/{channel}": {
            "get": _op(
                "Who is subscribed to a channel",
                security="backend",
                params=[_path_param("channel")],
                errors=(400, 401, 403, 404, 503),
            )
        },
        "/api/v1/realtime/history/{channel}": {
            "get": _op(
                "A channel's history",
                security="backend",
                params=[
                    _path_param("channel"),
                    _query("since", "integer"),
                    _query("epoch"),
                    _query("limit", "integer"),
                ],
                errors=(400, 401, 403, 404, 503),
            )
        },
        "/api/v1/realtime/info": {
            "get": _op("This node's state", security="backend", errors=(401, 403))
        },
        "/api/v1/time": {
            "get": _op(
                "Server time (ms since the Unix epoch) for clock sync",
                security=None,
                ok={
                    "type": "object",
                    "properties": {"t1": {"type": "number"}, "t2": {"type": "number"}},
                },
                errors=(),
            )
        },
        "/healthz": {"get": _op("Liveness", security=None, errors=())},
        "/readyz": {
            "get": _op("Readiness: broker and store reachable", security=None, errors=(503,))
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    }
    paths.update(extra_paths or {})
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "revenge-ws HTTP API",
            "version": __version__,
            "description": "Backend publishing, operations and user endpoints of the hub "
            "(wire contract revenge.v1, §9).",
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": {
                "Error": {
                    "description": "Refused",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                    },
                }
            },
            "securitySchemes": {
                "backend": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key (REVENGE_API_KEYS) or an admin JWT",
                },
                "user": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
            },
        },
    }


def feature_paths() -> dict[str, Any]:
    """Paths of the live-channel features (notifications, transcode, library, user)."""
    listing = {
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"type": "object"}},
            "unread_count": {"type": "integer"},
        },
    }
    return {
        "/api/v1/realtime/notify": {
            "post": _op(
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
        "/api/v1/realtime/transcode/{job_id}": {
            "post": _op(
                "A transcoding job's event (progress, complete, error)",
                security="backend",
                body="TranscodeBody",
                params=[_path_param("job_id")],
                errors=(400, 401, 403, 409, 503),
            )
        },
        "/api/v1/realtime/library/{library_id}/events": {
            "post": _op(
                "Library item events, coalesced into library.changed",
                security="backend",
                body="LibraryEventsBody",
                params=[_path_param("library_id")],
            )
        },
        "/api/v1/realtime/user/{user_id}/data_changed": {
            "post": _op(
                "A user's data changed (debounced user.data_changed)",
                security="backend",
                body="DataChangedBody",
                params=[_path_param("user_id")],
            )
        },
        "/api/v1/notifications": {
            "get": _op(
                "The caller's notifications, newest first",
                security="user",
                ok=listing,
                params=[_query("unread", "boolean"), _query("limit", "integer"), _query("before")],
                errors=(400, 401, 404, 503),
            )
        },
        "/api/v1/notifications/{id}/read": {
            "patch": _op(
                "Mark one notification read",
                security="user",
                params=[_path_param("id")],
                errors=(401, 404, 503),
            )
        },
        "/api/v1/notifications/read-all": {
            "post": _op("Mark every notification read", security="user", errors=(401, 503))
        },
        "/api/v1/notifications/preferences": {
            "get": _op("Which types are pushed in-app", security="user", errors=(401, 503)),
            "put": _op(
                "Set which types are pushed in-app",
                security="user",
                body="PreferencesBody",
                errors=(400, 401, 503),
            ),
        },
    }


def syncplay_paths() -> dict[str, Any]:
    """SyncPlay REST (contract §9): user JWT; bodies are the WebSocket requests' data."""
    base = "/api/v1/syncplay"
    room = [_path_param("room_id")]
    errors = (400, 401, 403, 404, 409, 503)
    obj = {"type": "object"}

    def op(
        summary: str, params: list[dict[str, Any]] | None = None, body: bool = False
    ) -> dict[str, Any]:
        o = _op(summary, security="user", params=params, errors=errors)
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
            "get": op("The room an invitation code admits to", [_path_param("code")])
        },
    }


def pages_paths() -> dict[str, Any]:
    """The pages and the JS client the hub serves (``server.static``)."""

    def static(
        summary: str, media: str, params: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        op: dict[str, Any] = {
            "summary": summary,
            "responses": {
                "200": {"description": "OK", "content": {media: {"schema": {"type": "string"}}}},
                "304": {"description": "Not modified (ETag)"},
            },
        }
        if params:
            op["parameters"] = params
            op["responses"]["404"] = {"$ref": "#/components/responses/Error"}
        return {"get": op}

    return {
        "/client/revenge-ws.js": static("The JavaScript client (ES module)", "text/javascript"),
        "/client/revenge-ws.d.ts": static("Its TypeScript types", "application/typescript"),
        "/demo": static("Demo page: notifications, transcodes, watch party", "text/html"),
        "/demo/": static("Redirects to /demo", "text/html"),
        "/dashboard": static("Live dashboard for admins", "text/html"),
        "/dashboard/": static("Redirects to /dashboard", "text/html"),
        "/assets/{name}": static("Page assets", "application/octet-stream", [_path_param("name")]),
    }
