"""The direct WebSocket engine (``server/direct.py``) and the listener that routes to it.

The rest of the suite runs every WebSocket through it already (it is the default); these
cases cover what only it does: which sockets it takes and which it leaves to aiohttp, its
HTTP refusals, frames sent before the upgrade was answered, the access log, and the
``aiohttp`` engine setting.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from revenge_ws.server.direct import Engine

from .helpers import (
    OP_TEXT,
    FrameReader,
    Hub,
    frame,
    handshake,
    make_settings,
    read_head,
    running_hub,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def hub() -> AsyncIterator[Hub]:
    async with running_hub(make_settings({"REVENGE_DEBUG_ECHO": "1"})) as h:
        yield h


def _status(head: bytes) -> int:
    return int(head[9:12])


def _body(sock: socket.socket, head: bytes) -> dict[str, Any]:
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            break
        body += chunk
    result: dict[str, Any] = orjson.loads(body)
    return result


def _headers(head: bytes) -> dict[str, str]:
    out = {}
    for line in head.split(b"\r\n")[1:]:
        if b":" in line:
            k, v = line.split(b":", 1)
            out[k.decode().lower()] = v.decode().strip()
    return out


# -- routing -------------------------------------------------------------------------------------
def test_engine_routes_only_the_hubs_websocket_paths() -> None:
    node: Any = None
    engine = Engine(node)
    assert engine.route("/api/v1/ws?token=x") == ("hub", None, None)
    assert engine.route("/api/v1/ws/playback/room%201") == ("hub", "room 1", None)
    assert engine.route("/api/v1/ws/transcode/j1") == ("hub", None, "j1")
    for path in ("/api/v1/ws/", "/api/v1/ws/playback/", "/api/v1/ws/playback/a/b", "/x"):
        assert engine.route(path) is None, path
    assert engine.route("/debug/echo") is None  # only with debug.echo
    assert Engine(node, echo=True).route("/debug/echo") == ("echo", None, None)

    up = b"Upgrade: websocket\r\n\r\n"
    assert engine.wants(b"GET /api/v1/ws HTTP/1.1\r\n" + up)
    assert engine.wants(b"GET /api/v1/ws HTTP/1.1\r\nupgrade:  WebSocket\r\n\r\n")
    assert not engine.wants(b"GET /api/v1/ws HTTP/1.1\r\n\r\n")  # no upgrade
    assert not engine.wants(b"POST /api/v1/ws HTTP/1.1\r\n" + up)
    assert not engine.wants(b"GET /api/v1/ws HTTP/1.0\r\n" + up)
    assert not engine.wants(b"GET /api/v1/health HTTP/1.1\r\n" + up)
    assert not engine.wants(b"GET /api/v1/\xffws HTTP/1.1\r\n" + up)
    assert not engine.wants(b"GET  /api/v1/ws HTTP/1.1\r\n" + up)


async def test_upgrade_on_a_kept_alive_http_connection_is_served_by_aiohttp(hub: Hub) -> None:
    """The engine only takes a socket's FIRST request; a later upgrade on the same socket is
    aiohttp's (same endpoint, same admission)."""
    token = hub.token("alice")

    def run() -> tuple[bytes, bytes, dict[str, Any]]:
        sock = socket.create_connection(("127.0.0.1", hub.port), 5)
        try:
            sock.sendall(b"GET /api/v1/time HTTP/1.1\r\nHost: x\r\n\r\n")
            first = read_head(sock, 8192)
            _body(sock, first)
            sock.sendall(
                (
                    f"GET /api/v1/ws?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: revenge.v1\r\n\r\n"
                ).encode()
            )
            second = read_head(sock, 8192)
            welcome = FrameReader(sock).next(5)
            assert welcome is not None
            return first, second, orjson.loads(welcome[1])
        finally:
            sock.close()

    first, second, welcome = await asyncio.to_thread(run)
    assert _status(first) == 200
    assert _status(second) == 101 and "aiohttp" in _headers(second).get("server", "")
    assert welcome["type"] == "welcome" and welcome["data"]["user_id"] == "alice"


