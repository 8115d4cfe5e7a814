"""What the hub serves to browsers: the JavaScript client, the demo and the dashboard.

Every file comes from the package's ``static/`` folder through :mod:`importlib.resources`
(so it works from a wheel, a zip or an editable install):

========================== =================================================
``/client/revenge-ws.js``   the ES module client (``@revenge/ws-client``)
``/client/revenge-ws.d.ts`` its TypeScript declarations
``/demo``                   notifications, transcoding progress, watch party
``/dashboard``              live node statistics for admins
``/assets/{name}``          the pages' scripts and styles (flat names only)
========================== =================================================

Pages hold no secret and need no authentication: the demo and the dashboard ask for a
token and use the public API with it. Responses carry an ``ETag`` (``If-None-Match``
answers 304) and ``Cache-Control: no-cache``, so a new hub version is picked up at once;
HTML pages carry a strict Content-Security-Policy (scripts and styles from the hub only,
WebSocket and fetch to the hub only, media from anywhere: the watch party plays what the
room names).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

from aiohttp import web

from ..features.web import path_param

__all__ = ["PAGES", "StaticFiles", "install"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: URL path -> file name in ``static/``.
PAGES: dict[str, str] = {
    "/client/revenge-ws.js": "revenge-ws.js",
    "/client/revenge-ws.d.ts": "revenge-ws.d.ts",
    "/demo": "demo.html",
    "/dashboard": "dashboard.html",
}

_TYPES: dict[str, str] = {
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".ts": "application/typescript",
    ".css": "text/css",
    ".html": "text/html",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain",
}
_TEXT = frozenset({".js", ".mjs", ".ts", ".css", ".html", ".json", ".svg", ".txt"})
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)+$")

CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: https:",
        "media-src 'self' blob: data: https: http:",
        "connect-src 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "object-src 'none'",
    ]
)


@dataclass(frozen=True, slots=True)
class _File:
    body: bytes
    etag: str
    content_type: str
    charset: str | None


class StaticFiles:
    """The ``static/`` folder of a package, read once per file (``cache=False`` re-reads
    every time, for editing the pages while the hub runs)."""

    def __init__(self, root: Traversable | None = None, *, cache: bool = True) -> None:
        self.root = root if root is not None else resources.files("revenge_ws") / "static"
        self.cache = cache
        self._files: dict[str, _File] = {}

    def get(self, name: str) -> _File | None:
        """The file ``name`` (a flat name, no folders), or None."""
        if not _NAME.match(name):
            return None
        cached = self._files.get(name)
        if cached is not None:
            return cached
        path = self.root / name
        if not path.is_file():
            return None
        body = path.read_bytes()
        suffix = "." + name.rsplit(".", 1)[-1]
        f = _File(
            body=body,
            etag='"' + hashlib.sha256(body).hexdigest()[:32] + '"',
            content_type=_TYPES.get(suffix, "application/octet-stream"),
            charset="utf-8" if suffix in _TEXT else None,
        )
        if self.cache:
            self._files[name] = f
        return f

    def response(self, request: web.Request, name: str) -> web.Response:
        f = self.get(name)
        if f is None:
            raise web.HTTPNotFound(reason="no such file")
        headers = {
            "ETag": f.etag,
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
        }
        if f.content_type == "text/html":
            headers["Content-Security-Policy"] = CSP
            headers["Referrer-Policy"] = "no-referrer"
            headers["X-Frame-Options"] = "DENY"
        if name.endswith((".js", ".mjs")):
            # The client may be imported from pages of other origins (a media server's UI).
            headers["Access-Control-Allow-Origin"] = "*"
        if _etag_matches(request.headers.get("If-None-Match"), f.etag):
            return web.Response(status=304, headers=headers)
        return web.Response(
            body=f.body, content_type=f.content_type, charset=f.charset, headers=headers
        )


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    tags = {t.strip().removeprefix("W/") for t in header.split(",")}
    return "*" in tags or etag in tags


def install(app: web.Application, *, files: StaticFiles | None = None) -> StaticFiles:
    """Add the routes of the client, the demo, the dashboard and their assets to ``app``."""
    static = files or StaticFiles()

    def page(name: str) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            return static.response(request, name)

        return handler

    async def asset(request: web.Request) -> web.StreamResponse:
        return static.response(request, request.match_info["name"])

    async def slash(request: web.Request) -> web.StreamResponse:
        raise web.HTTPPermanentRedirect(request.path.rstrip("/"))

    for path, name in PAGES.items():
        app.router.add_get(path, page(name))
    app.router.add_get("/demo/", slash)
    app.router.add_get("/dashboard/", slash)
    app.router.add_get("/assets/{name}", asset)
    return static


def openapi_paths() -> dict[str, Any]:
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
        "/assets/{name}": static("Page assets", "application/octet-stream", [path_param("name")]),
    }
