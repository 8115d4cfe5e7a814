"""Brokers, picked by URL scheme and imported lazily (optional dependencies stay optional).

``memory://`` is the in-process broker; ``redis://`` / ``rediss://`` the Redis one, and
``redis+sentinel://`` / ``rediss+sentinel://`` the Redis one through Redis Sentinel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from ..exceptions import ConfigError
from .base import Broker, BrokerHandler, HistoryResult, PresenceInfo, PresenceManager, Publication

if TYPE_CHECKING:
    from ..config import Settings

__all__ = [
    "Broker",
    "BrokerHandler",
    "HistoryResult",
    "PresenceInfo",
    "PresenceManager",
    "Publication",
    "open_broker",
]


def open_broker(settings: Settings) -> Broker:
    """Build the broker named by ``broker.url`` (``REVENGE_BROKER_URL``)."""
    url = settings.broker.url
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        from .memory import MemoryBroker

        return MemoryBroker(idempotency_ttl=settings.history.idempotency_ttl)
    if scheme in ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel"):
        try:
            from .redis import RedisBroker
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ConfigError(
                "REVENGE_BROKER_URL is redis:// but the redis package is missing: "
                "pip install 'revenge-ws[redis]'"
            ) from exc
        broker: Broker = RedisBroker(
            url,
            node_id=settings.node_id,
            timeout=settings.broker.timeout,
            min_replicas=settings.broker.min_replicas,
            presence_ttl=settings.broker.presence_ttl,
            presence_refresh=settings.broker.presence_refresh,
        )
        return broker
    raise ConfigError(
        f"REVENGE_BROKER_URL (broker.url): unknown scheme {scheme!r}; use memory://, redis:// or redis+sentinel://"
    )
