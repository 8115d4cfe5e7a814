"""Fixtures for the broker tests: a shared private redis-server, a restartable one, and
brokers that are always closed.

``redis_url`` is one private redis-server per test session (``tests.helpers.redis_server``);
tests isolate themselves with a unique key prefix. Tests that stop, flush or pause Redis
use ``redis_proc``, a private server of their own that can be stopped and started again
on the same port. Without a redis-server binary these tests are skipped, except when
``CI`` is set: then they fail, so CI never passes without them.

Import these fixtures into the test module (they are not in conftest.py on purpose).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from revenge_ws.broker.base import Publication
from revenge_ws.broker.redis import RedisBroker

from .helpers import free_port, redis_server

__all__ = [
    "MakeBroker",
    "Recorder",
    "RedisProcess",
    "eventually",
    "kill_broker",
    "make_redis_broker",
    "prefix",
    "raw_redis",
    "redis_proc",
    "redis_url",
]


class Recorder:
    """A :class:`~revenge_ws.broker.base.BrokerHandler` that remembers every call."""

    def __init__(self) -> None:
        self.pubs: list[Publication] = []
        self.controls: list[dict[str, Any]] = []
        self.reconnects = 0

    def on_publication(self, pub: Publication) -> None:
        self.pubs.append(pub)

    def on_control(self, message: dict[str, Any]) -> None:
        self.controls.append(message)

    def on_reconnect(self) -> None:
        self.reconnects += 1

    def seqs(self, channel: str | None = None) -> list[int]:
        return [p.seq for p in self.pubs if channel is None or p.channel == channel]


async def eventually(
    check: Callable[[], object], timeout: float = 5.0, interval: float = 0.02
) -> None:
    """Poll ``check`` (sync or async) until it is truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(interval)


def _binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            raise RuntimeError("redis-server is not installed (CI must install it)")
        pytest.skip("redis-server not installed")
    return binary


class RedisProcess:
    """A private redis-server (no persistence) that can be stopped and restarted on
    the same port, to play an outage or a restart that lost every key."""

    def __init__(self) -> None:
        self.binary = _binary()
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="revenge-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.proc is None
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                if self._server_pid() == self.proc.pid:
                    return
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def _server_pid(self) -> int:
        """The pid of the server answering on our port: a restart on the same port must
        not end up talking to another process that took the port meanwhile."""
        with socket.create_connection(("127.0.0.1", self.port), 0.5) as sock:
            sock.settimeout(0.5)
            sock.sendall(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")
            data = b""
            while b"process_id:" not in data or not data.endswith(b"\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        for line in data.split(b"\r\n"):
            if line.startswith(b"process_id:"):
                return int(line.split(b":", 1)[1])
        return -1

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.kill()  # like a crash: no goodbye to the clients
        self.proc.wait(5)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture
def redis_proc() -> Iterator[RedisProcess]:
    proc = RedisProcess()
    proc.start()
    try:
        yield proc
    finally:
        proc.cleanup()


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test only (tests share the session's redis-server)."""
    return "t" + secrets.token_hex(4)


@pytest.fixture
async def raw_redis(redis_url: str) -> AsyncIterator[Callable[[str], aioredis.Redis]]:
    """``raw_redis(url)``: a plain client for the test's own commands (closed after)."""
    clients: list[aioredis.Redis] = []

    def make(url: str = redis_url) -> aioredis.Redis:
        client = aioredis.Redis.from_url(url, protocol=2)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


MakeBroker = Callable[..., Awaitable[tuple[RedisBroker, Recorder]]]


@pytest.fixture
async def make_redis_broker(redis_url: str, prefix: str) -> AsyncIterator[MakeBroker]:
    """``await make_redis_broker(node_id="a", url=..., **kw)``: a started broker and its
    recording handler; every broker is closed at the end of the test."""
    brokers: list[RedisBroker] = []

    async def make(
        node_id: str = "a", url: str | None = None, start: bool = True, **kw: Any
    ) -> tuple[RedisBroker, Recorder]:
        # Generous: a loaded CI machine must not turn slowness into failures. Tests that
        # measure failing fast set their own.
        kw.setdefault("timeout", 3.0)
        kw.setdefault("prefix", prefix)
        kw.setdefault("reconnect_max", 0.5)
        broker = RedisBroker(url or redis_url, node_id=node_id, **kw)
        brokers.append(broker)
        handler = Recorder()
        if start:
            await broker.start(handler)
        return broker, handler

    yield make
    for broker in brokers:
        async with asyncio.timeout(15):
            await broker.close()


async def kill_broker(broker: RedisBroker) -> None:
    """Stop a broker the way SIGKILL stops a node: no cleanup, nothing removed."""
    for task in broker._tasks:
        task.cancel()
    async with asyncio.timeout(10):
        await asyncio.gather(*broker._tasks, return_exceptions=True)
    broker._tasks = []
    broker._closed = True
    async with asyncio.timeout(10):
        await broker._redis.aclose()
        await broker._pool.disconnect()
