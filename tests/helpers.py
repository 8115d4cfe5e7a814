"""Shared test machinery: settings, in-process hubs on real sockets, hub processes,
private redis-server instances, and a small raw WebSocket client."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from revenge_ws.auth import mint_token
from revenge_ws.config import Settings, load_settings

SECRET = "test-secret-" + "x" * 40
API_KEY = "test-api-key-0123456789"


async def wait_for(cond: Any, timeout: float = 5.0) -> bool:
    """Poll ``cond()`` every 20 ms until it is true or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.02)
    return bool(cond())


async def until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll ``predicate`` every 10 ms until true; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_settings(env: dict[str, str] | None = None, config: str | None = None) -> Settings:
    base = {
        "REVENGE_JWT_SECRET": SECRET,
        "REVENGE_API_KEYS": API_KEY,
        "REVENGE_SERVER_PORT": "0",
        "REVENGE_NODE_ID": "test-node",
        "REVENGE_STORE_URL": "sqlite:///:memory:",
    }
    base.update(env or {})
    return load_settings(config, environ=base)


class Listening:
    """A hub listening on 127.0.0.1:``port``: its HTTP base URL and its WebSocket URL."""

    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/v1/ws"


@dataclass
class Hub(Listening):
    """An in-process hub serving on a real 127.0.0.1 socket."""

    settings: Settings
    port: int
    app: web.Application
    stop: asyncio.Event
    task: asyncio.Task[None]
    sessions: list[aiohttp.ClientSession] = field(default_factory=list)

    @property
    def node(self) -> Any:
        from revenge_ws.features.web import NODE

        return self.app[NODE]

    def token(self, sub: str = "alice", **kw: Any) -> str:
        return mint_token(self.settings.jwt, sub, **kw)

    async def session(self) -> aiohttp.ClientSession:
        s = aiohttp.ClientSession()
        self.sessions.append(s)
        return s

    async def connect(
        self, sub: str = "alice", *, path: str = "/api/v1/ws", welcome: bool = True, **kw: Any
    ) -> WS:
        s = await self.session()
        sep = "&" if "?" in path else "?"
        ws = await s.ws_connect(
            f"{self.url}{path}{sep}token={self.token(sub, **kw)}", protocols=["revenge.v1"]
        )
        client = WS(ws)
        if welcome:
            client.welcome = await client.recv()
            assert client.welcome["type"] == "welcome"
        return client

    async def publish(self, channel: str, mtype: str, data: dict[str, Any], **kw: Any) -> Any:
        s = await self.session()
        async with s.post(
            f"{self.url}/api/v1/realtime/publish",
            headers={"Authorization": f"Bearer {API_KEY}"},
            json={"channel": channel, "type": mtype, "data": data, **kw},
        ) as r:
            return r.status, await r.json()

    async def request(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        s = await self.session()
        headers = kw.pop("headers", {"Authorization": f"Bearer {API_KEY}"})
        async with s.request(method, self.url + path, headers=headers, **kw) as r:
            body = await r.read()
            try:
                return r.status, orjson.loads(body)
            except orjson.JSONDecodeError:
                return r.status, body.decode()


class WS:
    """A thin raw client: JSON in/out with timeouts, so tests see the wire as it is."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.welcome: dict[str, Any] = {}
        self._n = 0
        #: Messages read while waiting for a reply; ``recv`` returns these first.
        self.backlog: list[dict[str, Any]] = []

    async def send(self, mtype: str, data: dict[str, Any] | None = None, **kw: Any) -> str:
        self._n += 1
        mid = kw.pop("id", f"r{self._n}")
        env: dict[str, Any] = {"type": mtype, "data": data or {}, **kw}
        if mid is not None:
            env["id"] = mid
        await self.ws.send_str(orjson.dumps(env).decode())
        return str(mid)

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        if self.backlog:
            return self.backlog.pop(0)
        return await self._read(timeout)

    async def recv_type(self, mtype: str, timeout: float = 5.0) -> dict[str, Any]:
        """The next message of type ``mtype``; others before it are dropped."""
        deadline = time.monotonic() + timeout
        while True:
            msg = await self.recv(max(0.1, deadline - time.monotonic()))
            if msg.get("type") == mtype:
                return msg

    async def _read(self, timeout: float) -> dict[str, Any]:
        msg = await self.ws.receive(timeout=timeout)
        if msg.type is not aiohttp.WSMsgType.TEXT:
            raise AssertionError(
                f"expected a text frame, got {msg.type} {msg.data!r} {msg.extra!r}"
            )
        result: dict[str, Any] = orjson.loads(msg.data)
        return result

    async def request(
        self, mtype: str, data: dict[str, Any] | None = None, timeout: float = 5.0
    ) -> dict[str, Any]:
        mid = await self.send(mtype, data)
        deadline = time.monotonic() + timeout
        while True:
            msg = await self._read(max(0.1, deadline - time.monotonic()))
            if msg.get("id") == mid:
                return msg
            self.backlog.append(msg)

    async def closed(self, timeout: float = 5.0) -> int | None:
        """Read until the close frame; return the close code."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = await self.ws.receive(timeout=max(0.1, deadline - time.monotonic()))
            if msg.type is aiohttp.WSMsgType.CLOSE:
                # The code in the server's close frame (aiohttp's close_code reads 1006
                # when the server drops TCP before the client's reply went out).
                return int(msg.data)
            if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                return self.ws.close_code
            if msg.type is aiohttp.WSMsgType.ERROR:
                return self.ws.close_code
        raise AssertionError("connection not closed in time")

    async def close(self) -> None:
        await self.ws.close()


@contextlib.asynccontextmanager
async def running_hub(settings: Settings) -> AsyncIterator[Hub]:
    from revenge_ws.app import serve

    stop = asyncio.Event()
    started: asyncio.Future[tuple[int, web.Application]] = (
        asyncio.get_running_loop().create_future()
    )
    task = asyncio.create_task(
        serve(settings, ready=lambda p, a: started.set_result((p, a)), stop=stop)
    )
    port, app = await asyncio.wait_for(started, 10)
    hub = Hub(settings, port, app, stop, task)
    try:
        yield hub
    finally:
        for s in hub.sessions:
            await s.close()
        stop.set()
        await asyncio.wait_for(task, 30)


# -- processes -------------------------------------------------------------------------
@dataclass
class HubProcess(Listening):
    proc: subprocess.Popen[bytes]
    port: int
    env: dict[str, str]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float, log_tail: int | None = None) -> HubProcess:
        """Wait until the port accepts connections; kill the process and raise (with the
        end of its log) when it exits or does not listen within ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"hub exited with {self.proc.returncode}:\n{self._tail(log_tail)}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2),
            ):
                return self
            time.sleep(0.05)
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"hub did not start in {timeout}s:\n{self._tail(log_tail)}")

    def _tail(self, n: int | None) -> str:
        text = self.log()
        return text if n is None else text[-n:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return int(self.proc.returncode)


def start_hub_process(
    env: dict[str, str] | None = None, port: int | None = None, timeout: float = 15.0
) -> HubProcess:
    """Start ``python -m revenge_ws serve`` and wait until /healthz answers."""
    port = port or free_port()
    full = {k: v for k, v in os.environ.items() if not k.startswith("REVENGE_")}
    full.update(
        {
            "REVENGE_JWT_SECRET": SECRET,
            "REVENGE_API_KEYS": API_KEY,
            "REVENGE_SERVER_PORT": str(port),
            "REVENGE_STORE_URL": "sqlite:///:memory:",
            "COVERAGE_PROCESS_START": os.environ.get("COVERAGE_PROCESS_START", ""),
        }
    )
    full.update(env or {})
    fd, log_name = tempfile.mkstemp(prefix="revenge-hub-", suffix=".log")
    log_file = os.fdopen(fd, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "revenge_ws", "serve"],
        env=full,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    log_file.close()
    return HubProcess(proc, port, full, Path(log_name)).wait_ready(timeout)


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A private redis-server on a free port; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            raise RuntimeError("redis-server is not installed (CI must install it)")
        import pytest

        pytest.skip("redis-server not installed")
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="revenge-redis-")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            tmp,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)


def raw_upgrade(port: int, path: str, rcvbuf: int = 4096, timeout: float = 5.0) -> socket.socket:
    """A WebSocket handshake on a plain socket that then never reads (a stuck peer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: revenge.v1\r\n\r\n"
        ).encode()
    )
    head = read_head(sock, 4096)
    if not head.startswith(b"HTTP/1.1 101"):
        sock.close()
        raise AssertionError(f"upgrade refused: {head[:200]!r}")
    return sock


