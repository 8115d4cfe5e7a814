"""The features' HTTP toolkit: what a feature's route needs from the web side, and no more.

Request helpers (``backend_auth``, ``user_auth``, ``json_body``, ``read_body``,
``json_response``), the application key of the node, where a request's token is, and the
builders of a feature's OpenAPI operations. They sit at the features' layer so that the
features never import the server package (the adapters above them import these instead).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Protocol, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from ..auth import Claims, check_api_key
from ..codes import ErrorCode
from ..core.node import Node
from ..exceptions import AuthError, ProtocolError

__all__ = [
    "NODE",
    "BodyTimeout",
    "backend_auth",
    "extract_token",
    "json_body",
    "json_response",
    "op",
    "path_param",
    "query_param",
    "read_body",
    "user_auth",
]

M = TypeVar("M", bound=BaseModel)
NODE: web.AppKey[Node] = web.AppKey("node", Node)


class _Credentials(Protocol):
    """A request as far as its token is concerned (aiohttp's, or an upgrade websockets
    parsed): headers with a case-insensitive ``get``, the query, the cookies."""

    @property
    def headers(self) -> Any: ...

    @property
    def query(self) -> Mapping[str, str]: ...

    @property
    def cookies(self) -> Mapping[str, str]: ...


def extract_token(request: _Credentials) -> str | None:
    """The token from, in this order: ``Authorization: Bearer``, ``?token=``, cookie."""
    header = request.headers.get("Authorization", "") or ""
    if header[:7].lower() == "bearer ":
        return str(header[7:].strip())
    return request.query.get("token") or request.cookies.get("auth_token")


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


class BodyTimeout(Exception):
    """The request body did not arrive within ``server.body_timeout``."""


async def read_body(request: web.Request) -> bytes:
    """The whole request body, within ``server.body_timeout`` seconds of starting to read.

    Every body is read through here: aiohttp has no body-read timeout of its own, so an
    authenticated caller trickling its body would otherwise hold the request, and its
    socket, for as long as it likes. A whole-body deadline rather than an idle timeout,
    which one byte now and then would keep alive.
    """
    timeout = request.app[NODE].settings.server.body_timeout
    try:
        async with asyncio.timeout(timeout):
            return await request.read()
    except TimeoutError:
        raise BodyTimeout(f"the request body did not arrive within {timeout:g} s") from None


async def json_body(request: web.Request, model: type[M]) -> M:
    """Parse and validate a JSON body; INVALID_JSON / INVALID_MESSAGE / TOO_LARGE."""
    raw = await read_body(request)
    try:
        obj = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError:
        raise ProtocolError(ErrorCode.INVALID_JSON, "the body is not valid JSON") from None
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, f"{where}: {err['msg']}") from None


def user_auth(request: web.Request) -> Claims:
    """The caller's JWT claims (Bearer header, ``?token=`` or cookie)."""
    try:
        return request.app[NODE].authenticate(extract_token(request))
    except AuthError as exc:
        raise ProtocolError(ErrorCode.UNAUTHORIZED, exc.message) from None


def backend_auth(request: web.Request) -> str:
    """An API key or an admin JWT; returns who called (for logs, never the key)."""
    node = request.app[NODE]
    header = request.headers.get("Authorization", "")
    if header[:7].lower() != "bearer ":
        raise ProtocolError(ErrorCode.UNAUTHORIZED, "send Authorization: Bearer <api key or JWT>")
    cred = header[7:].strip()
    keys = [k.get_secret_value() for k in node.settings.api.keys]
    if keys and check_api_key(cred, keys):
        return "api-key"
    try:
        claims = node.authenticate(cred)
    except AuthError:
        raise ProtocolError(ErrorCode.UNAUTHORIZED, "unknown API key or invalid token") from None
    if not claims.is_admin:
        raise ProtocolError(ErrorCode.FORBIDDEN, "the backend API needs an admin token")
    return f"admin:{claims.sub}"


# -- OpenAPI operations (each feature declares its own paths) -----------------------------
def op(
    summary: str,
    *,
    security: str | None,
    body: str | None = None,
    ok: dict[str, Any] | None = None,
    errors: tuple[int, ...] = (400, 401, 403, 503),
    params: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One OpenAPI operation: ``security`` names a scheme (``backend``, ``user``), ``body``
    a model in ``components.schemas``; every error answers the contract's error body."""
    responses: dict[str, Any] = {
        "200": {
            "description": "OK",
            "content": {"application/json": {"schema": ok or {"type": "object"}}},
        }
    }
    for status in errors:
        responses[str(status)] = {"$ref": "#/components/responses/Error"}
    operation: dict[str, Any] = {"summary": summary, "responses": responses}
    if security:
        operation["security"] = [{security: []}]
    if body:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}},
        }
    if params:
        operation["parameters"] = params
    return operation


def path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def query_param(name: str, kind: str = "string") -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": {"type": kind}}
