"""Fixtures that run the notification-store tests against every backend.

``backend`` is parametrized over SQLite and PostgreSQL; ``store`` is a started store of that
backend. PostgreSQL tests use a private database created for the session
(``revenge_test_<random>``, dropped at the end) on the server named by
``REVENGE_TEST_PG_DSN`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``), and a
private schema per test. When that server is unreachable the PostgreSQL tests are skipped,
except when ``CI`` is set: then they fail, so CI never passes without them.

Import these fixtures into the test module (they are not in conftest.py on purpose).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import pytest

from revenge_ws.store import NotificationStore, redact_url
from revenge_ws.store.postgres import PostgresNotificationStore
from revenge_ws.store.sqlite import SQLiteNotificationStore

__all__ = ["Backend", "backend", "free_port", "pg_database", "store", "unreachable_store"]

PG_DSN_ENV = "REVENGE_TEST_PG_DSN"
DEFAULT_PG_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"

T = TypeVar("T")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def run_in_thread(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion on a private loop in another thread.

    Session-wide setup happens outside the tests' own (function-scoped) loops, so nothing
    bound to one loop leaks into another.
    """
    box: dict[str, Any] = {}

    async def main() -> T:
        return await make()

    def target() -> None:
        try:
            box["result"] = asyncio.run(main())
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name="store-fixture-setup")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]  # type: ignore[no-any-return]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """DSN of a database private to this test session."""
    server = os.environ.get(PG_DSN_ENV, DEFAULT_PG_DSN)
    name = f"revenge_test_{secrets.token_hex(6)}"
    try:
        import asyncpg
    except ImportError as exc:  # pragma: no cover - asyncpg is a test dependency
        _unavailable(f"asyncpg is not installed: {exc}")

    async def create() -> None:
        conn = await asyncpg.connect(server, timeout=5)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    try:
        run_in_thread(create)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        _unavailable(f"PostgreSQL at {redact_url(server)} is unreachable ({exc!r})")

    yield _with_database(server, name)

    async def drop() -> None:
        conn = await asyncpg.connect(server, timeout=5)
        try:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = $1 AND pid <> pg_backend_pid()",
                name,
            )
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        finally:
            await conn.close()

    run_in_thread(drop)


def _unavailable(reason: str) -> Any:
    if in_ci():
        pytest.fail(
            f"{reason}; CI is set, so the PostgreSQL store tests must run: start PostgreSQL "
            f"or point {PG_DSN_ENV} at one",
            pytrace=False,
        )
    pytest.skip(f"{reason}; set {PG_DSN_ENV} to run the PostgreSQL store tests")


@dataclass
class Backend:
    """One backend under test: opens stores on the same private database, closes them all."""

    name: str
    module: str
    location: str
    schema: str = ""
    #: Options that make a blocked statement fail fast instead of waiting for the default.
    fast_fail: dict[str, Any] = field(default_factory=dict)
    opened: list[NotificationStore] = field(default_factory=list)

    def make(self, **options: Any) -> NotificationStore:
        """A new, not yet started store on this backend's database."""
        if self.name == "sqlite":
            return SQLiteNotificationStore(self.location, **options)
        return PostgresNotificationStore(self.location, schema=self.schema, **options)

    async def open(self, **options: Any) -> NotificationStore:
        store = self.make(**options)
        self.opened.append(store)
        await store.start()
        return store

    async def close_all(self) -> None:
        for store in self.opened:
            await store.close()

    async def execute(self, sql: str) -> None:
        """Run raw SQL (``{s}`` is the schema prefix) outside any store."""
        if self.name == "sqlite":
            with contextlib.closing(sqlite3.connect(self.location)) as conn:
                conn.execute(sql.replace("{s}", ""))
                conn.commit()
            return
        import asyncpg

        conn = await asyncpg.connect(self.location)
        try:
            await conn.execute(sql.replace("{s}", self.schema + "."))
        finally:
            await conn.close()

    @contextlib.asynccontextmanager
    async def write_locked(self) -> AsyncIterator[None]:
        """Hold the notifications table's write lock from another connection."""
        if self.name == "sqlite":
            conn = sqlite3.connect(self.location, isolation_level=None)
            try:
                conn.execute("BEGIN IMMEDIATE")
                yield
                conn.execute("ROLLBACK")
            finally:
                conn.close()
            return
        import asyncpg

        pg = await asyncpg.connect(self.location)
        try:
            async with pg.transaction():
                await pg.execute(f"LOCK TABLE {self.schema}.notifications IN EXCLUSIVE MODE")
                yield
        finally:
            await pg.close()


@pytest.fixture(
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        b = Backend(
            name="sqlite",
            module="revenge_ws.store.sqlite",
            location=str(tmp_path / "store" / "notifications.db"),
            fast_fail={"busy_timeout_ms": 100},
        )
    else:
        b = Backend(
            name="postgres",
            module="revenge_ws.store.postgres",
            location=request.getfixturevalue("pg_database"),
            schema=f"t_{secrets.token_hex(6)}",
            fast_fail={"command_timeout": 0.5},
        )
    try:
        yield b
    finally:
        await b.close_all()


@pytest.fixture
async def store(backend: Backend) -> NotificationStore:
    return await backend.open()


@pytest.fixture(
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
async def unreachable_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[NotificationStore]:
    """A store whose database cannot be reached (no PostgreSQL server needed)."""
    s: NotificationStore
    if request.param == "sqlite":
        # A directory where the database file should be: SQLite cannot open it.
        s = SQLiteNotificationStore(tmp_path)
    else:
        s = PostgresNotificationStore(
            f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/test", connect_timeout=2
        )
    try:
        yield s
    finally:
        await s.close()
