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
from collections.abc import Callable
from typing import Any

from aiohttp import web

from . import __version__
from .broker import Broker, open_broker
from .config import Settings
from .core.node import Node
from .features import devices, library, notifications, syncplay, transcode
from .features.activity import install as install_activity
from .features.playback_events import install as install_playback_events
from .features.web import NODE
from .server.acceptor import Acceptor, listen
from .server.admission import EXACT_PATH, KEYED_PATHS
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
from .server.listener import guarded, mark_seen
from .server.logs import AccessLogger, configure_logging
from .server.metrics import PrometheusObserver
from .server.openapi import openapi_document
from .server.pages import install as install_pages
from .server.pages import openapi_paths as pages_openapi_paths
from .server.ws import websocket_handler
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
        middlewares=[mark_seen, error_middleware],
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
    notes = notifications.install(node, app, store)
    playback = install_playback_events(node, app, store, registry=observer.registry)
    transcode.install(node, app)
    library.install(node, app)
    install_activity(node)
    rooms = open_room_store(settings, node)
    party = syncplay.install(node, app, rooms)
    gadgets = devices.install(node, app, playback, registry=observer.registry)
    # Each feature declares its routes' OpenAPI paths and the bodies they name.
    paths: dict[str, Any] = {}
    for feature in (notifications, transcode, library, devices):
        models.update(feature.OPENAPI_MODELS)
        paths.update(feature.openapi_paths())
    paths.update(syncplay.openapi_paths())
    if settings.server.static:
        paths.update(pages_openapi_paths())
    app[OPENAPI] = openapi_document(models, paths)
    app.router.add_routes(routes())
    if settings.server.static:
        install_pages(app)
    for path in (EXACT_PATH, *(f"{prefix}{{{key}}}" for prefix, key in KEYED_PATHS.items())):
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
        if playback is not None:
            await playback.start(node)
        node.spawn(
            notes.cleanup_forever(settings.notifications.cleanup_interval),
            name="notification-retention",
        )
        node.spawn(party.tick_forever(), name="syncplay-timeouts")
        devices.start(node, gadgets)

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
    # Not loop.create_server: on uvloop it accepts one connection per loop iteration,
    # which hides a storm from the admission checks (server/acceptor.py).
    server = Acceptor(
        loop,
        listen(settings.server.host, settings.server.port, settings.server.listen_backlog),
        guarded(runner, settings.server.handshake_timeout, engine),
    )
    server.start()
    port = server.port
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
