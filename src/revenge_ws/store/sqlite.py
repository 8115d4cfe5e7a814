"""The embedded notification store: one SQLite file, reached through aiosqlite.

Durability settings, and why:

* ``journal_mode=WAL``: readers never block the writer, and a commit is one append to the
  WAL instead of a rewrite of the pages.
* ``synchronous=FULL``: the contract stores a notification durably *before* it is pushed.
  In WAL mode ``NORMAL`` survives a crash of the process but a power loss or OS crash can
  roll back the last commits, i.e. lose notifications a client may already have seen.
  ``FULL`` syncs the WAL at every commit; :meth:`create_many` writes all recipients in one
  commit, so the cost is one fsync per publish, not per user.
* ``busy_timeout``: another process (a second hub, a backup) may hold the write lock for a
  moment; waiting beats failing.

One connection serves the whole store, and an :class:`asyncio.Lock` keeps the statements of
one transaction from interleaving with those of another coroutine. Writes start with
``BEGIN IMMEDIATE``, which takes SQLite's write lock up front: the de-duplication check and
the insert that follows are atomic even against other processes using the same file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Final

import aiosqlite

from ..exceptions import StoreError, StoreUnavailable
from . import base
from .base import COLUMNS, Notification, NotificationStore, OutboxEvent, PageQuery

__all__ = ["SCHEMA_VERSION", "SQLiteNotificationStore"]

_COLUMNS: Final = ", ".join(COLUMNS)

# Each entry migrates the schema from version i to i + 1; never edit a released entry.
_MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """
        CREATE TABLE notifications (
            id TEXT PRIMARY KEY,
            user_id TEXT NOT NULL,
            notification_type TEXT NOT NULL,
            title TEXT NOT NULL,
            body TEXT,
            priority TEXT NOT NULL
                CHECK (priority IN ('critical', 'high', 'normal', 'low')),
            content_id TEXT,
            icon_url TEXT,
            action_url TEXT,
            created_at INTEGER NOT NULL,
            is_read INTEGER NOT NULL DEFAULT 0,
            read_at INTEGER,
            acked INTEGER NOT NULL DEFAULT 0,
            dedupe_key TEXT,
            dedupe_scope TEXT
        )
        """,
        "CREATE INDEX notifications_user_created ON notifications (user_id, created_at, id)",
        "CREATE INDEX notifications_pending ON notifications (user_id, created_at, id)"
        " WHERE acked = 0",
        "CREATE INDEX notifications_unread ON notifications (user_id, created_at, id)"
        " WHERE is_read = 0",
        "CREATE INDEX notifications_dedupe ON notifications (user_id, dedupe_scope, created_at)"
        " WHERE dedupe_scope IS NOT NULL",
        "CREATE INDEX notifications_created ON notifications (created_at)",
        """
        CREATE TABLE notification_preferences (
            user_id TEXT NOT NULL,
            notification_type TEXT NOT NULL,
            push INTEGER NOT NULL,
            PRIMARY KEY (user_id, notification_type)
        ) WITHOUT ROWID
        """,
    ),
    (
        # 2: the outbox of events for the backend (playback events, contract §13).
        """
        CREATE TABLE outbox (
            event_id TEXT PRIMARY KEY,
            topic TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            lease_until INTEGER NOT NULL DEFAULT 0,
            payload TEXT NOT NULL
        )
        """,
        "CREATE INDEX outbox_oldest ON outbox (topic, created_at, event_id)",
    ),
)
SCHEMA_VERSION: Final = len(_MIGRATIONS)

# Old SQLite builds allow 999 bound parameters per statement; stay well under it.
_CHUNK: Final = 500

# Primary result codes that describe the environment (locks, disk, I/O), not a bug: retryable.
_TRANSIENT: Final = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
    }
)


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _marks(n: int) -> str:
    return ", ".join("?" * n)


@contextlib.contextmanager
def _mapped(what: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None and code & 0xFF in _TRANSIENT:
            raise StoreUnavailable(f"SQLite store: {what} failed: {exc}") from exc
        raise StoreError(f"SQLite store: {what} failed: {exc}") from exc
    except ValueError as exc:
        # aiosqlite's way of saying the connection was closed under us.
        if "connection" in str(exc).lower():
            raise StoreUnavailable(f"SQLite store: {what} failed: {exc}") from exc
        raise


async def _reap_worker(conn: aiosqlite.Connection) -> None:
    """Wait for the worker thread of a connection that failed to open.

    aiosqlite stops that thread without waiting for it, and the thread then reports to this
    event loop: if the loop is closed by then, the thread dies with "Event loop is closed".
    """
    thread = getattr(conn, "_thread", None)
    if isinstance(thread, threading.Thread) and thread.is_alive():
        await asyncio.to_thread(thread.join, 5.0)


class SQLiteNotificationStore(NotificationStore):
    """:class:`~revenge_ws.store.base.NotificationStore` in one SQLite file.

    ``path`` is a file path (its directory is created when missing) or ``":memory:"``
    (tests only: nothing survives :meth:`close`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        retention_days: float = base.DEFAULT_RETENTION_DAYS,
        critical_retention_days: float = base.DEFAULT_CRITICAL_RETENTION_DAYS,
        dedupe_window_ms: int = base.DEFAULT_DEDUPE_WINDOW_MS,
        busy_timeout_ms: int = 5000,
    ) -> None:
        super().__init__(retention_days, critical_retention_days, dedupe_window_ms)
        self.path = os.fspath(path)
        self._busy_timeout_ms = int(busy_timeout_ms)
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"SQLiteNotificationStore({self.path!r})"

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        async with self._lock:
            if self._db is not None:
                return
            if self.path != ":memory:":
                try:
                    Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise StoreUnavailable(
                        f"SQLite store: cannot create {self.path}: {exc}"
                    ) from exc
            # isolation_level=None: this module issues BEGIN/COMMIT itself, the sqlite3
            # module's implicit transactions would defeat BEGIN IMMEDIATE.
            pending = aiosqlite.connect(self.path, isolation_level=None)
            try:
                with _mapped(f"opening {self.path}"):
                    db = await pending
            except BaseException:
                await _reap_worker(pending)
                raise
            try:
                with _mapped(f"opening {self.path}"):
                    await db.execute("PRAGMA journal_mode=WAL")
                    await db.execute("PRAGMA synchronous=FULL")
                    await db.execute(f"PRAGMA busy_timeout={self._busy_timeout_ms}")
                    await self._migrate(db)
            except BaseException:
                await db.close()
                raise
            self._db = db

    async def _migrate(self, db: aiosqlite.Connection) -> None:
        await db.execute("BEGIN IMMEDIATE")
        try:
            await db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            rows = list(await db.execute_fetchall("SELECT max(version) FROM schema_version"))
            version = rows[0][0] or 0
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"SQLite store {self.path}: schema version {version} is newer than this "
                    f"revenge-ws understands ({SCHEMA_VERSION}); upgrade revenge-ws"
                )
            for statements in _MIGRATIONS[version:]:
                for statement in statements:
                    await db.execute(statement)
            if version < SCHEMA_VERSION:
                await db.execute("DELETE FROM schema_version")
                await db.execute(
                    "INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,)
                )
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                await db.execute("ROLLBACK")
            raise
        await db.execute("COMMIT")

    async def close(self) -> None:
        async with self._lock:
            db, self._db = self._db, None
            if db is not None:
                with _mapped("closing"):
                    await db.close()

    async def ping(self) -> None:
        async with self._read() as db:
            await db.execute_fetchall("SELECT version FROM schema_version")

    # -- plumbing --------------------------------------------------------------------------

    def _require(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreUnavailable("SQLite store is not started (or already closed)")
        return self._db

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[aiosqlite.Connection]:
        """One or more statements that need no snapshot spanning them."""
        async with self._lock:
            db = self._require()
            with _mapped("query"):
                yield db

    @contextlib.asynccontextmanager
    async def _transaction(self, *, write: bool) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            db = self._require()
            with _mapped("transaction"):
                try:
                    # Inside the try: a cancellation while BEGIN is queued still leaves it to
                    # run on the connection's thread, and must be followed by a ROLLBACK.
                    await db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                    yield db
                except BaseException:
                    # Queued before any further cancellation can land, so the next holder of
                    # the lock finds the transaction closed. Fails harmlessly if BEGIN did.
                    with contextlib.suppress(sqlite3.Error, ValueError):
                        await db.execute("ROLLBACK")
                    raise
                await db.execute("COMMIT")

    # -- writes: each in one BEGIN IMMEDIATE transaction ---------------------------------

    async def _create(
        self, users: list[str], new: Notification, scope: str | None
    ) -> tuple[dict[str, Notification], dict[str, Notification]]:
        ms = new.created_at
        existing: dict[str, Notification] = {}
        async with self._transaction(write=True) as db:
            if scope is not None and self.dedupe_window_ms > 0:
                for chunk in _chunks(users):
                    rows = await db.execute_fetchall(
                        f"SELECT {_COLUMNS} FROM notifications"  # noqa: S608 (placeholders only)
                        " WHERE dedupe_scope = ? AND created_at > ?"
                        f" AND user_id IN ({_marks(len(chunk))}) ORDER BY created_at, id",
                        (scope, ms - self.dedupe_window_ms, *chunk),
                    )
                    for r in rows:  # ascending, so the newest match wins
                        existing[r[1]] = Notification.from_row(r)
            fresh = base.for_users(new, [u for u in users if u not in existing])
            if fresh:
                await db.executemany(
                    f"INSERT INTO notifications ({_COLUMNS}, dedupe_scope)"  # noqa: S608
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, NULL, 0, ?, ?)",
                    [
                        (
                            n.id,
                            n.user_id,
                            n.notification_type,
                            n.title,
                            n.body,
                            n.priority,
                            n.content_id,
                            n.icon_url,
                            n.action_url,
                            n.created_at,
                            n.dedupe_key,
                            scope,
                        )
                        for n in fresh.values()
                    ],
                )
        return fresh, existing

    async def _owned(
        self,
        db: aiosqlite.Connection,
        user_id: str,
        ids: Sequence[str],
        update: str,
        update_params: tuple[object, ...] = (),
    ) -> list[str]:
        owned: set[str] = set()
        for chunk in _chunks(ids):
            marks = _marks(len(chunk))
            rows = await db.execute_fetchall(
                f"SELECT id FROM notifications WHERE user_id = ? AND id IN ({marks})",  # noqa: S608
                (user_id, *chunk),
            )
            found = [r[0] for r in rows]
            if found:
                await db.execute(
                    f"UPDATE notifications SET {update} WHERE user_id = ?"  # noqa: S608
                    f" AND id IN ({_marks(len(found))})",
                    (*update_params, user_id, *found),
                )
            owned.update(found)
        return [i for i in ids if i in owned]

    async def ack(self, user_id: str, ids: Sequence[str]) -> list[str]:
        wanted = base.validate_ids(ids)
        if not wanted:
            return []
        async with self._transaction(write=True) as db:
            return await self._owned(db, user_id, wanted, "acked = 1")

    async def mark_read(
        self, user_id: str, ids: Sequence[str], *, now_ms: float | None = None
    ) -> list[str]:
        wanted = base.validate_ids(ids)
        if not wanted:
            return []
        ms = base.stamp(now_ms)
        async with self._transaction(write=True) as db:
            return await self._owned(
                db, user_id, wanted, "is_read = 1, acked = 1, read_at = coalesce(read_at, ?)", (ms,)
            )

    async def read_all(self, user_id: str, now_ms: float | None = None) -> int:
        ms = base.stamp(now_ms)
        async with self._transaction(write=True) as db:
            cur = await db.execute(
                "UPDATE notifications SET is_read = 1, acked = 1, read_at = ?"
                " WHERE user_id = ? AND is_read = 0",
                (ms, user_id),
            )
            return int(cur.rowcount)

    async def set_preferences(self, user_id: str, prefs: Mapping[str, bool | None]) -> None:
        checked = base.validate_preferences(prefs)
        if not checked:
            return
        async with self._transaction(write=True) as db:
            for notification_type, push in checked.items():
                if push is None:
                    await db.execute(
                        "DELETE FROM notification_preferences"
                        " WHERE user_id = ? AND notification_type = ?",
                        (user_id, notification_type),
                    )
                else:
                    await db.execute(
                        "INSERT OR REPLACE INTO notification_preferences"
                        " (user_id, notification_type, push) VALUES (?, ?, ?)",
                        (user_id, notification_type, int(push)),
                    )

    async def cleanup(self, now_ms: float | None = None) -> int:
        normal, critical = base.retention_cutoffs(
            now_ms, self.retention_days, self.critical_retention_days
        )
        async with self._transaction(write=True) as db:
            a = await db.execute(
                "DELETE FROM notifications WHERE created_at < ? AND priority <> 'critical'",
                (normal,),
            )
            b = await db.execute(
                "DELETE FROM notifications WHERE created_at < ? AND priority = 'critical'",
                (critical,),
            )
            return int(a.rowcount) + int(b.rowcount)

    # -- the outbox ------------------------------------------------------------------------

    async def _outbox_add(self, events: list[OutboxEvent]) -> None:
        async with self._transaction(write=True) as db:
            await db.executemany(
                "INSERT OR IGNORE INTO outbox (event_id, topic, created_at, payload)"
                " VALUES (?, ?, ?, ?)",
                [(e.event_id, e.topic, e.created_at, e.payload) for e in events],
            )

    async def _outbox_claim(
        self, topic: str, limit: int, now: int, lease_ms: int
    ) -> list[OutboxEvent]:
        # BEGIN IMMEDIATE holds the write lock from the read to the update: another
        # process using the same file cannot claim the same rows in between.
        async with self._transaction(write=True) as db:
            rows = list(
                await db.execute_fetchall(
                    "SELECT event_id, topic, created_at, payload FROM outbox"
                    " WHERE topic = ? AND lease_until <= ?"
                    " ORDER BY created_at, event_id LIMIT ?",
                    (topic, now, limit),
                )
            )
            for chunk in _chunks([r[0] for r in rows]):
                await db.execute(
                    f"UPDATE outbox SET lease_until = ?"  # noqa: S608 (placeholders only)
                    f" WHERE event_id IN ({_marks(len(chunk))})",
                    (now + lease_ms, *chunk),
                )
        return [OutboxEvent(r[0], r[1], r[2], r[3]) for r in rows]

    async def _outbox_release(self, ids: list[str]) -> None:
        async with self._transaction(write=True) as db:
            for chunk in _chunks(ids):
                await db.execute(
                    "UPDATE outbox SET lease_until = 0"  # noqa: S608 (placeholders only)
                    f" WHERE event_id IN ({_marks(len(chunk))})",
                    tuple(chunk),
                )

    async def _outbox_delete(self, ids: list[str]) -> int:
        deleted = 0
        async with self._transaction(write=True) as db:
            for chunk in _chunks(ids):
                cur = await db.execute(
                    f"DELETE FROM outbox WHERE event_id IN ({_marks(len(chunk))})",  # noqa: S608
                    tuple(chunk),
                )
                deleted += int(cur.rowcount)
        return deleted

    async def outbox_stats(self, topic: str) -> tuple[int, int | None]:
        async with self._read() as db:
            rows = list(
                await db.execute_fetchall(
                    "SELECT count(*), min(created_at) FROM outbox WHERE topic = ?", (topic,)
                )
            )
        return int(rows[0][0]), rows[0][1]

    # -- reads -----------------------------------------------------------------------------

    async def _pending(self, user_id: str, limit: int, excluded: list[str]) -> list[Notification]:
        # A muted-type list is short (one entry per type the user muted); no chunking needed.
        not_in = f" AND notification_type NOT IN ({_marks(len(excluded))})" if excluded else ""
        async with self._read() as db:
            rows = await db.execute_fetchall(
                f"SELECT {_COLUMNS} FROM notifications"  # noqa: S608 (placeholders only)
                f" WHERE user_id = ? AND acked = 0{not_in}"
                " ORDER BY created_at, id LIMIT ?",
                (user_id, *excluded, limit),
            )
        return [Notification.from_row(r) for r in rows]

    async def _pending_of(self, users: list[str], limit: int) -> list[Notification]:
        async with self._read() as db:
            rows = await db.execute_fetchall(
                f"SELECT {_COLUMNS} FROM ("  # noqa: S608 (placeholders only)
                " SELECT n.*, ROW_NUMBER() OVER"
                " (PARTITION BY n.user_id ORDER BY n.created_at, n.id) AS rank"
                " FROM notifications n"
                f" WHERE n.user_id IN ({_marks(len(users))}) AND n.acked = 0"
                " AND NOT EXISTS (SELECT 1 FROM notification_preferences p"
                " WHERE p.user_id = n.user_id"
                " AND p.notification_type = n.notification_type AND p.push = 0)"
                ") WHERE rank <= ? ORDER BY user_id, created_at, id",
                (*users, limit),
            )
        return [Notification.from_row(r) for r in rows]

    async def _page(self, user_id: str, q: PageQuery) -> tuple[list[Notification], int]:
        limit, before_id, before_ms = q.limit, q.before_id, q.before_ms
        where = "user_id = ?"
        params: list[object] = [user_id]
        if q.unread_only:
            where += " AND is_read = 0"
        async with self._transaction(write=False) as db:
            if before_id is not None:
                rows = list(
                    await db.execute_fetchall(
                        "SELECT created_at FROM notifications WHERE user_id = ? AND id = ?",
                        (user_id, before_id),
                    )
                )
                if not rows:
                    raise base.unknown_cursor()
                where += " AND (created_at < ? OR (created_at = ? AND id < ?))"
                params += [rows[0][0], rows[0][0], before_id]
            elif before_ms is not None:
                where += " AND created_at < ?"
                params.append(before_ms)
            items = await db.execute_fetchall(
                f"SELECT {_COLUMNS} FROM notifications WHERE {where}"  # noqa: S608
                " ORDER BY created_at DESC, id DESC LIMIT ?",
                (*params, limit),
            )
            count = list(
                await db.execute_fetchall(
                    "SELECT count(*) FROM notifications WHERE user_id = ? AND is_read = 0",
                    (user_id,),
                )
            )
        return [Notification.from_row(r) for r in items], int(count[0][0])

    async def get(self, user_id: str, id: str) -> Notification | None:
        async with self._read() as db:
            rows = list(
                await db.execute_fetchall(
                    f"SELECT {_COLUMNS} FROM notifications"  # noqa: S608
                    " WHERE user_id = ? AND id = ?",
                    (user_id, id),
                )
            )
        return Notification.from_row(rows[0]) if rows else None

    async def get_preferences(self, user_id: str) -> dict[str, bool]:
        async with self._read() as db:
            rows = await db.execute_fetchall(
                "SELECT notification_type, push FROM notification_preferences WHERE user_id = ?",
                (user_id,),
            )
        return {r[0]: bool(r[1]) for r in rows}
