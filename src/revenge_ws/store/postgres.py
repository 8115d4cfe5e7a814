"""The PostgreSQL notification store (asyncpg), for deployments with several hub nodes.

The tables live in their own schema (``revenge_ws`` by default) so the store can share the
media server's database without colliding with its own ``notifications`` table. Times are
``bigint`` milliseconds, exactly like the SQLite backend, so both order and compare alike.

De-duplication is atomic through a unique key, not through a read-then-write:
``notification_dedupe`` has one row per ``(user_id, scope)`` naming the latest notification of
that scope. ``create_many`` upserts those rows with ``INSERT ... ON CONFLICT DO UPDATE ...
WHERE <window expired>``. The conflicting row is locked by the upsert whether or not it is
updated, and the ``WHERE`` is evaluated against its latest committed version, so of two
concurrent calls (on any nodes) exactly one gets the row back and inserts; the other waits
for it to commit and then reads the winner's notification. Rows are upserted in ``user_id``
order, so two calls with overlapping recipients lock in the same order and cannot deadlock.

asyncpg is an optional dependency (``pip install revenge-ws[postgres]``); it is imported
when the store starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Final

from ..exceptions import ConfigError, StoreError, StoreUnavailable
from . import base
from .base import COLUMNS, Notification, NotificationStore, OutboxEvent, PageQuery

__all__ = ["SCHEMA_VERSION", "PostgresNotificationStore"]

_COLUMNS: Final = ", ".join(COLUMNS)
_N_COLUMNS: Final = ", ".join("n." + f for f in COLUMNS)

# Each entry migrates the schema from version i to i + 1; never edit a released entry.
# "{s}" is the (validated) schema name.
_MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """
        CREATE TABLE {s}.notifications (
            id text PRIMARY KEY,
            user_id text NOT NULL,
            notification_type text NOT NULL,
            title text NOT NULL,
            body text,
            priority text NOT NULL
                CHECK (priority IN ('critical', 'high', 'normal', 'low')),
            content_id text,
            icon_url text,
            action_url text,
            created_at bigint NOT NULL,
            is_read boolean NOT NULL DEFAULT false,
            read_at bigint,
            acked boolean NOT NULL DEFAULT false,
            dedupe_key text
        )
        """,
        "CREATE INDEX notifications_user_created ON {s}.notifications (user_id, created_at, id)",
        "CREATE INDEX notifications_pending ON {s}.notifications (user_id, created_at, id)"
        " WHERE NOT acked",
        "CREATE INDEX notifications_unread ON {s}.notifications (user_id, created_at, id)"
        " WHERE NOT is_read",
        "CREATE INDEX notifications_created ON {s}.notifications (created_at)",
        """
        CREATE TABLE {s}.notification_dedupe (
            user_id text NOT NULL,
            scope text NOT NULL,
            notification_id text NOT NULL,
            created_at bigint NOT NULL,
            PRIMARY KEY (user_id, scope)
        )
        """,
        "CREATE INDEX notification_dedupe_created ON {s}.notification_dedupe (created_at)",
        """
        CREATE TABLE {s}.notification_preferences (
            user_id text NOT NULL,
            notification_type text NOT NULL,
            push boolean NOT NULL,
            PRIMARY KEY (user_id, notification_type)
        )
        """,
    ),
    (
        # 2: the outbox of events for the backend (playback events, contract §13).
        """
        CREATE TABLE {s}.outbox (
            event_id text PRIMARY KEY,
            topic text NOT NULL,
            created_at bigint NOT NULL,
            lease_until bigint NOT NULL DEFAULT 0,
            payload text NOT NULL
        )
        """,
        "CREATE INDEX outbox_oldest ON {s}.outbox (topic, created_at, event_id)",
    ),
)
SCHEMA_VERSION: Final = len(_MIGRATIONS)

# Serialises schema migrations of hub nodes starting at the same time (concurrent CREATE
# TABLE IF NOT EXISTS can fail on the catalog's unique indexes). Arbitrary but fixed.
_MIGRATION_LOCK: Final = 0x7265_7665_6E67_6501  # "reveng" + 1

_SCHEMA_RE: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")

# SQLSTATE classes meaning "the server or the link is the problem, try again later":
# 08 connection exception, 53 insufficient resources, 57 operator intervention (shutdown,
# cancel), 58 system error (I/O).
_TRANSIENT_CLASSES: Final = frozenset({"08", "53", "57", "58"})

_CLEANUP_BATCH: Final = 5000


def _count(status: str) -> int:
    """The row count of a command tag such as ``UPDATE 3`` or ``DELETE 0``."""
    return int(status.rsplit(" ", 1)[-1])


def _import_asyncpg() -> Any:
    try:
        import asyncpg  # optional dependency: imported only when PostgreSQL is configured
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ConfigError(
            "REVENGE_STORE_URL names PostgreSQL but asyncpg is not installed; "
            "install it with: pip install 'revenge-ws[postgres]'"
        ) from exc
    return asyncpg


class PostgresNotificationStore(NotificationStore):
    """:class:`~revenge_ws.store.base.NotificationStore` in PostgreSQL.

    ``dsn`` is a libpq URL (``postgresql://user:password@host:5432/db``). The pool keeps
    ``min_size``..``max_size`` connections; opening one may take ``connect_timeout`` s,
    waiting for a free one ``acquire_timeout`` s, and a statement ``command_timeout`` s:
    past any of them the call raises :class:`StoreUnavailable` instead of hanging.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "revenge_ws",
        retention_days: float = base.DEFAULT_RETENTION_DAYS,
        critical_retention_days: float = base.DEFAULT_CRITICAL_RETENTION_DAYS,
        dedupe_window_ms: int = base.DEFAULT_DEDUPE_WINDOW_MS,
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: float = 5.0,
        acquire_timeout: float = 5.0,
        command_timeout: float = 10.0,
        close_timeout: float = 10.0,
    ) -> None:
        super().__init__(retention_days, critical_retention_days, dedupe_window_ms)
        if not _SCHEMA_RE.fullmatch(schema):
            # It is interpolated into SQL: only plain lower-case identifiers are accepted.
            raise ValueError(f"invalid PostgreSQL schema name: {schema!r}")
        if not 0 <= min_size <= max_size or max_size < 1:
            raise ValueError("need 0 <= min_size <= max_size and max_size >= 1")
        self._dsn = dsn
        self.schema = schema
        self._min_size = min_size
        self._max_size = max_size
        self._connect_timeout = connect_timeout
        self._acquire_timeout = acquire_timeout
        self._command_timeout = command_timeout
        self._close_timeout = close_timeout
        self._pool: Any = None
        self._asyncpg: Any = None
        self._start_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"PostgresNotificationStore({base.redact_url(self._dsn)!r}, schema={self.schema!r})"

    def _sql(self, template: str) -> str:
        return template.replace("{s}", self.schema)

    # -- errors ----------------------------------------------------------------------------

    def _map(self, exc: BaseException, what: str) -> StoreError:
        pg = self._asyncpg
        message = f"PostgreSQL store: {what} failed: {type(exc).__name__}: {exc}"
        if isinstance(exc, OSError | TimeoutError):
            return StoreUnavailable(message)
        if isinstance(exc, pg.PostgresError):
            sqlstate = str(getattr(exc, "sqlstate", "") or "")
            if sqlstate[:2] in _TRANSIENT_CLASSES:
                return StoreUnavailable(message)
            return StoreError(message)
        if isinstance(exc, pg.exceptions.InternalClientError):
            # What asyncpg raises when the server ended the session while it sat idle in
            # the pool (restart, pg_terminate_backend): the pool replaces the connection.
            return StoreUnavailable(message)
        if isinstance(exc, pg.InterfaceError) and not isinstance(exc, ValueError):
            # "pool is closing", "connection is closed", ... (DataError and
            # ClientConfigurationError are also ValueErrors: those are bugs, not outages).
            return StoreUnavailable(message)
        return StoreError(message)

    def _errors(self) -> tuple[type[BaseException], ...]:
        pg = self._asyncpg
        return (
            OSError,
            TimeoutError,
            pg.PostgresError,
            pg.InterfaceError,
            pg.exceptions.InternalClientError,
        )

    @contextlib.asynccontextmanager
    async def _connection(self, what: str) -> AsyncIterator[Any]:
        pool = self._pool
        if pool is None:
            raise StoreUnavailable("PostgreSQL store is not started (or already closed)")
        try:
            async with pool.acquire(timeout=self._acquire_timeout) as conn:
                yield conn
        except self._errors() as exc:
            raise self._map(exc, what) from exc

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        async with self._start_lock:
            if self._pool is not None:
                return
            self._asyncpg = pg = _import_asyncpg()
            try:
                pool = await pg.create_pool(
                    dsn=self._dsn,
                    min_size=self._min_size,
                    max_size=self._max_size,
                    timeout=self._connect_timeout,
                    command_timeout=self._command_timeout,
                    max_inactive_connection_lifetime=300.0,
                    server_settings={"application_name": "revenge-ws"},
                )
            except self._errors() as exc:
                raise self._map(exc, "connecting") from exc
            self._pool = pool
            try:
                await self._migrate()
            except BaseException:
                self._pool = None
                pool.terminate()
                raise

    async def _migrate(self) -> None:
        async with self._connection("migrating the schema") as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            # Checked first: CREATE SCHEMA IF NOT EXISTS needs the CREATE privilege on the
            # database even when the schema exists, which a locked-down role may lack.
            if not await conn.fetchval(
                "SELECT 1 FROM pg_namespace WHERE nspname = $1", self.schema
            ):
                await conn.execute(self._sql("CREATE SCHEMA {s}"))
            await conn.execute(
                self._sql(
                    "CREATE TABLE IF NOT EXISTS {s}.schema_version (version integer NOT NULL)"
                )
            )
            version = await conn.fetchval(self._sql("SELECT max(version) FROM {s}.schema_version"))
            version = int(version or 0)
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"PostgreSQL store: schema {self.schema} is at version {version}, newer "
                    f"than this revenge-ws understands ({SCHEMA_VERSION}); upgrade revenge-ws"
                )
            for statements in _MIGRATIONS[version:]:
                for statement in statements:
                    await conn.execute(self._sql(statement))
            if version < SCHEMA_VERSION:
                await conn.execute(self._sql("DELETE FROM {s}.schema_version"))
                await conn.execute(
                    self._sql("INSERT INTO {s}.schema_version (version) VALUES ($1)"),
                    SCHEMA_VERSION,
                )

    async def close(self) -> None:
        async with self._start_lock:
            pool, self._pool = self._pool, None
            if pool is None:
                return
            try:
                await asyncio.wait_for(pool.close(), self._close_timeout)
            except TimeoutError:
                # A connection still checked out past the timeout: do not hang shutdown.
                pool.terminate()

    async def ping(self) -> None:
        async with self._connection("ping") as conn:
            await conn.fetchval("SELECT 1")

    # -- writes ----------------------------------------------------------------------------

    async def _create(
        self, users: list[str], new: Notification, scope: str | None
    ) -> tuple[dict[str, Notification], dict[str, Notification]]:
        ms = new.created_at
        ids = {u: base.new_id(ms) for u in users}
        existing: dict[str, Notification] = {}
        async with self._connection("creating notifications") as conn, conn.transaction():
            if scope is not None and self.dedupe_window_ms > 0:
                existing = await self._dedupe(conn, sorted(users), ids, scope, ms)
            fresh = base.for_users(new, [u for u in users if u not in existing], ids)
            if fresh:
                await conn.execute(
                    self._sql(
                        "INSERT INTO {s}.notifications (id, user_id, notification_type, title,"
                        " body, priority, content_id, icon_url, action_url, created_at,"
                        " dedupe_key)"
                        " SELECT t.i, t.u, $3::text, $4::text, $5::text, $6::text, $7::text,"
                        " $8::text, $9::text, $10::bigint, $11::text"
                        " FROM unnest($1::text[], $2::text[]) AS t(i, u)"
                    ),
                    [n.id for n in fresh.values()],
                    list(fresh),
                    new.notification_type,
                    new.title,
                    new.body,
                    new.priority,
                    new.content_id,
                    new.icon_url,
                    new.action_url,
                    ms,
                    new.dedupe_key,
                )
        return fresh, existing

    async def _dedupe(
        self, conn: Any, users: list[str], ids: dict[str, str], scope: str, ms: int
    ) -> dict[str, Notification]:
        """Claim the scope for each user; answer the existing notification of those who lost."""
        claimed = await conn.fetch(
            self._sql(
                "INSERT INTO {s}.notification_dedupe AS d"
                " (user_id, scope, notification_id, created_at)"
                " SELECT t.u, $2::text, t.i, $3::bigint"
                " FROM unnest($1::text[], $4::text[]) WITH ORDINALITY AS t(u, i, o)"
                " ORDER BY t.o"
                " ON CONFLICT (user_id, scope) DO UPDATE"
                " SET notification_id = EXCLUDED.notification_id,"
                " created_at = EXCLUDED.created_at"
                " WHERE d.created_at <= EXCLUDED.created_at - $5::bigint"
                " RETURNING d.user_id"
            ),
            users,
            scope,
            ms,
            [ids[u] for u in users],
            self.dedupe_window_ms,
        )
        won = {r[0] for r in claimed}
        lost = [u for u in users if u not in won]
        if not lost:
            return {}
        # A new statement, so a new snapshot: it sees the winner's committed notification.
        rows = await conn.fetch(
            self._sql(
                f"SELECT {_N_COLUMNS} FROM {{s}}.notification_dedupe d"  # noqa: S608
                " JOIN {s}.notifications n ON n.id = d.notification_id"
                " WHERE d.scope = $1 AND d.user_id = ANY($2::text[])"
            ),
            scope,
            lost,
        )
        existing = {r[1]: Notification.from_row(r) for r in rows}
        orphans = [u for u in lost if u not in existing]
        if orphans:
            # The row points at a notification deleted behind our back (retention never
            # does: it keeps notifications far longer than the window). We hold the row's
            # lock, so re-pointing it at the new notification is still atomic.
            await conn.execute(
                self._sql(
                    "UPDATE {s}.notification_dedupe AS d"
                    " SET notification_id = t.i, created_at = $3::bigint"
                    " FROM unnest($1::text[], $2::text[]) AS t(u, i)"
                    " WHERE d.user_id = t.u AND d.scope = $4::text"
                ),
                orphans,
                [ids[u] for u in orphans],
                ms,
                scope,
            )
        return existing

    async def _owned(
        self, user_id: str, ids: Sequence[str], assign: str, unless: str, *args: object
    ) -> list[str]:
        """Apply ``assign`` to the user's rows among ``ids``; answer which ids are the user's.

        Rows for which ``unless`` already holds are answered but not rewritten (no dead
        tuples for repeated acks).
        """
        wanted = base.validate_ids(ids)
        if not wanted:
            return []
        async with self._connection("updating notifications") as conn:
            rows = await conn.fetch(
                self._sql(
                    "WITH owned AS (SELECT id FROM {s}.notifications"  # noqa: S608 (constants)
                    " WHERE user_id = $1 AND id = ANY($2::text[])),"
                    f" changed AS (UPDATE {{s}}.notifications SET {assign}"
                    f" WHERE user_id = $1 AND id IN (SELECT id FROM owned) AND NOT ({unless})"
                    " RETURNING 1)"
                    " SELECT id FROM owned"
                ),
                user_id,
                wanted,
                *args,
            )
        owned = {r[0] for r in rows}
        return [i for i in wanted if i in owned]

    async def ack(self, user_id: str, ids: Sequence[str]) -> list[str]:
        return await self._owned(user_id, ids, "acked = true", "acked")

    async def mark_read(
        self, user_id: str, ids: Sequence[str], *, now_ms: float | None = None
    ) -> list[str]:
        ms = base.stamp(now_ms)
        # Only unread rows get read_at, so it keeps the time of the first read.
        return await self._owned(
            user_id, ids, "is_read = true, acked = true, read_at = $3::bigint", "is_read", ms
        )

    async def read_all(self, user_id: str, now_ms: float | None = None) -> int:
        ms = base.stamp(now_ms)
        async with self._connection("marking all read") as conn:
            status = await conn.execute(
                self._sql(
                    "UPDATE {s}.notifications SET is_read = true, acked = true, read_at = $2"
                    " WHERE user_id = $1 AND NOT is_read"
                ),
                user_id,
                ms,
            )
        return _count(status)

    async def set_preferences(self, user_id: str, prefs: Mapping[str, bool | None]) -> None:
        checked = base.validate_preferences(prefs)
        if not checked:
            return
        removed = [t for t, push in checked.items() if push is None]
        kept = {t: push for t, push in checked.items() if push is not None}
        async with self._connection("saving preferences") as conn, conn.transaction():
            if removed:
                await conn.execute(
                    self._sql(
                        "DELETE FROM {s}.notification_preferences"
                        " WHERE user_id = $1 AND notification_type = ANY($2::text[])"
                    ),
                    user_id,
                    removed,
                )
            if kept:
                await conn.execute(
                    self._sql(
                        "INSERT INTO {s}.notification_preferences"
                        " (user_id, notification_type, push)"
                        " SELECT $1, t.k, t.v FROM unnest($2::text[], $3::boolean[]) AS t(k, v)"
                        " ON CONFLICT (user_id, notification_type)"
                        " DO UPDATE SET push = EXCLUDED.push"
                    ),
                    user_id,
                    list(kept),
                    list(kept.values()),
                )

    async def cleanup(self, now_ms: float | None = None) -> int:
        ms = base.stamp(now_ms)
        normal, critical = base.retention_cutoffs(
            ms, self.retention_days, self.critical_retention_days
        )
        deleted = 0
        async with self._connection("cleaning up") as conn:
            # Autocommitted batches: a large backlog never holds locks (or bloats one
            # transaction) for long, and a failure keeps the batches already done.
            while True:
                batch = _count(
                    await conn.execute(
                        self._sql(
                            "DELETE FROM {s}.notifications WHERE id IN ("
                            " SELECT id FROM {s}.notifications"
                            " WHERE (created_at < $1 AND priority <> 'critical')"
                            " OR (created_at < $2 AND priority = 'critical') LIMIT $3)"
                        ),
                        normal,
                        critical,
                        _CLEANUP_BATCH,
                    )
                )
                deleted += batch
                if batch < _CLEANUP_BATCH:
                    break
            await conn.execute(
                self._sql("DELETE FROM {s}.notification_dedupe WHERE created_at <= $1"),
                ms - self.dedupe_window_ms,
            )
        return deleted

    # -- the outbox ------------------------------------------------------------------------

    async def _outbox_add(self, events: list[OutboxEvent]) -> None:
        async with self._connection("adding outbox events") as conn:
            await conn.execute(
                self._sql(
                    "INSERT INTO {s}.outbox (event_id, topic, created_at, payload)"
                    " SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[])"
                    " ON CONFLICT (event_id) DO NOTHING"
                ),
                [e.event_id for e in events],
                [e.topic for e in events],
                [e.created_at for e in events],
                [e.payload for e in events],
            )

    async def _outbox_claim(
        self, topic: str, limit: int, now: int, lease_ms: int
    ) -> list[OutboxEvent]:
        # SKIP LOCKED: two nodes claiming at once take different rows instead of waiting
        # for each other; the lease check is repeated on the locked row's latest version.
        async with self._connection("claiming outbox events") as conn:
            rows = await conn.fetch(
                self._sql(
                    "UPDATE {s}.outbox AS o SET lease_until = $3::bigint + $4::bigint"
                    " FROM (SELECT event_id FROM {s}.outbox"
                    " WHERE topic = $1 AND lease_until <= $3::bigint"
                    " ORDER BY created_at, event_id LIMIT $2 FOR UPDATE SKIP LOCKED) AS c"
                    " WHERE o.event_id = c.event_id"
                    " RETURNING o.event_id, o.topic, o.created_at, o.payload"
                ),
                topic,
                limit,
                now,
                lease_ms,
            )
        events = [OutboxEvent(r[0], r[1], r[2], r[3]) for r in rows]
        events.sort(key=lambda e: (e.created_at, e.event_id))
        return events

    async def _outbox_release(self, ids: list[str]) -> None:
        async with self._connection("releasing outbox events") as conn:
            await conn.execute(
                self._sql(
                    "UPDATE {s}.outbox SET lease_until = 0"
                    " WHERE event_id = ANY($1::text[]) AND lease_until <> 0"
                ),
                ids,
            )

    async def _outbox_delete(self, ids: list[str]) -> int:
        async with self._connection("deleting outbox events") as conn:
            status = await conn.execute(
                self._sql("DELETE FROM {s}.outbox WHERE event_id = ANY($1::text[])"), ids
            )
        return _count(status)

    async def outbox_stats(self, topic: str) -> tuple[int, int | None]:
        async with self._connection("counting outbox events") as conn:
            row = await conn.fetchrow(
                self._sql("SELECT count(*), min(created_at) FROM {s}.outbox WHERE topic = $1"),
                topic,
            )
        return int(row[0]), None if row[1] is None else int(row[1])

    # -- reads -----------------------------------------------------------------------------

    async def _pending(self, user_id: str, limit: int, excluded: list[str]) -> list[Notification]:
        async with self._connection("reading pending notifications") as conn:
            rows = await conn.fetch(
                self._sql(
                    f"SELECT {_COLUMNS} FROM {{s}}.notifications"  # noqa: S608
                    " WHERE user_id = $1 AND NOT acked"
                    " AND NOT (notification_type = ANY($3::text[]))"
                    " ORDER BY created_at, id LIMIT $2"
                ),
                user_id,
                limit,
                excluded,
            )
        return [Notification.from_row(r) for r in rows]

    async def _pending_of(self, users: list[str], limit: int) -> list[Notification]:
        async with self._connection("reading pending notifications") as conn:
            rows = await conn.fetch(
                self._sql(
                    f"SELECT {_COLUMNS} FROM ("  # noqa: S608
                    " SELECT n.*, ROW_NUMBER() OVER"
                    " (PARTITION BY n.user_id ORDER BY n.created_at, n.id) AS rank"
                    " FROM {s}.notifications n"
                    " WHERE n.user_id = ANY($1::text[]) AND NOT n.acked"
                    " AND NOT EXISTS (SELECT 1 FROM {s}.notification_preferences p"
                    " WHERE p.user_id = n.user_id"
                    " AND p.notification_type = n.notification_type AND NOT p.push)"
                    ") t WHERE rank <= $2 ORDER BY user_id, created_at, id"
                ),
                users,
                limit,
            )
        return [Notification.from_row(r) for r in rows]

    async def _page(self, user_id: str, q: PageQuery) -> tuple[list[Notification], int]:
        limit, before_id, before_ms = q.limit, q.before_id, q.before_ms
        where = "user_id = $1"
        params: list[object] = [user_id, limit]
        if q.unread_only:
            where += " AND NOT is_read"
        # One snapshot for the page and the count, so they agree with each other.
        async with (
            self._connection("listing notifications") as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            if before_id is not None:
                created = await conn.fetchval(
                    self._sql(
                        "SELECT created_at FROM {s}.notifications WHERE user_id = $1 AND id = $2"
                    ),
                    user_id,
                    before_id,
                )
                if created is None:
                    raise base.unknown_cursor()
                where += " AND (created_at, id) < ($3::bigint, $4::text)"
                params += [created, before_id]
            elif before_ms is not None:
                where += " AND created_at < $3::bigint"
                params.append(before_ms)
            rows = await conn.fetch(
                self._sql(
                    f"SELECT {_COLUMNS} FROM {{s}}.notifications WHERE {where}"  # noqa: S608
                    " ORDER BY created_at DESC, id DESC LIMIT $2"
                ),
                *params,
            )
            unread = await conn.fetchval(
                self._sql(
                    "SELECT count(*) FROM {s}.notifications WHERE user_id = $1 AND NOT is_read"
                ),
                user_id,
            )
        return [Notification.from_row(r) for r in rows], int(unread)

    async def get(self, user_id: str, id: str) -> Notification | None:
        async with self._connection("reading a notification") as conn:
            row = await conn.fetchrow(
                self._sql(
                    f"SELECT {_COLUMNS} FROM {{s}}.notifications"  # noqa: S608
                    " WHERE user_id = $1 AND id = $2"
                ),
                user_id,
                id,
            )
        return None if row is None else Notification.from_row(row)

    async def get_preferences(self, user_id: str) -> dict[str, bool]:
        async with self._connection("reading preferences") as conn:
            rows = await conn.fetch(
                self._sql(
                    "SELECT notification_type, push FROM {s}.notification_preferences"
                    " WHERE user_id = $1"
                ),
                user_id,
            )
        return {r[0]: bool(r[1]) for r in rows}
