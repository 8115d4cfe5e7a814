"""What only the Redis broker does: several nodes on one Redis, the wire format on Redis,
presence expiry of a dead node, lost data, outages and their recovery.

The semantics shared with the memory broker are in test_broker_contract.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ReadOnlyError, ResponseError

from revenge_ws.broker import open_broker
from revenge_ws.broker.base import PresenceInfo
from revenge_ws.broker.redis import RedisBroker
from revenge_ws.config import HistoryFamily
from revenge_ws.exceptions import BrokerError, BrokerUnavailable, ConfigError
from revenge_ws.protocol import StreamPosition

from .helpers import make_settings, running_hub
from .redis_fixtures import (
    MakeBroker,
    RedisProcess,
    eventually,
    kill_broker,
    make_redis_broker,
    prefix,
    raw_redis,
    redis_proc,
    redis_url,
)

__all__ = ["make_redis_broker", "prefix", "raw_redis", "redis_proc", "redis_url"]

pytestmark = pytest.mark.redis

FAM = HistoryFamily(size=100, ttl=300)
CH = "library"
RawRedis = Callable[..., aioredis.Redis]
LOGGER = "revenge_ws.broker.redis"


async def numsub(raw: aioredis.Redis, pfx: str, channel: str = CH) -> int:
    ((_, n),) = await raw.pubsub_numsub(f"{pfx}:pub:{channel}")
    return int(n)


async def numsub_is(raw: aioredis.Redis, pfx: str, n: int) -> bool:
    return await numsub(raw, pfx) == n


# -- configuration -------------------------------------------------------------------------
async def test_open_broker_builds_a_redis_broker(redis_url: str) -> None:
    broker = open_broker(make_settings({"REVENGE_BROKER_URL": redis_url, "REVENGE_NODE_ID": "n7"}))
    assert isinstance(broker, RedisBroker) and broker.node_id == "n7"
    await broker.close()  # never started: closing must still be clean


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        RedisBroker("ftp://127.0.0.1:1/0", node_id="a")
    with pytest.raises(ConfigError):
        RedisBroker("redis://127.0.0.1:1/0", node_id="a", presence_ttl=5, presence_refresh=5)


async def test_redis_errors_map_to_broker_errors(make_redis_broker: MakeBroker) -> None:
    broker, _ = await make_redis_broker(start=False)

    async def fail(exc: Exception) -> None:
        raise exc

    for exc in (ReadOnlyError("READONLY replica"), ResponseError("LOADING dataset"), OSError()):
        with pytest.raises(BrokerUnavailable):
            await broker._run(fail(exc))
    with pytest.raises(BrokerError) as info:  # a bug (bad script...), not an outage
        await broker._run(fail(ResponseError("ERR wrong number of arguments")))
    assert not isinstance(info.value, BrokerUnavailable)


# -- wire format, subscriptions ------------------------------------------------------------
async def test_redis_carries_the_publication_json_unchanged(
    make_redis_broker: MakeBroker, raw_redis: RawRedis, prefix: str
) -> None:
    broker, _ = await make_redis_broker()
    ps = raw_redis().pubsub()
    await ps.subscribe(f"{prefix}:pub:{CH}")
    assert (await ps.get_message(timeout=1))["type"] == "subscribe"
    pub = await broker.publish(CH, "item.updated", {"id": 1}, FAM)
    msg = await ps.get_message(timeout=1)
    assert msg is not None and msg["data"] == pub.payload
    await ps.aclose()


async def test_one_redis_subscription_per_channel_per_node(
    make_redis_broker: MakeBroker, raw_redis: RawRedis, prefix: str
) -> None:
    a, _ = await make_redis_broker("a")
    b, _ = await make_redis_broker("b")
    raw = raw_redis()
    await a.subscribe(CH)
    await a.subscribe(CH)
    assert await numsub(raw, prefix) == 1
    await b.subscribe(CH)
    assert await numsub(raw, prefix) == 2
    await a.unsubscribe(CH)
    await a.unsubscribe(CH)
    await eventually(lambda: numsub_is(raw, prefix, 1))
    ((_, control),) = await raw.pubsub_numsub(f"{prefix}:control")
    assert control == 2


async def test_nodes_share_one_sequence_and_receive_the_same_bytes(
    make_redis_broker: MakeBroker,
) -> None:
    (a, ha), (b, hb) = await make_redis_broker("a"), await make_redis_broker("b")
    await a.subscribe(CH)
    await b.subscribe(CH)
    sent = []
    for i in range(10):
        sent.append(await (a if i % 2 else b).publish(CH, "x", {"i": i}, FAM))
    assert [p.seq for p in sent] == list(range(1, 11))
    await eventually(lambda: len(ha.pubs) == 10 and len(hb.pubs) == 10)
    assert ha.seqs() == hb.seqs() == list(range(1, 11))
    assert [p.payload for p in ha.pubs] == [p.payload for p in hb.pubs] == [p.payload for p in sent]
    # The receiving node keeps the bytes it got: the payload is not encoded again.
    assert all(x.payload is not y.payload for x, y in zip(ha.pubs, hb.pubs, strict=True))
    assert all(abs(p.created_ms - s.created_ms) < 2 for p, s in zip(ha.pubs, sent, strict=True))


async def test_control_messages_reach_every_node_once(make_redis_broker: MakeBroker) -> None:
    (a, ha), (_, hb) = await make_redis_broker("a"), await make_redis_broker("b")
    await a.publish_control({"op": "revoke", "user_id": "u1"})
    await eventually(lambda: ha.controls and hb.controls)
    await asyncio.sleep(0.1)
    assert ha.controls == hb.controls == [{"op": "revoke", "user_id": "u1"}]


async def test_malformed_messages_are_dropped_quietly(
    make_redis_broker: MakeBroker,
    raw_redis: RawRedis,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker, handler = await make_redis_broker()
    await broker.subscribe(CH)
    raw = raw_redis()
    await raw.publish(f"{prefix}:pub:{CH}", b"not json")
    await raw.publish(f"{prefix}:control", b"[1]")
    await raw.publish(f"{prefix}:pub:{CH}", b"{}")
    await broker.publish(CH, "x", {}, FAM)
    await eventually(lambda: handler.seqs() == [1])
    assert handler.controls == []
    assert [r.levelno for r in caplog.records if r.name == LOGGER] == [logging.WARNING]


# -- history on Redis ------------------------------------------------------------------------
async def test_flushall_starts_a_new_epoch_and_never_recovers_across_it(
    make_redis_broker: MakeBroker, raw_redis: RawRedis
) -> None:
    broker, _ = await make_redis_broker()
    old = [await broker.publish(CH, "x", {"i": i}, FAM) for i in range(3)]
    await raw_redis().flushall()
    res = await broker.history(CH, StreamPosition(old[0].epoch, 3))
    assert not res.recovered and res.publications == []
    assert res.position.epoch != old[0].epoch and res.position.seq == 0
    new = await broker.publish(CH, "x", {}, FAM)
    assert new.position == StreamPosition(res.position.epoch, 1)
    # ...and the same holds when the first thing after the flush is a publish.
    await raw_redis().flushall()
    newer = await broker.publish(CH, "x", {}, FAM)
    assert newer.seq == 1 and newer.epoch not in (old[0].epoch, new.epoch)
    assert not (await broker.history(CH, new.position)).recovered


async def test_an_idle_channel_expires_into_a_new_epoch(make_redis_broker: MakeBroker) -> None:
    broker, _ = await make_redis_broker(channel_ttl=0.3)
    first = await broker.publish(CH, "x", {}, HistoryFamily(size=10, ttl=0.2))
    await asyncio.sleep(0.45)
    res = await broker.history(CH, first.position)
    assert not res.recovered and res.position.epoch != first.epoch


async def test_idempotent_repeat_after_its_publication_left_history(
    make_redis_broker: MakeBroker,
) -> None:
    broker, _ = await make_redis_broker()
    fam = HistoryFamily(size=2, ttl=300)
    first = await broker.publish(CH, "x", {"v": 1}, fam, idempotency_key="k")
    for _ in range(3):
        await broker.publish(CH, "x", {}, fam)
    again = await broker.publish(CH, "x", {"v": 2}, fam, idempotency_key="k")
    assert again.position == first.position
    assert (await broker.history(CH)).position.seq == 4


async def test_idempotency_keys_expire(make_redis_broker: MakeBroker) -> None:
    broker, _ = await make_redis_broker(idempotency_ttl=0.2)
    first = await broker.publish(CH, "x", {}, FAM, idempotency_key="k")
    await asyncio.sleep(0.3)
    assert (await broker.publish(CH, "x", {}, FAM, idempotency_key="k")).seq == first.seq + 1


async def test_history_keys_carry_ttls(
    make_redis_broker: MakeBroker, raw_redis: RawRedis, prefix: str
) -> None:
    broker, _ = await make_redis_broker(channel_ttl=1000)
    await broker.publish(CH, "x", {}, HistoryFamily(size=5, ttl=60), idempotency_key="k")
    raw = raw_redis()
    assert 990_000 < await raw.pttl(f"{prefix}:ch:{CH}") <= 1_000_000
    assert 59_000 < await raw.pttl(f"{prefix}:hist:{CH}") <= 60_000
    assert 0 < await raw.pttl(f"{prefix}:idem:{CH}:k") <= 600_000
    for _ in range(10):
        await broker.publish(CH, "x", {}, HistoryFamily(size=5, ttl=60))
    assert await raw.xlen(f"{prefix}:hist:{CH}") == 5


# -- presence across nodes -------------------------------------------------------------------
async def test_connection_limit_holds_across_nodes(make_redis_broker: MakeBroker) -> None:
    (a, _), (b, _) = await make_redis_broker("a"), await make_redis_broker("b")
    counts = await asyncio.gather(
        *((a if i % 2 else b).presence.add_connection("u1", f"c{i}") for i in range(20))
    )
    assert sorted(counts) == list(range(1, 21))
    assert await a.presence.remove_connection("u1", "c1") == 19
    assert await b.presence.connection_count("u1") == 19
    assert await a.presence.online_users() == 1


async def test_a_dead_nodes_presence_expires_while_a_live_nodes_stays(
    make_redis_broker: MakeBroker,
) -> None:
    # TTL = 10 refresh periods: a loaded machine can stall the loop without losing entries.
    kw = {"presence_ttl": 3.0, "presence_refresh": 0.3}
    (live, _), (dead, _) = (
        await make_redis_broker("live", **kw),
        await make_redis_broker("dead", **kw),
    )
    await live.presence.add_connection("ann", "l1")
    await live.presence.add(CH, "l1", PresenceInfo("ann", "Ann", "live"))
    await dead.presence.add_connection("bob", "d1")
    await dead.presence.add_connection("ann", "d2")
    await dead.presence.add(CH, "d1", PresenceInfo("bob", "Bob", "dead"))
    await asyncio.sleep(3.3)  # longer than the TTL: refreshing keeps everything
    assert set(await live.presence.members(CH)) == {"l1", "d1"}
    assert await live.presence.connection_count("ann") == 2
    assert await live.presence.online_users() == 2
    await kill_broker(dead)
    await eventually(lambda: _members_are(live, {"l1"}), timeout=8)
    assert await live.presence.connection_count("bob") == 0
    assert await live.presence.connection_count("ann") == 1
    assert await live.presence.online_users() == 1
    # A new connection of bob counts from zero: the dead node's entries are gone.
    assert await live.presence.add_connection("bob", "l2") == 1


async def test_presence_comes_back_after_redis_lost_it(
    make_redis_broker: MakeBroker, raw_redis: RawRedis
) -> None:
    broker, _ = await make_redis_broker(presence_ttl=2, presence_refresh=0.1)
    await broker.presence.add_connection("ann", "c1")
    await broker.presence.add(CH, "c1", PresenceInfo("ann", "Ann", "a"))
    await raw_redis().flushall()
    await eventually(lambda: _members_are(broker, {"c1"}))
    assert await broker.presence.connection_count("ann") == 1


async def test_refresh_and_close_handle_many_entries(
    make_redis_broker: MakeBroker, raw_redis: RawRedis
) -> None:
    # Generous timeouts: 1,800 writes must not trip on a loaded machine.
    (a, _), (b, _) = (
        await make_redis_broker("a", timeout=10.0),
        await make_redis_broker("b", timeout=10.0),
    )
    p = b.presence
    info = PresenceInfo("u", "U", "b")
    for i in range(0, 600, 100):
        await asyncio.gather(*(p.add_connection(f"u{j}", f"c{j}") for j in range(i, i + 100)))
        await asyncio.gather(*(p.add_connection("big", f"b{j}") for j in range(i, i + 100)))
        await asyncio.gather(*(p.add(CH, f"c{j}", info) for j in range(i, i + 100)))
    await raw_redis().flushall()
    await p.refresh()
    assert await a.presence.online_users() == 601
    assert await a.presence.connection_count("big") == 600
    assert len(await a.presence.members(CH)) == 600
    await b.close()
    assert await a.presence.online_users() == 0
    assert await a.presence.members(CH) == {}


async def _members_are(broker: RedisBroker, ids: set[str]) -> bool:
    return set(await broker.presence.members(CH)) == ids


async def test_removing_a_connection_removes_its_channel_presence(
    make_redis_broker: MakeBroker,
) -> None:
    broker, _ = await make_redis_broker(presence_ttl=0.5, presence_refresh=0.1)
    await broker.presence.add_connection("ann", "c1")
    await broker.presence.add(CH, "c1", PresenceInfo("ann", "Ann", "a"))
    await broker.presence.add("server", "c1", PresenceInfo("ann", "Ann", "a"))
    assert await broker.presence.remove_connection("ann", "c1") == 0
    assert await broker.presence.members(CH) == {}
    assert await broker.presence.members("server") == {}
    # A presence add that lands after its connection is gone is undone, not refreshed.
    await broker.presence.add(CH, "c1", PresenceInfo("ann", "Ann", "a"))
    await asyncio.sleep(0.3)
    assert await broker.presence.members(CH) == {}


async def test_a_removal_during_a_refresh_is_not_undone_by_it(
    make_redis_broker: MakeBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker, _ = await make_redis_broker(presence_ttl=120, presence_refresh=60)
    p = broker.presence
    for client in ("c0", "c1"):
        await p.add_connection("ann", client)
        await p.add(CH, client, PresenceInfo("ann", "Ann", "a"))
    gate = asyncio.Event()
    execute = p._execute

    async def held(batch: Any) -> None:  # the refresh has its snapshot; Redis has not
        await gate.wait()
        await execute(batch)

    monkeypatch.setattr(p, "_execute", held)
    refresh = asyncio.create_task(p.refresh())
    await asyncio.sleep(0.05)
    assert await p.remove_connection("ann", "c0") == 1
    await p.remove(CH, "c1")
    gate.set()
    await refresh
    assert await p.connection_count("ann") == 1
    assert await p.members(CH) == {}


async def test_close_removes_what_the_node_left(make_redis_broker: MakeBroker) -> None:
    (a, _), (b, _) = await make_redis_broker("a"), await make_redis_broker("b")
    await b.presence.add_connection("ann", "c1")
    await b.presence.add(CH, "c1", PresenceInfo("ann", "Ann", "b"))
    await b.close()
    assert await a.presence.connection_count("ann") == 0
    assert await a.presence.members(CH) == {}


# -- outages ---------------------------------------------------------------------------------
async def test_outage_fails_fast_then_everything_recovers(
    make_redis_broker: MakeBroker,
    redis_proc: RedisProcess,
    raw_redis: RawRedis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    broker, handler = await make_redis_broker(url=redis_proc.url, timeout=2.0, reconnect_max=0.3)
    await broker.subscribe(CH)
    before = await broker.publish(CH, "x", {}, FAM)
    await eventually(lambda: handler.seqs() == [1])

    redis_proc.stop()
    calls = {
        "publish": lambda: broker.publish(CH, "x", {}, FAM),
        "history": lambda: broker.history(CH, before.position),
        "ping": broker.ping,
        "subscribe": lambda: broker.subscribe("server"),
        "add_connection": lambda: broker.presence.add_connection("u", "c"),
        "members": lambda: broker.presence.members(CH),
        "control": lambda: broker.publish_control({"op": "x"}),
        "get_value": lambda: broker.get_value("k"),
    }
    for name, call in calls.items():
        t0 = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            await call()
        assert time.monotonic() - t0 < 1.0, name  # refused: no waiting for the timeout
    await broker.unsubscribe("server")  # never raises
    await eventually(lambda: broker._link is None)
    await asyncio.sleep(0.8)  # several reconnect attempts

    redis_proc.start()
    await eventually(lambda: handler.reconnects == 1)
    await broker.ping()
    assert await numsub(raw_redis(redis_proc.url), broker.prefix) == 1
    # The restarted Redis lost everything: a new epoch, and no recovery across it.
    after = await broker.publish(CH, "x", {}, FAM)
    assert after.seq == 1 and after.epoch != before.epoch
    await eventually(lambda: len(handler.pubs) == 2 and handler.pubs[-1].epoch == after.epoch)
    assert not (await broker.history(CH, before.position)).recovered

    ours = [r for r in caplog.records if r.name == LOGGER]
    assert [r.levelname for r in ours if r.levelno >= logging.WARNING] == ["WARNING"]
    assert sum("restored" in r.getMessage() for r in ours) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_hung_redis_times_out_and_publishes_nothing(
    make_redis_broker: MakeBroker, redis_proc: RedisProcess, raw_redis: RawRedis
) -> None:
    broker, _ = await make_redis_broker(url=redis_proc.url, timeout=0.4)
    await broker.publish(CH, "x", {}, FAM)
    await raw_redis(redis_proc.url).execute_command("CLIENT", "PAUSE", 700, "WRITE")
    t0 = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        await broker.publish(CH, "x", {}, FAM)
    assert 0.35 < time.monotonic() - t0 < 1.5
    await asyncio.sleep(0.5)  # the pause is over
    assert (await broker.history(CH)).position.seq == 1


async def test_a_dropped_pubsub_link_is_rebuilt(
    make_redis_broker: MakeBroker, raw_redis: RawRedis, caplog: pytest.LogCaptureFixture
) -> None:
    (a, ha), (b, _) = await make_redis_broker("a"), await make_redis_broker("b")
    await a.subscribe(CH)
    raw = raw_redis()
    # As when Redis drops a subscriber over its output-buffer limit.
    await raw.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    await eventually(lambda: ha.reconnects == 1)
    await b.publish(CH, "x", {}, FAM)
    await eventually(lambda: ha.seqs() == [1])
    assert await numsub(raw, a.prefix) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_an_unresponsive_link_is_detected_by_the_heartbeat(
    make_redis_broker: MakeBroker,
    redis_proc: RedisProcess,
    raw_redis: RawRedis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker, handler = await make_redis_broker(
        url=redis_proc.url, timeout=0.3, heartbeat=0.2, reconnect_max=0.2
    )
    await broker.subscribe(CH)
    # Redis keeps the socket open but answers nothing (like a half-open TCP link).
    await raw_redis(redis_proc.url).execute_command("CLIENT", "PAUSE", 1200, "ALL")
    await eventually(lambda: broker._link is None, timeout=1.2)
    await eventually(lambda: handler.reconnects == 1, timeout=5)
    await broker.publish(CH, "x", {}, FAM)
    await eventually(lambda: handler.seqs() == [1])
    assert "heartbeat" in " ".join(r.getMessage() for r in caplog.records if r.name == LOGGER)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_start_while_redis_is_down_then_connects(
    make_redis_broker: MakeBroker, redis_proc: RedisProcess
) -> None:
    redis_proc.stop()
    t0 = time.monotonic()
    broker, handler = await make_redis_broker(url=redis_proc.url, timeout=2.0, reconnect_max=0.2)
    assert time.monotonic() - t0 < 1.0  # refused: start does not wait for the timeout
    with pytest.raises(BrokerUnavailable):
        await broker.ping()
    with pytest.raises(BrokerUnavailable):
        await broker.subscribe(CH)
    redis_proc.start()
    await eventually(lambda: broker._link is not None and broker._link.ready)
    await broker.ping()
    await broker.subscribe(CH)
    await broker.publish(CH, "x", {}, FAM)
    await eventually(lambda: handler.seqs() == [1])
    assert handler.reconnects == 0  # nothing to recover: it was never linked


async def test_ping_wakes_the_listener_when_redis_returns(
    make_redis_broker: MakeBroker, redis_proc: RedisProcess
) -> None:
    broker, handler = await make_redis_broker(
        url=redis_proc.url, reconnect_min=5.0, reconnect_max=5.0
    )
    redis_proc.stop()
    await eventually(lambda: broker._link is None)
    redis_proc.start()
    t0 = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        await broker.ping()  # Redis answers, the link is not back yet...
    await eventually(lambda: handler.reconnects == 1)  # ...but it no longer waits 5 s
    assert time.monotonic() - t0 < 2.0
    await broker.ping()


# -- two in-process hubs on one Redis ------------------------------------------------------
async def test_two_hubs_share_publications(redis_url: str, prefix: str) -> None:
    env = {"REVENGE_BROKER_URL": redis_url}
    async with (
        running_hub(make_settings({**env, "REVENGE_NODE_ID": f"{prefix}-a"})) as hub_a,
        running_hub(make_settings({**env, "REVENGE_NODE_ID": f"{prefix}-b"})) as hub_b,
    ):
        user = f"user-{prefix}"
        ws = await hub_a.connect(user)
        subs = {s["channel"]: s for s in ws.welcome["data"]["subscriptions"]}
        assert f"user:{user}" in subs
        status, body = await hub_b.publish(f"user:{user}", "user.data_changed", {"n": 1})
        assert status == 200, body
        msg = await ws.recv()
        assert msg["type"] == "user.data_changed" and msg["seq"] == body["seq"] == 1
        assert msg["epoch"] == body["epoch"] == subs[f"user:{user}"]["epoch"]
        assert (await hub_b.request("GET", "/readyz"))[0] == 200
        await ws.close()