def masked_text_frame(payload: bytes) -> bytes:
    """A client-to-server text frame (masked with a zero key, which RFC 6455 permits)."""
    n = len(payload)
    if n < 126:
        head = bytes([0x81, 0x80 | n])
    elif n < 65536:
        head = bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x81, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + b"\x00\x00\x00\x00" + payload


# -- raw RFC 6455 frames on a plain socket -----------------------------------------------
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv1: bool = False,
    rsv: int = 0,
    key: bytes | None = b"\x00\x00\x00\x00",
) -> bytes:
    """One client frame, masked with ``key`` (the zero key, which RFC 6455 permits, unless
    told otherwise; ``key=None`` sends it unmasked). ``rsv`` sets the three reserved bits
    (RSV1=4, RSV2=2, RSV3=1); ``rsv1=True`` is the same as ``rsv=4``."""
    b0 = (0x80 if fin else 0) | ((rsv | (4 if rsv1 else 0)) << 4) | opcode
    n = len(payload)
    mask_bit = 0x80 if key is not None else 0
    if n < 126:
        head = bytes([b0, mask_bit | n])
    elif n < 65536:
        head = bytes([b0, mask_bit | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([b0, mask_bit | 127]) + n.to_bytes(8, "big")
    if key is None:
        return head + payload
    if key != b"\x00\x00\x00\x00":
        n_key = int.from_bytes((key * (n // 4 + 1))[:n], "big") if n else 0
        payload = (int.from_bytes(payload, "big") ^ n_key).to_bytes(n, "big") if n else b""
    return head + key + payload


def fragments(message: bytes, count: int) -> bytes:
    """``message`` as exactly ``count`` frames: TEXT (FIN=0), CONT..., CONT (FIN=1)."""
    assert len(message) % count == 0
    size = len(message) // count
    parts = [message[i : i + size] for i in range(0, len(message), size)]
    assert len(parts) == count
    return b"".join(
        frame(OP_TEXT if i == 0 else OP_CONT, p, fin=i == count - 1) for i, p in enumerate(parts)
    )


def handshake(
    port: int, path: str, extra: dict[str, str] | None = None, timeout: float = 5.0
) -> tuple[socket.socket, bytes]:
    """A WebSocket upgrade on a plain socket; returns the socket and the response head."""
    sock = socket.create_connection(("127.0.0.1", port), timeout)
    headers = {
        "Host": f"127.0.0.1:{port}",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Protocol": "revenge.v1",
        **(extra or {}),
    }
    request = f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall((request + "\r\n").encode())
    return sock, read_head(sock, 8192)


def read_head(sock: socket.socket, limit: int) -> bytes:
    """An HTTP response head, byte by byte so nothing after it is consumed."""
    head = b""
    while b"\r\n\r\n" not in head and len(head) < limit:
        chunk = sock.recv(1)
        if not chunk:
            break
        head += chunk
    return head


class FrameReader:
    """Reads server frames from a raw socket (server frames are never masked)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.last_b0, self.last_masked = 0, False
        #: The payload of the close frame ``until_close`` stopped at.
        self.close_payload = b""

    def _fill(self, n: int, deadline: float) -> bool:
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no frame in time")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return False
            self.buf += chunk
        return True

    def next(self, timeout: float = 5.0) -> tuple[int, bytes] | None:
        """(opcode, payload) of the next frame; None at EOF."""
        deadline = time.monotonic() + timeout
        if not self._fill(2, deadline):
            return None
        n = self.buf[1] & 0x7F
        off = 2
        if n == 126:
            if not self._fill(4, deadline):
                return None
            n, off = int.from_bytes(self.buf[2:4], "big"), 4
        elif n == 127:
            if not self._fill(10, deadline):
                return None
            n, off = int.from_bytes(self.buf[2:10], "big"), 10
        if not self._fill(off + n, deadline):
            return None
        op, payload = self.buf[0] & 0x0F, self.buf[off : off + n]
        #: The first byte of the last frame read (FIN, RSV1-3, opcode) and its MASK bit.
        self.last_b0, self.last_masked = self.buf[0], bool(self.buf[1] & 0x80)
        self.buf = self.buf[off + n :]
        return op, payload

    def until_close(self, timeout: float = 5.0) -> tuple[list[bytes], int | None]:
        """Text payloads seen, then the close code (None if the socket just ended)."""
        texts: list[bytes] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.next(max(0.05, deadline - time.monotonic()))
            if got is None:
                return texts, None
            op, payload = got
            if op == OP_CLOSE:
                self.close_payload = payload
                return texts, int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            if op == OP_TEXT:
                texts.append(payload)
        raise TimeoutError("no close frame in time")

    def reply(self, msg_id: str, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.next(max(0.05, deadline - time.monotonic()))
            assert got is not None, f"socket closed before the reply to {msg_id}"
            op, payload = got
            if op == OP_TEXT:
                msg: dict[str, Any] = orjson.loads(payload)
                if msg.get("id") == msg_id:
                    return msg
            assert op != OP_CLOSE, f"closed {payload[:2].hex()} before the reply to {msg_id}"
