"""The one place that wires everything: settings → broker, store, node, features, HTTP.

Dependencies point one way: protocol ← core ← broker/store/features ← server ← app/CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from . import __version__
from .broker import Broker, open_broker
from .config import Settings
from .core.node import Node
from .features.activity import install as install_activity
from .features.library import DataChangedBody, LibraryEventsBody
from .features.library import install as install_library
from .features.notifications import NotifyBody, PreferencesBody
from .features.notifications import install as install_notifications
from .features.syncplay import install as install_syncplay
from .features.transcode import TranscodeBody
from .features.transcode import install as install_transcode
from .server.direct import Engine
from .server.http import (
    PROBES,
    REGISTRY,
    DisconnectBody,
    PublishBody,
    RevokeBody,
    error_middleware,
    routes,
)
from .server.logs import AccessLogger, configure_logging
from .server.metrics import PrometheusObserver
from .server.openapi import feature_paths, openapi_document, pages_paths, syncplay_paths
from .server.pages import install as install_pages
from .server.ws import NODE, websocket_handler
from .store import NotificationStore, open_store
from .syncplay.store import MemoryRoomStore, RoomStore

__all__ = ["build_app", "run", "serve"]

log = logging.getLogger("revenge_ws.app")
OPENAPI: web.AppKey[dict[str, Any]] = web.AppKey("openapi", dict)
STORE: web.AppKey[NotificationStore] = web.AppKey("store", object)  # type: ignore[arg-type]
#: An idle keep-alive HTTP connection, or one whose next request dribbles in, is closed
#: this long after its last response (aiohttp's default is 3,630 s; the handshake deadline
#: only covers a socket's first request).
KEEPALIVE_TIMEOUT = 75.0


@web.middleware
def _mark_seen(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> Awaitable[web.StreamResponse]:
    # The handshake timeout only concerns sockets that never completed a request.
    # Not a coroutine: nothing to do afterwards, so no frame kept for a socket's life.
    transport = request.transport
    if transport is not None:
        guard = transport.get_protocol()
        if isinstance(guard, _FirstRequestDeadline):
            guard.request_seen()
    return handler(request)


def open_room_store(settings: Settings, node: Node) -> RoomStore:
    """SyncPlay rooms live in the broker: in memory for one node, in Redis for many."""
    if settings.broker.url.startswith("memory:"):
        # isolate=False: one process, no copies per request (the engine never mutates a
        # room before refusing a request, so a refused request leaves it untouched).
        return MemoryRoomStore(max_rooms=settings.syncplay.max_rooms, isolate=False)
    from .syncplay.redis_store import RedisRoomStore

    store: RoomStore = RedisRoomStore.for_broker(node.broker, max_rooms=settings.syncplay.max_rooms)
    return store


def build_app(settings: Settings, *, broker: Broker | None = None) -> web.Application:
    """Build the aiohttp application for ``settings`` (nothing is started yet)."""
    observer = PrometheusObserver()
    node = Node(settings, broker or open_broker(settings), observer=observer)
    app = web.Application(
        middlewares=[_mark_seen, error_middleware],
        client_max_size=max(1024 * 1024, settings.limits.message_size * 2),
    )
    app[NODE] = node
    app[REGISTRY] = observer.registry
    app[PROBES] = {}
    models: dict[str, Any] = {
        "PublishBody": PublishBody,
        "DisconnectBody": DisconnectBody,
        "RevokeBody": RevokeBody,
    }
    store = open_store(
        settings.store.url,
        retention_days=settings.notifications.retention_days,
        critical_retention_days=settings.notifications.critical_retention_days,
        dedupe_window_ms=int(settings.notifications.dedupe_window * 1000),
    )
    app[STORE] = store
    app[PROBES]["store"] = store.ping
    notifications = install_notifications(node, app, store)
    install_transcode(node, app)
    install_library(node, app)
    install_activity(node)
    rooms = open_room_store(settings, node)
    syncplay = install_syncplay(node, app, rooms)
    models.update(
        {
            "NotifyBody": NotifyBody,
            "TranscodeBody": TranscodeBody,
            "LibraryEventsBody": LibraryEventsBody,
            "DataChangedBody": DataChangedBody,
            "PreferencesBody": PreferencesBody,
        }
    )
    app[OPENAPI] = openapi_document(
        models,
        {
            **feature_paths(),
            **syncplay_paths(),
            **(pages_paths() if settings.server.static else {}),
        },
    )
    app.router.add_routes(routes())
    if settings.server.static:
        install_pages(app)
    for path in (
        "/api/v1/ws",
        "/api/v1/ws/playback/{room_id}",
        "/api/v1/ws/transcode/{job_id}",
    ):
        app.router.add_get(path, websocket_handler)

    async def openapi(request: web.Request) -> web.Response:
        return web.json_response(request.app[OPENAPI])

    app.router.add_get("/api/v1/openapi.json", openapi)
    if settings.debug.echo:
        from .server.echo import echo_handler

        app.router.add_get("/debug/echo", echo_handler)

    async def on_startup(app: web.Application) -> None:
        await store.start()
        await node.start()
        node.spawn(
            notifications.cleanup_forever(settings.notifications.cleanup_interval),
            name="notification-retention",
        )
        node.spawn(syncplay.tick_forever(), name="syncplay-timeouts")

    async def on_shutdown(app: web.Application) -> None:
        await node.stop()

    async def on_cleanup(app: web.Application) -> None:
        await node.close()
        await store.close()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app


async def drain(app: web.Application) -> None:
    """Close every connection with 1012 and wait until they are gone (the caller bounds
    the wait)."""
    node = app[NODE]
    await node.stop()
    while len(node.hub):  # noqa: ASYNC110 - the hub has no "empty" event
        await asyncio.sleep(0.05)


async def serve(
    settings: Settings,
    *,
    ready: Callable[[int, web.Application], None] | None = None,
    stop: asyncio.Event | None = None,
    own_process: bool = False,
) -> None:
    """Run until SIGTERM/SIGINT (or ``stop``), then shut down gracefully within
    ``server.shutdown_timeout`` seconds. ``own_process``: the hub is the only thing in
    this process, so it may tune the garbage collector (:func:`tune_gc`)."""
    loop = asyncio.get_running_loop()
    app = build_app(settings)
    runner = web.AppRunner(
        app,
        access_log_class=AccessLogger,
        handle_signals=False,
        shutdown_timeout=1.0,
        keepalive_timeout=KEEPALIVE_TIMEOUT,
    )
    await runner.setup()
    if own_process:
        tune_gc()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    engine = (
        Engine(app[NODE], echo=settings.debug.echo)
        if settings.server.ws_engine == "direct"
        else None
    )
    server = await loop.create_server(
        _guarded(runner, settings.server.handshake_timeout, engine),
        settings.server.host,
        settings.server.port,
        reuse_address=True,
        backlog=4096,
    )
    port = server.sockets[0].getsockname()[1]
    log.info(
        "revenge-ws %s listening on http://%s:%s (node %s, broker %s)",
        __version__,
        settings.server.host,
        port,
        settings.node_id,
        settings.broker.url.split("://", 1)[0],
    )
    if ready is not None:
        ready(port, app)
    try:
        await stop.wait()
    finally:
        started = time.monotonic()
        log.info("shutting down: closing connections with 1012")
        budget = settings.server.shutdown_timeout
        with contextlib.suppress(Exception):
            await asyncio.wait_for(drain(app), budget * 0.6)
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                runner.cleanup(), max(1.0, budget - (time.monotonic() - started) - 1)
            )
        log.info("stopped after %.2fs", time.monotonic() - started)


#: Allocations between young collections (CPython's default is 700). A hub holds
#: hundreds of thousands of long-lived objects per few thousand connections, and with
#: the defaults the oldest generation was scanned every 10-13 s, a 0.8-1.4 s pause at
#: 5,000 SyncPlay members (docs/performance.md). Fewer, larger young collections and a
#: rarer full pass keep the pauses short and rare; cycles are still collected.
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """Move start-up objects out of the collector's view and space out collections.

    ``gc.freeze()`` puts everything allocated so far (modules, the app, the routes) in
    the permanent generation, so no full pass scans it again.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


