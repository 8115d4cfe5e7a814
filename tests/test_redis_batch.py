"""``broker/redis_batch.py``: calls made in one loop iteration share one pipeline, each
gets its own reply or error, and a failed round trip fails all of its calls."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from revenge_ws.broker.redis_batch import MAX_BATCH, AutoPipeline

from .redis_fixtures import RedisProcess, raw_redis, redis_proc, redis_url

__all__ = ["raw_redis", "redis_proc", "redis_url"]

pytestmark = pytest.mark.redis


async def _round_trips(r: aioredis.Redis) -> int:
    """Pipelines sent so far: redis-py checks its scripts (SCRIPT EXISTS) once per pipeline."""
    stats = await r.info("commandstats")
    return int(stats.get("cmdstat_script|exists", stats.get("cmdstat_script", {})).get("calls", 0))


async def test_calls_of_one_iteration_share_a_pipeline_and_keep_their_own_replies(
    raw_redis: Callable[..., aioredis.Redis],
) -> None:
    r = raw_redis()
    await r.config_resetstat()
    key = "t" + secrets.token_hex(4)
    echo = r.register_script("return ARGV[1] .. redis.call('INCR', KEYS[1])")
    fail = r.register_script("return redis.error_reply('NOPE wanted')")
    auto = AutoPipeline(r)
    try:
        n = MAX_BATCH + 10  # two pipelines
        calls = [auto.script(echo, [key], [f"c{i}:"]) for i in range(n)]
        calls.append(auto.script(fail, [key], []))
        calls.append(auto.command("GET", key))
        replies = await asyncio.gather(*calls, return_exceptions=True)
        # In the order made: the counter went up once per script call.
        assert replies[:n] == [f"c{i}:{i + 1}".encode() for i in range(n)]
        assert isinstance(replies[n], ResponseError) and "NOPE" in str(replies[n])
        assert replies[n + 1] == str(n).encode()
        assert await _round_trips(r) == 2
        # A caller that stopped waiting does not stop the others.
        gone = auto.script(echo, [key], ["gone:"])
        kept = auto.script(echo, [key], ["kept:"])
        gone.cancel()
        assert await kept == f"kept:{n + 2}".encode()
    finally:
        await auto.close()
        await r.delete(key)


async def test_a_failed_round_trip_fails_every_call_of_it(redis_proc: RedisProcess) -> None:
    r = aioredis.Redis.from_url(redis_proc.url, socket_timeout=2, socket_connect_timeout=2)
    auto = AutoPipeline(r)
    try:
        assert await auto.command("PING") is True
        redis_proc.cleanup()  # Redis is gone
        calls = [auto.command("GET", f"k{i}") for i in range(3)]
        replies = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(x, RedisConnectionError | OSError) for x in replies), replies
    finally:
        await auto.close()
        await r.aclose()


async def test_subscribes_of_one_iteration_share_one_command(
    redis_proc: RedisProcess,
) -> None:
    """A node subscribing 50 channels at once (50 users reconnecting) sends one SUBSCRIBE
    with all of them, and each caller returns once Redis confirmed its channel; the
    unsubscribes of one iteration share one UNSUBSCRIBE too."""
    from revenge_ws.broker.redis import RedisBroker

    from .redis_fixtures import Recorder

    r = aioredis.Redis.from_url(redis_proc.url)
    broker = RedisBroker(redis_proc.url, node_id="a", timeout=3.0)
    try:
        await broker.start(Recorder())
        await r.config_resetstat()
        names = [f"library:l{i}" for i in range(50)]
        await asyncio.gather(*(broker.subscribe(n) for n in names))
        stats = await r.info("commandstats")
        assert stats["cmdstat_subscribe"]["calls"] == 1
        assert set(await r.pubsub_channels("revenge:pub:library:*")) == {
            f"revenge:pub:{n}".encode() for n in names
        }
        await asyncio.gather(*(broker.unsubscribe(n) for n in names))
        for _ in range(100):  # the UNSUBSCRIBE leaves at the end of the iteration
            if not await r.pubsub_channels("revenge:pub:library:*"):
                break
            await asyncio.sleep(0.02)
        assert await r.pubsub_channels("revenge:pub:library:*") == []
        assert (await r.info("commandstats"))["cmdstat_unsubscribe"]["calls"] == 1
    finally:
        await broker.close()
        await r.aclose()
