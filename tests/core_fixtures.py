"""Fakes for the sans-I/O core's unit tests: a transport, a loop, a connection, claims."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from revenge_ws.auth import Claims
from revenge_ws.broker.base import Publication
from revenge_ws.core.connection import Connection
from revenge_ws.core.outbox import Outbox
from revenge_ws.core.session import Session, SessionLimits


def make_session(**kw: Any) -> Session:
    kw.setdefault("inbound_burst", 10_000)
    return Session("s1", "alice", expires_at=1000.0, limits=SessionLimits(**kw), now=0.0)


def claims(sub: str = "alice", role: str = "user", libraries: list[str] | None = None) -> Claims:
    return Claims(
        sub=sub,
        exp=2e9,
        role=role,
        libraries=frozenset(libraries) if libraries is not None else None,
    )


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed: tuple[int, str] | None = None
        self.backlog = 0
        self.pings = 0

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def buffered(self) -> int:
        return self.backlog

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def ping(self) -> None:
        self.pings += 1


class FakeLoop:
    def __init__(self) -> None:
        self.soon: list[tuple[Callable[..., object], tuple[Any, ...]]] = []
        self.later: list[tuple[float, Callable[..., object]]] = []

    def call_soon(self, cb: Callable[..., object], *args: Any) -> None:
        self.soon.append((cb, args))

    def call_later(self, delay: float, cb: Callable[..., object], *args: Any) -> None:
        self.later.append((delay, cb))

    def run(self) -> None:
        while self.soon:
            cb, args = self.soon.pop(0)
            cb(*args)


def make_conn(
    loop: FakeLoop, sid: str = "c1", user: str = "alice", limit: int = 1 << 20
) -> tuple[Connection, FakeTransport]:
    t = FakeTransport()
    conn = Connection(
        session_id=sid,
        claims=claims(user),
        session=make_session(),
        transport=t,
        loop=loop,
        outbox=Outbox(limit),
    )
    return conn, t


def pub(channel: str, seq: int, mtype: str = "t", epoch: str = "e") -> Publication:
    return Publication(channel, mtype, seq, epoch, {"n": seq}, "ts", 0.0)
