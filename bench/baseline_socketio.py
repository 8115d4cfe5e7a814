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

import secrets
import sys
from pathlib import Path
from typing import Any

import orjson
import socketio
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: python bench/baseline_*.py
    sys.path.insert(0, str(ROOT))

from bench.common import hub_envelope, serve_baseline  # noqa: E402

EPOCH = secrets.token_hex(4)
ROOM = "bench"


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
        await sio.emit("pub", hub_envelope(body, state["seq"], EPOCH), room=ROOM)
        return web.Response(
            body=orjson.dumps({"seq": state["seq"]}), content_type="application/json"
        )

    app = web.Application()
    sio.attach(app)
    app.router.add_post("/publish", publish)
    return app


def main() -> None:
    serve_baseline(__doc__, lambda args: build_app())


if __name__ == "__main__":
    main()
