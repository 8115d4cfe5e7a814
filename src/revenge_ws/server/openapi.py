"""The OpenAPI 3.1 document of the HTTP API, served at ``/api/v1/openapi.json``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from .. import __version__
from ..features.web import op, path_param, query_param
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
            "post": op(
                "Publish on a channel",
                security="backend",
                body="PublishBody",
                ok=position,
                errors=(400, 401, 403, 404, 413, 503),
            )
        },
        "/api/v1/realtime/disconnect": {
            "post": op("Disconnect a user on every node", security="backend", body="DisconnectBody")
        },
        "/api/v1/realtime/revoke": {
            "post": op(
                "Refuse a user's tokens issued before now; close with 4501",
                security="backend",
                body="RevokeBody",
            )
        },
        "/api/v1/realtime/presence/{channel}": {
            "get": op(
                "Who is subscribed to a channel",
                security="backend",
                params=[path_param("channel")],
                errors=(400, 401, 403, 404, 503),
            )
        },
        "/api/v1/realtime/history/{channel}": {
            "get": op(
                "A channel's history",
                security="backend",
                params=[
                    path_param("channel"),
                    query_param("since", "integer"),
                    query_param("epoch"),
                    query_param("limit", "integer"),
                ],
                errors=(400, 401, 403, 404, 503),
            )
        },
        "/api/v1/realtime/info": {
            "get": op("This node's state", security="backend", errors=(401, 403))
        },
        "/api/v1/time": {
            "get": op(
                "Server time (ms since the Unix epoch) for clock sync",
                security=None,
                ok={
                    "type": "object",
                    "properties": {"t1": {"type": "number"}, "t2": {"type": "number"}},
                },
                errors=(),
            )
        },
        "/healthz": {"get": op("Liveness", security=None, errors=())},
        "/readyz": {
            "get": op("Readiness: broker and store reachable", security=None, errors=(503,))
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