async def test_first_request_upgrade_is_served_directly(hub: Hub) -> None:
    token = hub.token("bob")

    def run() -> tuple[bytes, dict[str, Any]]:
        sock, head = handshake(hub.port, f"/api/v1/ws?token={token}")
        try:
            got = FrameReader(sock).next(5)
            assert got is not None
            return head, orjson.loads(got[1])
        finally:
            sock.close()

    head, welcome = await asyncio.to_thread(run)
    headers = _headers(head)
    assert _status(head) == 101 and "aiohttp" not in headers.get("server", "")
    assert headers["sec-websocket-protocol"] == "revenge.v1"
    assert welcome["type"] == "welcome" and welcome["data"]["user_id"] == "bob"


# -- refusals --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "path", "status", "code"),
    [
        ({}, "/api/v1/ws?token=forged", 401, "UNAUTHORIZED"),
        ({"Origin": "https://evil.example"}, "/api/v1/ws", 403, "FORBIDDEN"),
        ({"Sec-WebSocket-Key": "short"}, "/api/v1/ws?token={token}", 400, "INVALID_MESSAGE"),
        ({"Sec-WebSocket-Version": "8"}, "/api/v1/ws?token={token}", 426, "INVALID_MESSAGE"),
        ({}, "/api/v1/ws/playback/r1?token={token}", 404, "NOT_FOUND"),
    ],
    ids=["bad-token", "origin", "bad-key", "old-version", "syncplay-off"],
)
async def test_refusals_are_the_contracts_json(
    extra: dict[str, str], path: str, status: int, code: str
) -> None:
    settings = make_settings(
        {
            "REVENGE_ALLOWED_ORIGINS": '["https://app.example"]',
            "REVENGE_SYNCPLAY_ENABLED": "0",
        }
    )
    async with running_hub(settings) as hub:
        target = path.format(token=hub.token("alice"))

        def run() -> tuple[bytes, dict[str, Any]]:
            sock, head = handshake(hub.port, target, extra)
            try:
                return head, _body(sock, head)
            finally:
                sock.close()

        head, body = await asyncio.to_thread(run)
    assert _status(head) == status, head
    assert body["error"]["code"] == code
    if status == 426:
        assert _headers(head)["sec-websocket-version"] == "13"


async def test_full_node_answers_503_with_retry_after() -> None:
    settings = make_settings(
        {"REVENGE_SERVER_ACCEPT_RATE": "0.001", "REVENGE_SERVER_ACCEPT_BURST": "1"}
    )
    async with running_hub(settings) as hub:
        token = hub.token("alice")

        def run() -> list[tuple[bytes, dict[str, Any] | None]]:
            out: list[tuple[bytes, dict[str, Any] | None]] = []
            socks = []
            try:
                for _ in range(2):
                    sock, head = handshake(hub.port, f"/api/v1/ws?token={token}")
                    socks.append(sock)
                    out.append((head, None if _status(head) == 101 else _body(sock, head)))
            finally:
                for s in socks:
                    s.close()
            return out

        (first, _), (second, body) = await asyncio.to_thread(run)
    assert _status(first) == 101
    assert _status(second) == 503 and int(_headers(second)["retry-after"]) >= 1
    assert body is not None and body["error"]["code"] == "UNAVAILABLE"


