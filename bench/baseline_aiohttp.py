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

import argparse
import asyncio
import contextlib
import os
import resource
import secrets
import signal
from datetime import UTC, datetime

import orjson
from aiohttp import WSMsgType, web

EPOCH = secrets.token_hex(4)


def rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
        payload = orjson.dumps(
            {
                "type": body["type"],
                "channel": body["channel"],
                "seq": state["seq"],
                "epoch": EPOCH,
                "timestamp": rfc3339(),
                "data": body.get("data", {}),
            }
        )
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


async def serve(port: int, mode: str) -> None:
    runner = web.AppRunner(build_app(mode), access_log=None, handle_signals=False)
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
    ap.add_argument("--mode", choices=("frame", "str"), default="frame")
    args = ap.parse_args()
    if args.core is not None:
        os.sched_setaffinity(0, {args.core})
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.port, args.mode))
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.port, args.mode))


if __name__ == "__main__":
    main()
