"""Baseline (a): the bare WebSocket stack the hub is built on — aiohttp — doing an
encode-once broadcast.

``POST /publish`` takes the same body as the hub's ``/api/v1/realtime/publish``
(``{channel, type, data}``), builds the same envelope as the hub (``type``, ``channel``,
``seq``, ``epoch``, ``timestamp``, ``data``), serializes it ONCE with orjson and sends
it to every connected ``/ws`` client:

- ``--mode frame``: ``await ws.send_frame(payload, TEXT)`` (bytes, no re-encode);
- ``--mode str``: ``await ws.send_str(text)`` (the everyday aiohttp call).

No auth, no history, no per-connection queue, no logging: the floor a hub on aiohttp
can be compared with. Standalone (orjson, aiohttp, uvloop): ``python
bench/baseline_aiohttp.py --port 8100 --core 0``.
"""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

import orjson
from aiohttp import WSMsgType, web

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: python bench/baseline_*.py
    sys.path.insert(0, str(ROOT))

from bench.common import hub_envelope, serve_baseline  # noqa: E402

EPOCH = secrets.token_hex(4)


def build_app(mode: str) -> web.Application:
    clients: set[web.WebSocketResponse] = set()
    state = {"seq": 0}

    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False, max_msg_size=64 * 1024)
        await ws.prepare(request)
        await ws.send_str('{"type":"welcome"}')
        clients.add(ws)
        try:
            async for msg in ws:
                if msg.type is WSMsgType.ERROR:
                    break
        finally:
            clients.discard(ws)
        return ws

    async def publish(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        state["seq"] += 1
        payload = orjson.dumps(hub_envelope(body, state["seq"], EPOCH))
        n = 0
        if mode == "frame":
            for ws in list(clients):
                try:
                    await ws.send_frame(payload, WSMsgType.TEXT)
                    n += 1
                except (ConnectionError, RuntimeError):
                    clients.discard(ws)
        else:
            text = payload.decode()
            for ws in list(clients):
                try:
                    await ws.send_str(text)
                    n += 1
                except (ConnectionError, RuntimeError):
                    clients.discard(ws)
        return web.Response(
            body=orjson.dumps({"seq": state["seq"], "delivered": n}),
            content_type="application/json",
        )

    app = web.Application()
    app.router.add_get("/ws", ws_handler)
    app.router.add_post("/publish", publish)
    return app


def main() -> None:
    serve_baseline(
        __doc__,
        lambda args: build_app(args.mode),
        lambda ap: ap.add_argument("--mode", choices=("frame", "str"), default="frame"),
    )


if __name__ == "__main__":
    main()