#: A first request head longer than this goes to aiohttp, which answers it (431/400).
HEAD_LIMIT = 16 * 1024


class _FirstRequestDeadline(asyncio.Protocol):
    """The listener's protocol until a socket's first request is known.

    A socket that has not sent a complete request within the handshake timeout is
    dropped (slowloris). When the first request is a WebSocket upgrade that the direct
    engine serves (``server.ws_engine``), the socket is handed to it and aiohttp never
    sees it; otherwise aiohttp's protocol gets everything, this object staying in front
    only to pass calls through (its deadline ends when aiohttp's handler is reached).
    """

    __slots__ = ("_buf", "_deadline", "_engine", "_factory", "_inner", "_timeout", "_transport")

    def __init__(self, factory: Callable[[], Any], timeout: float, engine: Engine | None) -> None:
        self._factory = factory
        self._inner: Any = None
        self._engine = engine
        self._timeout = timeout
        self._deadline: asyncio.TimerHandle | None = None
        self._transport: Any = None
        self._buf = b""

    def connection_made(self, transport: Any) -> None:
        self._transport = transport
        self._deadline = asyncio.get_running_loop().call_later(
            self._timeout, self._check, transport
        )
        if self._engine is None:
            self._delegate(b"")

    def _delegate(self, data: bytes) -> None:
        # aiohttp's own connection_made turns Nagle off for small frames.
        self._inner = self._factory()
        self._inner.connection_made(self._transport)
        if data:
            self._inner.data_received(data)

    def _check(self, transport: Any) -> None:
        self._deadline = None
        if not transport.is_closing():
            transport.abort()

    def request_seen(self) -> None:
        """A complete request arrived: the deadline is met (and its timer, which holds
        this socket's protocol, is released at once rather than after the timeout)."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)
            return
        buf = self._buf + data if self._buf else data
        # Only a GET can be an upgrade: anything else goes to aiohttp at its first byte.
        if b"GET "[: len(buf)] != buf[:4]:
            self._buf = b""
            self._delegate(buf)
            return
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > HEAD_LIMIT:
                self._buf = b""
                self._delegate(buf)
            else:
                self._buf = buf
            return
        self._buf = b""
        head = buf[: end + 4]
        assert self._engine is not None
        route = self._engine.wants(head)
        if route is not None:
            self.request_seen()
            self._engine.take(self._transport, head, buf[end + 4 :], route)
        else:
            self._delegate(buf)

    def eof_received(self) -> bool | None:
        if self._inner is None:
            return None  # nothing to answer: the transport closes
        result: bool | None = self._inner.eof_received()
        return result

    def connection_lost(self, exc: Exception | None) -> None:
        # A pending deadline would keep this socket's protocol and buffers alive for the
        # whole handshake timeout after it closed (memory under connect/close storms).
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


def _guarded(runner: web.AppRunner, timeout: float, engine: Engine | None) -> Callable[[], Any]:
    """The listener's protocol factory: the first-request deadline in front of aiohttp's
    protocol, and the direct WebSocket engine when it is on."""
    factory = runner.server
    assert factory is not None
    return lambda: _FirstRequestDeadline(factory, timeout, engine)


def run(settings: Settings) -> None:
    """Blocking entry point of ``revenge-ws serve``."""
    configure_logging(settings.logging)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def main() -> None:
        stop = asyncio.Event()

        async def watchdog() -> None:
            # The graceful sequence fits the budget; this is the promise that holds even
            # when it does not (an overloaded node): exit 0 within shutdown_timeout.
            await stop.wait()
            timer = threading.Timer(max(0.5, settings.server.shutdown_timeout - 0.5), _force_exit)
            timer.daemon = True
            timer.start()

        guard = asyncio.create_task(watchdog())
        try:
            await serve(settings, stop=stop, own_process=True)
        finally:
            guard.cancel()

    asyncio.run(main())


def _force_exit() -> None:
    log.error("shutdown did not finish within server.shutdown_timeout; exiting now")
    logging.shutdown()
    # Everything that must not be lost is already durable (notifications are committed
    # before the API answers), so leaving without the rest of the teardown is safe.
    os._exit(0)
