"""Baseline (b): python-socketio on aiohttp, emitting to a room.

Every client joins the room ``bench`` in its ``connect`` handler (before the server
answers the namespace connect, so a client that saw ``40{…}`` is in the room).
``POST /publish`` takes the hub's body (``{channel, type, data}``), builds the hub's
envelope and emits it once to the room: ``await sio.emit("pub", envelope,
room="bench")`` — python-socketio encodes the packet once and sends it to each member.

Transports: WebSocket only (no long-polling). Standalone: ``python
bench/baseline_socketio.py --port 8200 --core 0`` (needs ``pip install python-socketio``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import secrets
import signal
from datetime import UTC, datetime
from typing import Any

import orjson
import socketio
from aiohttp import web

EPOCH = secrets.token_hex(4)
ROOM = "bench"


def rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def build_app() -> web.Application:
    sio = socketio.AsyncServer(
        async_mode="aiohttp",
        transports=["websocket"],
        logger=False,
        engineio_logger=False,
        cors_allowed_origins="*",
    )
    state = {"seq": 0}

    @sio.event
    async def connect(sid: str, environ: dict[str, Any]) -> None:
        await sio.enter_room(sid, ROOM)

    async def publish(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        state["seq"] += 1
        envelope = {
            "type": body["type"],
            "channel": body["channel"],
            "seq": state["seq"],
            "epoch": EPOCH,
            "timestamp": rfc3339(),
            "data": body.get("data", {}),
        }
        await sio.emit("pub", envelope, room=ROOM)
        return web.Response(
            body=orjson.dumps({"seq": state["seq"]}), content_type="application/json"
        )

    app = web.Application()
    sio.attach(app)
    app.router.add_post("/publish", publish)
    return app


async def serve(port: int) -> None:
    runner = web.AppRunner(build_app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=4096, reuse_address=True)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(runner.cleanup(), 5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--core", type=int, default=None, help="pin the process to this CPU")
    args = ap.parse_args()
    if args.core is not None:
        os.sched_setaffinity(0, {args.core})
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.port))
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.port))


if __name__ == "__main__":
    main()
