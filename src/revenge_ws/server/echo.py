"""An RFC 6455 conformance echo endpoint (``REVENGE_DEBUG_ECHO=1``), off by default.

It runs on the same aiohttp stack and limits as the hub, so conformance suites such as
Autobahn|Testsuite measure what the hub's clients get.
"""

from __future__ import annotations

from aiohttp import WSMsgType, web

from ..features.web import NODE
from .ws import close_reply

__all__ = ["echo_handler"]


async def echo_handler(request: web.Request) -> web.StreamResponse:
    settings = request.app[NODE].settings
    ws = web.WebSocketResponse(
        compress=False,
        # Same limit as the hub: a message of exactly message_size passes (aiohttp
        # refuses sizes >= max_msg_size).
        max_msg_size=settings.limits.message_size + 1,
        autoping=True,
        autoclose=False,  # the hub's reply to a close (close_reply), not aiohttp's
    )
    await ws.prepare(request)
    while True:
        msg = await ws.receive()
        if msg.type is WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
        else:
            if msg.type is WSMsgType.CLOSE:
                await ws.close(code=close_reply(int(msg.data or 0)), drain=False)
            break
    return ws
