"""Redis without a single point of failure: a master, two replicas and three Sentinels
(real processes on free ports), the broker and real hub nodes following failovers with no
silent gap and no reused seq (issue #17)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from revenge_ws.broker.base import PresenceInfo
from revenge_ws.config import HistoryFamily
from revenge_ws.exceptions import BrokerUnavailable
from revenge_ws.protocol import StreamPosition

from .redis_fixtures import (
    MakeBroker,
    SentinelCluster,
    eventually,
    make_redis_broker,
    prefix,
    redis_url,
    sentinel_cluster,
)

pytestmark = pytest.mark.redis

__all__ = ["make_redis_broker", "prefix", "redis_url", "sentinel_cluster"]

CH = "library:f"
FAM = HistoryFamily(size=1000, ttl=300)


async def publish_until_acked(broker: Any, i: int, deadline: float) -> Any:
    """Publish {"i": i} with idempotency key k<i>, retrying 503s until ``deadline``."""
    while True:
        try:
            return await broker.publish(CH, "t", {"i": i}, FAM, idempotency_key=f"k{i}")
        except BrokerUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_planned_failover_starts_a_new_epoch(
    sentinel_cluster: SentinelCluster, make_redis_broker: MakeBroker
) -> None:
    url = sentinel_cluster.url
    pub, _ = await make_redis_broker("pub", url=url, timeout=1.0, reconnect_max=0.2)
    sub, rec = await make_redis_broker("sub", url=url, timeout=1.0, reconnect_max=0.2)
    await sub.subscribe(CH)
    await sub.presence.add_connection("ann", "c1")
    await sub.presence.add(CH, "c1", PresenceInfo("ann", "Ann", "sub"))
    before = [await pub.publish(CH, "t", {"i": i}, FAM, idempotency_key=f"k{i}") for i in range(5)]
    epoch = before[0].epoch
    assert [p.seq for p in before] == [1, 2, 3, 4, 5]
    await eventually(lambda: len(rec.pubs) == 5)
    old_port = sentinel_cluster.master_port()

    reply = await asyncio.to_thread(
        sentinel_cluster._sentinel_master, sentinel_cluster.sentinels[0].port
    )
    assert reply.get("num-slaves") == "2"
    from .redis_fixtures import _command

    assert _command(sentinel_cluster.sentinels[0].port, "SENTINEL", "FAILOVER", "mymaster") == b"OK"
    await eventually(lambda: sentinel_cluster.master_port() != old_port, timeout=15)
    # The subscriber's link follows: it reconnects and tells its handler.
    await eventually(lambda: rec.reconnects >= 1, timeout=10)
    deadline = time.monotonic() + 10
    after = [await publish_until_acked(pub, i, deadline) for i in range(5, 10)]
    # A repeated key of the old master's era is not published again.
    again = await publish_until_acked(pub, 4, deadline)
    assert (again.epoch, again.seq) == (epoch, 5)
    # Another server assigns seqs now: a new epoch, never seq 6 of the old one.
    assert {p.epoch for p in after} != {epoch}
    assert len({p.epoch for p in after}) == 1
    assert [p.seq for p in after] == [1, 2, 3, 4, 5]
    await eventually(lambda: {p.payload for p in after} <= {p.payload for p in rec.pubs})
    seen: dict[tuple[str, int], bytes] = {}
    for p in rec.pubs:
        assert seen.setdefault((p.epoch, p.seq), p.payload) == p.payload
    # A subscriber of the old epoch is told it cannot recover.
    res = await sub.history(CH, StreamPosition(epoch, 5))
    assert not res.recovered and res.position.epoch == after[0].epoch
    # Presence and the connection count are rebuilt on the new master.
    await eventually(lambda: _count(sub), timeout=10)
    assert set(await pub.presence.members(CH)) == {"c1"}
    await sub.ping()


async def _count(broker: Any) -> bool:
    try:
        return bool(await broker.presence.connection_count("ann") == 1)
    except BrokerUnavailable:
        return False
