"""How a Redis failure becomes a hub error: the one mapping, with its two policies.

Every Redis-backed part of a node (the broker, its presence, SyncPlay rooms) awaits its
Redis calls through :func:`redis_call`, which names the policy it applies:

``RedisErrorPolicy.BROKER`` (publish, history, presence, key/values)
    The call is bounded by the broker's ``timeout``. Redis unreachable, too slow, or
    answering with an error that means "cannot serve right now" (``LOADING``, ``BUSY``,
    ``READONLY``, ``MASTERDOWN``, ``NOREPLICAS``, ...: a restart, a failover, a full
    memory) raises :class:`BrokerUnavailable` (503 ``UNAVAILABLE``, retryable). Any other
    error reply is a bug or a misconfiguration and raises :class:`BrokerError` with the
    Redis error chained, so that it is logged with its cause.

``RedisErrorPolicy.ROOM_STORE`` (SyncPlay rooms)
    No timeout of its own (the shared pool's socket timeouts bound every call, and a
    room command is bounded by the node's handler timeout). *Every* Redis failure raises
    :class:`BrokerUnavailable`: a room command that cannot complete is answered
    ``UNAVAILABLE`` and the client retries it; the room's compare-and-set keeps a retry
    safe.

Nothing is retried here: a retried write could apply twice.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable
from typing import TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .exceptions import BrokerError, BrokerUnavailable

__all__ = ["TRANSIENT_REPLIES", "RedisErrorPolicy", "is_transient", "redis_call"]

T = TypeVar("T")

#: Error prefixes of ResponseErrors that mean "Redis cannot serve right now", not a bug.
TRANSIENT_REPLIES = ("LOADING", "BUSY", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN",
                     "OOM", "MISCONF", "NOREPLICAS")  # fmt: skip


class RedisErrorPolicy(enum.Enum):
    """Which mapping :func:`redis_call` applies (see the module doc)."""

    BROKER = "broker"
    ROOM_STORE = "room_store"


def is_transient(exc: ResponseError) -> bool:
    return str(exc).startswith(TRANSIENT_REPLIES)


async def redis_call(aw: Awaitable[T], policy: RedisErrorPolicy, timeout: float | None = None) -> T:
    """Await one Redis operation and map its failure by ``policy``.

    ``timeout`` (seconds) bounds the call under the ``BROKER`` policy only.
    """
    if policy is RedisErrorPolicy.ROOM_STORE:
        try:
            return await aw
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"redis: {exc}") from None
    try:
        async with asyncio.timeout(timeout):
            return await aw
    except TimeoutError:
        raise BrokerUnavailable("redis did not answer in time") from None
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise BrokerUnavailable(f"redis unreachable: {exc}") from None
    except ResponseError as exc:
        if is_transient(exc):
            raise BrokerUnavailable(f"redis cannot serve: {exc}") from None
        raise BrokerError(f"redis refused: {exc}") from exc
    except RedisError as exc:
        raise BrokerError(f"redis failed: {exc}") from exc