# -- frames --------------------------------------------------------------------------------------
async def test_frames_sent_with_the_upgrade_are_served_after_the_welcome(hub: Hub) -> None:
    """A client may write frames right behind its request; they wait for the admission and
    are answered after the ``welcome``, in order."""
    token = hub.token("carol")
    pings = b"".join(
        frame(OP_TEXT, orjson.dumps({"type": "ping", "id": f"p{i}", "data": {}})) for i in range(3)
    )
    request = (
        f"GET /api/v1/ws?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()

    def run() -> list[dict[str, Any]]:
        sock = socket.create_connection(("127.0.0.1", hub.port), 5)
        try:
            sock.sendall(request + pings)
            assert _status(read_head(sock, 8192)) == 101
            reader = FrameReader(sock)
            out = []
            for _ in range(4):
                got = reader.next(5)
                assert got is not None
                out.append(orjson.loads(got[1]))
            return out
        finally:
            sock.close()

    msgs = await asyncio.to_thread(run)
    assert [m["type"] for m in msgs] == ["welcome", "pong", "pong", "pong"]
    assert [m["id"] for m in msgs[1:]] == ["p0", "p1", "p2"]


async def test_requests_of_one_connection_run_in_order(hub: Hub) -> None:
    """A subscribe (awaits the broker) then a ping in one write: the ack comes first."""
    token = hub.token("dave")

    def run() -> list[str]:
        sock, head = handshake(hub.port, f"/api/v1/ws?token={token}")
        try:
            assert _status(head) == 101
            reader = FrameReader(sock)
            assert reader.next(5) is not None  # welcome
            sub = {"type": "subscribe", "id": "s1", "data": {"channels": ["activity"]}}
            sock.sendall(
                frame(OP_TEXT, orjson.dumps(sub))
                + frame(OP_TEXT, orjson.dumps({"type": "ping", "id": "p1", "data": {}}))
            )
            ids = []
            for _ in range(2):
                got = reader.next(5)
                assert got is not None
                ids.append(orjson.loads(got[1])["id"])
            return ids
        finally:
            sock.close()

    assert await asyncio.to_thread(run) == ["s1", "p1"]


async def test_access_log_has_the_upgrade_without_its_token(hub: Hub, caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    token = hub.token("erin")
    ws = await hub.connect("erin")
    await ws.close()
    bad = await asyncio.to_thread(handshake, hub.port, "/api/v1/ws?token=forged")
    bad[0].close()
    for _ in range(100):
        if "GET /api/v1/ws 101" in caplog.text and "GET /api/v1/ws 401" in caplog.text:
            break
        await asyncio.sleep(0.05)
    assert "GET /api/v1/ws 101" in caplog.text and "GET /api/v1/ws 401" in caplog.text
    assert token not in caplog.text and "forged" not in caplog.text


async def test_the_aiohttp_engine_setting_serves_the_same_endpoint() -> None:
    async with running_hub(make_settings({"REVENGE_SERVER_WS_ENGINE": "aiohttp"})) as hub:
        token = hub.token("frank")

        def run() -> bytes:
            sock, head = handshake(hub.port, f"/api/v1/ws?token={token}")
            sock.close()
            return head

        head = await asyncio.to_thread(run)
    assert _status(head) == 101 and "aiohttp" in _headers(head).get("server", "")


async def test_an_oversized_first_head_is_left_to_aiohttp(hub: Hub) -> None:
    def run() -> bytes:
        sock = socket.create_connection(("127.0.0.1", hub.port), 5)
        try:
            sock.sendall(b"GET /api/v1/ws HTTP/1.1\r\nX-Pad: " + b"a" * 20_000 + b"\r\n\r\n")
            return read_head(sock, 8192)
        finally:
            sock.close()

    head = await asyncio.to_thread(run)
    assert _status(head) in (400, 431), head[:100]


# -- failures inside the handshake ---------------------------------------------------------------
async def test_an_error_before_the_upgrade_is_answered_500(hub: Hub, monkeypatch: Any) -> None:
    def boom(token: str | None) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(hub.node, "authenticate", boom)

    def run() -> tuple[bytes, dict[str, Any]]:
        sock, head = handshake(hub.port, "/api/v1/ws?token=x")
        try:
            return head, _body(sock, head)
        finally:
            sock.close()

    head, body = await asyncio.to_thread(run)
    assert _status(head) == 500 and body["error"]["code"] == "INTERNAL"


async def test_an_error_after_the_upgrade_drops_the_socket_and_frees_the_slot(
    hub: Hub, monkeypatch: Any
) -> None:
    real_open = hub.node.open
    calls = 0

    async def failing_open(*args: Any, **kw: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return await real_open(*args, **kw)

    monkeypatch.setattr(hub.node, "open", failing_open)
    token = hub.token("gina")

    def run() -> tuple[bytes, bytes]:
        sock, head = handshake(hub.port, f"/api/v1/ws?token={token}")
        try:
            sock.settimeout(5)
            return head, sock.recv(100)
        finally:
            sock.close()

    head, rest = await asyncio.to_thread(run)
    assert _status(head) == 101 and rest == b""  # dropped, no welcome
    ws = await hub.connect("gina")  # the slot came back: the next one is welcomed
    await ws.close()


async def test_a_client_gone_while_opening_is_forgotten() -> None:
    """The peer resets while ``Node.open`` runs: the connection is closed on the node as
    soon as it is open, so the user's slots come back (2 per user here, 5 attempts)."""
    async with running_hub(make_settings({"REVENGE_LIMITS_CONNECTIONS_PER_USER": "2"})) as hub:
        real_open = hub.node.open
        gate = asyncio.Event()

        async def slow_open(*args: Any, **kw: Any) -> Any:
            await asyncio.wait_for(gate.wait(), 5)
            gate.clear()
            return await real_open(*args, **kw)

        hub.node.open = slow_open  # type: ignore[method-assign]
        token = hub.token("hank")
        for _ in range(5):

            def reset() -> None:
                sock, head = handshake(hub.port, f"/api/v1/ws?token={token}")
                assert _status(head) == 101
                sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
                sock.close()  # RST

            await asyncio.to_thread(reset)
            await asyncio.sleep(0.05)
            gate.set()
            for _ in range(100):
                if not gate.is_set() and len(hub.node.hub) == 0:
                    break
                await asyncio.sleep(0.02)
        hub.node.open = real_open  # type: ignore[method-assign]
        assert len(hub.node.hub) == 0
        ws = await hub.connect("hank")
        await ws.close()


@pytest.mark.parametrize("split", [False, True], ids=["one-frame", "fragments"])
async def test_nothing_after_a_utf8_failure_is_answered(hub: Hub, split: bool) -> None:
    """Invalid UTF-8 then a valid message in the same write: a close 1007 and nothing else
    (the valid message is not echoed, not even before the close)."""
    bad = (
        frame(OP_TEXT, b"ok\xce", fin=False) + frame(0x0, b"\xff", fin=True)
        if split
        else frame(OP_TEXT, b"\xff\xfe")
    )

    def run() -> list[tuple[int, bytes]]:
        sock, head = handshake(hub.port, "/debug/echo")
        try:
            assert _status(head) == 101
            sock.sendall(bad + frame(OP_TEXT, b"after"))
            reader = FrameReader(sock)
            got = []
            while (item := reader.next(5)) is not None:
                got.append(item)
                if item[0] == 0x8:
                    break
            return got
        finally:
            sock.close()

    got = await asyncio.to_thread(run)
    assert [(op, p[:2]) for op, p in got] == [(0x8, (1007).to_bytes(2, "big"))]


async def test_closed_websockets_are_freed_without_the_garbage_collector(hub: Hub) -> None:
    """Found by the soak (RSS +10 MiB/min with the direct engine): a closed connection's
    `Socket` and `Connection` pointed at each other, and websockets' protocol at itself
    (a bound `select_subprotocol`, the EOFError of `receive_eof`), so all of it waited for
    a full collection — rare in the hub's process (`app.tune_gc`). With the collector off,
    60 connections opened, used and closed (by the client, by the server, by a reset)
    must leave none of those objects behind."""
    import gc

    from revenge_ws.core.connection import Connection
    from revenge_ws.server.direct import Socket, _Protocol

    tokens = [hub.token(f"gc{i}") for i in range(60)]
    ping = frame(OP_TEXT, orjson.dumps({"type": "ping", "id": "p", "data": {}}))

    def alive() -> int:
        return sum(1 for o in gc.get_objects() if isinstance(o, Socket | Connection | _Protocol))

    def churn() -> None:
        for i, token in enumerate(tokens):
            sock, head = handshake(hub.port, f"/api/v1/ws?token={token}")
            assert _status(head) == 101
            reader = FrameReader(sock)
            assert reader.next(5) is not None  # welcome
            sock.sendall(ping)
            assert reader.next(5) is not None  # pong
            if i % 3 == 0:
                sock.sendall(frame(0x8, (1000).to_bytes(2, "big")))
                reader.until_close(5)
            elif i % 3 == 1:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            sock.close()

    gc.collect()
    before = alive()
    gc.disable()
    try:
        await asyncio.to_thread(churn)
        for _ in range(200):
            if len(hub.node.hub) == 0 and alive() == before:
                break
            await asyncio.sleep(0.1)
        assert alive() == before, alive() - before
    finally:
        gc.enable()
