"""Durable notification storage: SQLite (default, embedded) or PostgreSQL.

    store = open_store(settings.store_url)   # REVENGE_STORE_URL
    await store.start()
    ...
    await store.close()

The backend modules are imported only when chosen, so asyncpg is needed only for PostgreSQL.
Log URLs through :func:`redact_url`, never as they are.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from ..exceptions import ConfigError
from .base import Notification, NotificationStore, redact_url

__all__ = ["Notification", "NotificationStore", "open_store", "redact_url", "sqlite_path"]

_SQLITE_PREFIX = "sqlite:///"


def sqlite_path(url: str) -> str:
    """The file path of a ``sqlite:///`` URL (the SQLAlchemy convention).

    ``sqlite:///revenge-ws.db`` is relative to the working directory,
    ``sqlite:////var/lib/revenge/ws.db`` is absolute (four slashes), and
    ``sqlite:///:memory:`` is a private in-memory database.
    """
    if not url.lower().startswith(_SQLITE_PREFIX):
        raise ConfigError(
            f"REVENGE_STORE_URL {redact_url(url)!r}: a SQLite URL is sqlite:///relative/path, "
            "sqlite:////absolute/path or sqlite:///:memory:"
        )
    rest = url[len(_SQLITE_PREFIX) :]
    if "?" in rest or "#" in rest:
        raise ConfigError(
            f"REVENGE_STORE_URL {redact_url(url)!r}: SQLite URLs take no query parameters"
        )
    path = unquote(rest)
    if not path:
        raise ConfigError("REVENGE_STORE_URL 'sqlite:///' names no file, e.g. sqlite:///ws.db")
    return path


def open_store(url: str, **options: Any) -> NotificationStore:
    """A (not yet started) store for ``url``, the value of ``REVENGE_STORE_URL``.

    ``sqlite:///path`` → :class:`~revenge_ws.store.sqlite.SQLiteNotificationStore`;
    ``postgresql://…`` or ``postgres://…`` →
    :class:`~revenge_ws.store.postgres.PostgresNotificationStore`. ``options`` go to the
    constructor (``retention_days``, ``critical_retention_days``, ``dedupe_window_ms``, and
    the backend's own: pool sizes and timeouts for PostgreSQL).
    Raises :class:`~revenge_ws.exceptions.ConfigError` for anything else.
    """
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme == "sqlite":
        from .sqlite import SQLiteNotificationStore

        return SQLiteNotificationStore(sqlite_path(url), **options)
    if scheme in ("postgresql", "postgres"):
        from .postgres import PostgresNotificationStore

        return PostgresNotificationStore(url, **options)
    raise ConfigError(
        f"REVENGE_STORE_URL {redact_url(url)!r} is not a supported store: use "
        "sqlite:///path/to/file.db (the default) or postgresql://user:password@host:5432/db"
    )
