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
    "SentinelCluster",
    "eventually",
    "kill_broker",
    "make_redis_broker",
    "prefix",
    "raw_redis",
    "redis_proc",
    "redis_url",
    "sentinel_cluster",
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

    def __init__(self, *extra: str, sentinel_conf: str | None = None) -> None:
        self.binary = _binary()
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="revenge-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        #: More redis-server arguments (e.g. ``--replicaof``).
        self.extra = list(extra)
        #: Sentinel mode: this configuration (``port`` and ``dir`` are added) is written
        #: to a file the sentinel may rewrite.
        self.sentinel_conf = sentinel_conf

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.proc is None
        if self.sentinel_conf is not None:
            conf = os.path.join(self.dir, "sentinel.conf")
            with open(conf, "w") as f:
                f.write(f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n{self.sentinel_conf}")
            cmd = [self.binary, conf, "--sentinel"]
        else:
            cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "no", "--dir", self.dir, *self.extra]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


class SentinelCluster:
    """A master, two replicas and three Sentinels (quorum 2, ``down-after-milliseconds``
    1000), each a private process on a free port; :meth:`cleanup` stops them all."""

    MASTER = "mymaster"

    def __init__(self) -> None:
        self.master = RedisProcess()
        self.replicas: list[RedisProcess] = []
        self.sentinels: list[RedisProcess] = []

    @property
    def data_nodes(self) -> list[RedisProcess]:
        return [self.master, *self.replicas]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.MASTER}/0"

    def start(self) -> None:
        self.master.start()
        for _ in range(2):
            replica = RedisProcess("--replicaof", "127.0.0.1", str(self.master.port))
            self.replicas.append(replica)
            replica.start()
        self._wait(lambda: all(self._info(r.port).get("master_link_status") == "up"
                               for r in self.replicas), "replicas in sync")  # fmt: skip
        conf = (
            "sentinel resolve-hostnames no\n"
            f"sentinel monitor {self.MASTER} 127.0.0.1 {self.master.port} 2\n"
            f"sentinel down-after-milliseconds {self.MASTER} 1000\n"
            f"sentinel failover-timeout {self.MASTER} 10000\n"
            f"sentinel parallel-syncs {self.MASTER} 2\n"
        )
        for _ in range(3):
            sentinel = RedisProcess(sentinel_conf=conf)
            self.sentinels.append(sentinel)
            sentinel.start()

        def settled() -> bool:
            for s in self.sentinels:
                state = self._sentinel_master(s.port)
                if state.get("num-slaves") != "2" or state.get("num-other-sentinels") != "2":
                    return False
            return True

        self._wait(settled, "sentinels see both replicas and each other", 30)

    def master_port(self) -> int:
        """The master's port, as the first Sentinel sees it now."""
        reply = _command(self.sentinels[0].port, "SENTINEL", "get-master-addr-by-name",
                         self.MASTER)  # fmt: skip
        assert isinstance(reply, list)
        return int(reply[1])

    def process_on(self, port: int) -> RedisProcess:
        return next(p for p in self.data_nodes if p.port == port)

    def _info(self, port: int) -> dict[str, str]:
        text = _command(port, "INFO", "replication")
        assert isinstance(text, bytes)
        lines = (line.split(":", 1) for line in text.decode().splitlines() if ":" in line)
        return dict((k, v) for k, v in lines)

    def _sentinel_master(self, port: int) -> dict[str, str]:
        reply = _command(port, "SENTINEL", "master", self.MASTER)
        if not isinstance(reply, list):
            return {}
        flat = [x.decode() if isinstance(x, bytes) else str(x) for x in reply]
        return dict(zip(flat[::2], flat[1::2], strict=False))

    @staticmethod
    def _wait(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, ValueError):
                if check():
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis sentinel cluster: {what}: not reached in time")
            time.sleep(0.05)

    def cleanup(self) -> None:
        for proc in [*self.sentinels, *self.data_nodes]:
            proc.cleanup()


def _command(port: int, *args: str) -> Any:
    """One command over a plain socket (RESP2), for fixtures that must not need an event
    loop; returns bytes, an int, a list, or None."""
    out = b"".join(b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args)
    with socket.create_connection(("127.0.0.1", port), 2) as sock:
        sock.settimeout(2)
        sock.sendall(b"*%d\r\n" % len(args) + out)
        f = sock.makefile("rb")
        return _read_reply(f)


def _read_reply(f: Any) -> Any:
    line = f.readline().rstrip(b"\r\n")
    kind, rest = line[:1], line[1:]
    if kind == b"+":
        return rest
    if kind == b"-":
        raise ValueError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else f.read(n + 2)[:-2]
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read_reply(f) for _ in range(n)]
    raise ValueError(f"unexpected reply {line!r}")


@pytest.fixture
def sentinel_cluster() -> Iterator[SentinelCluster]:
    cluster = SentinelCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()


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
