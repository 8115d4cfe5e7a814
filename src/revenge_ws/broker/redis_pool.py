"""The Redis broker's connection pool, built from ``broker.url``.

``redis://``, ``rediss://`` and ``unix://`` name one Redis. ``redis+sentinel://`` (and
``rediss+sentinel://``, TLS to the sentinels and the master) names a master through
Redis Sentinel::

    redis+sentinel://[[user]:password@]host1:26379,host2:26380/<master-name>[/<db>]
        [?sentinel_password=...&sentinel_username=...&ssl_ca_certs=...&ssl_cert_reqs=...]

The user and password are the master's; the sentinels' own are query parameters (most
deployments protect only the data nodes). Every new connection asks the sentinels for the
current master (the first one that answers and does not see it down), so connections
opened after a failover go to the new master; a master that was demoted closes its
clients (Sentinel does that) or answers ``READONLY``, which redis-py turns into a
connection error that reconnects through the sentinels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio import BlockingConnectionPool
from redis.asyncio.connection import ConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ..exceptions import ConfigError

__all__ = ["SENTINEL_SCHEMES", "SentinelTarget", "open_pool", "parse_sentinel_url"]

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
DEFAULT_SENTINEL_PORT = 26379
#: Query parameters passed to both the sentinels' and the master's connections.
_TLS_PARAMS = ("ssl_ca_certs", "ssl_cert_reqs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname")


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel-managed connections in a bounded pool: waiting for a free connection
    counts against the call's timeout, as with one Redis."""


class SentinelTarget:
    """A parsed ``redis+sentinel://`` URL."""

    def __init__(
        self,
        sentinels: list[tuple[str, int]],
        service: str,
        db: int,
        master_kwargs: dict[str, Any],
        sentinel_kwargs: dict[str, Any],
    ) -> None:
        self.sentinels = sentinels
        self.service = service
        self.db = db
        self.master_kwargs = master_kwargs
        self.sentinel_kwargs = sentinel_kwargs


def _host_port(item: str) -> tuple[str, int]:
    if item.startswith("["):  # [::1]:26379
        host, _, rest = item[1:].partition("]")
        port = rest.lstrip(":")
    else:
        host, _, port = item.partition(":")
    if not host:
        raise ValueError(f"empty sentinel host in {item!r}")
    return host, int(port) if port else DEFAULT_SENTINEL_PORT


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Parse a ``redis+sentinel://`` URL; raises ``ValueError`` when it is malformed."""
    parts = urlsplit(url)
    if parts.scheme not in SENTINEL_SCHEMES:
        raise ValueError(f"not a sentinel URL: {parts.scheme}://")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    sentinels = [_host_port(h) for h in hosts.split(",") if h]
    if not sentinels:
        raise ValueError("no sentinel host")
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError("the path must be /<master-name>[/<db>]")
    service = unquote(path[0])
    db = int(path[1]) if len(path) == 2 else 0
    master: dict[str, Any] = {"db": db}
    if userinfo:
        user, _, password = userinfo.partition(":")
        if user:
            master["username"] = unquote(user)
        if password:
            master["password"] = unquote(password)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    sentinel: dict[str, Any] = {}
    if "sentinel_password" in query:
        sentinel["password"] = query.pop("sentinel_password")
    if "sentinel_username" in query:
        sentinel["username"] = query.pop("sentinel_username")
    tls = parts.scheme == "rediss+sentinel"
    if tls:
        master["ssl"] = True
        sentinel["ssl"] = True
    for key in _TLS_PARAMS:
        if key in query:
            if not tls:
                raise ValueError(f"{key} needs rediss+sentinel://")
            value: Any = query.pop(key)
            if key == "ssl_check_hostname":
                value = value.lower() in ("1", "true", "yes")
            master[key] = sentinel[key] = value
    if query:
        raise ValueError(f"unknown parameters: {', '.join(sorted(query))}")
    return SentinelTarget(sentinels, service, db, master, sentinel)


def open_pool(
    url: str, *, node_id: str, timeout: float, max_connections: int
) -> tuple[ConnectionPool, Callable[[], Awaitable[None]]]:
    """A bounded pool for ``url`` and a coroutine function that closes what the pool
    needs besides its own connections (the sentinels' clients)."""
    common: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        # No hidden retries: a call fails once, fast, and the caller decides.
        "retry": Retry(NoBackoff(), 0),
        # RESP2: pub/sub messages are plain replies on every server we support.
        "protocol": 2,
        "client_name": f"revenge-ws:{node_id}"[:128].replace(" ", "_"),
    }
    scheme = urlsplit(url).scheme
    try:
        if scheme not in SENTINEL_SCHEMES:
            pool: ConnectionPool = BlockingConnectionPool.from_url(
                url,
                max_connections=max_connections,
                # Waiting for a free connection counts against the call's timeout.
                timeout=timeout,
                **common,
            )
            return pool, _nothing
        target = parse_sentinel_url(url)
    except ValueError as exc:
        raise ConfigError(f"REVENGE_BROKER_URL (broker.url) is not a Redis URL: {exc}") from None
    sentinel = Sentinel(
        target.sentinels,
        sentinel_kwargs={
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
            "protocol": 2,
            **target.sentinel_kwargs,
        },
    )
    pool = _BlockingSentinelPool(  # type: ignore[no-untyped-call]
        target.service,
        sentinel,
        max_connections=max_connections,
        timeout=timeout,
        **common,
        **target.master_kwargs,
    )

    async def close_sentinels() -> None:
        with contextlib.suppress(RedisError, OSError):
            await sentinel.aclose()

    return pool, close_sentinels


async def _nothing() -> None:
    return None
