"""Redis without a single point of failure: a master, two replicas and three Sentinels
(real processes on free ports), the broker and real hub nodes following failovers with no
silent gap and no reused seq (issue #17)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from revenge_ws.broker.base import PresenceInfo
from revenge_ws.config import HistoryFamily
from revenge_ws.exceptions import BrokerUnavailable
from revenge_ws.protocol import StreamPosition

from .helpers import API_KEY, HubProcess, start_hub_process
from .redis_fixtures import (
    MakeBroker,
    SentinelCluster,
    eventually,
    make_redis_broker,
    prefix,
    redis_url,
    sentinel_cluster,
)
from .test_cluster import request, ws_connect

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


@contextlib.contextmanager
def hub_nodes(url: str, n: int = 2) -> Iterator[list[HubProcess]]:
    nodes: list[HubProcess] = []
    try:
        for i in range(n):
            nodes.append(
                start_hub_process(
                    {
                        "REVENGE_BROKER_URL": url,
                        "REVENGE_NODE_ID": f"node{i}",
                        "REVENGE_BROKER_TIMEOUT": "1",
                    }
                )
            )
        yield nodes
    finally:
        for node in nodes:
            node.stop()
        for node in nodes:
            assert "Traceback" not in node.log(), node.log()


class Subscriber:
    """Records every (epoch, seq, i) and every reset of one socket on channel CH."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        #: ("pub", epoch, seq, i) or ("reset", epoch, seq, -1), in arrival order.
        self.events: list[tuple[str, str, int, int]] = []

    async def run(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            m = msg.json()
            if m["type"] == "test.item" and m["channel"] == CH:
                self.events.append(("pub", m["epoch"], m["seq"], m["data"]["i"]))
            elif m["type"] == "subscription.reset" and m["data"]["channel"] == CH:
                self.events.append(("reset", m["data"]["epoch"], m["data"]["seq"], -1))

    def covers(self, epoch: str, seq: int, i: int) -> bool:
        """Received (epoch, seq) with content i, or told by a reset that it was skipped:
        a reset to (epoch, s >= seq), or to another epoch after the last event of this
        one."""
        last_in_epoch = -1
        for n, (kind, e, s, got) in enumerate(self.events):
            if kind == "pub" and (e, s) == (epoch, seq):
                return got == i
            if kind == "reset" and e == epoch and s >= seq:
                return True
            if e == epoch:
                last_in_epoch = n
        return any(
            kind == "reset" and e != epoch and n > last_in_epoch
            for n, (kind, e, _, _) in enumerate(self.events)
        )

    def live_in(self, epoch: str) -> bool:
        return any(k == "pub" and e == epoch for k, e, _, _ in self.events)


async def test_master_killed_hub_nodes_follow_with_no_silent_gap(
    sentinel_cluster: SentinelCluster,
) -> None:
    cl = sentinel_cluster
    with hub_nodes(cl.url) as (n0, n1):
        timeout = aiohttp.ClientTimeout(total=5)  # a publish that hangs fails the test
        async with aiohttp.ClientSession(timeout=timeout) as s:
            subs = [Subscriber(await ws_connect(s, node, "sam")) for node in (n0, n1)]
            for sub in subs:
                ack = await request(sub.ws, "subscribe", {"channels": [CH]}, "s")
                assert ack["type"] == "ack", ack
            readers = [asyncio.create_task(sub.run()) for sub in subs]
            acked: list[tuple[str, int, int]] = []
            failures: list[float] = []
            old_port = cl.master_port()
            killed_at = promoted_at = 0.0

            async def publish(i: int) -> None:
                # Alternate nodes; retry the same idempotency key until acked.
                for attempt in range(400):
                    node = (n0, n1)[(i + attempt) % 2]
                    async with s.post(
                        f"{node.url}/api/v1/realtime/publish",
                        headers={"Authorization": f"Bearer {API_KEY}"},
                        json={"channel": CH, "type": "test.item", "data": {"i": i},
                              "idempotency_key": f"k{i}"},
                    ) as r:  # fmt: skip
                        body = await r.json()
                    if r.status == 200:
                        acked.append((body["epoch"], body["seq"], i))
                        return
                    assert (r.status, body["error"]["code"]) == (503, "UNAVAILABLE"), body
                    failures.append(time.monotonic())
                    await asyncio.sleep(0.05)
                raise AssertionError(f"publication {i} never acked")

            async def watch() -> None:
                nonlocal promoted_at
                while True:
                    with contextlib.suppress(OSError, ValueError):
                        if await asyncio.to_thread(cl.master_port) != old_port:
                            promoted_at = time.monotonic()
                            return
                    await asyncio.sleep(0.05)

            i = 0
            ready_checked = False
            watcher: asyncio.Task[None] | None = None
            start = time.monotonic()
            while True:
                now = time.monotonic()
                if not killed_at and now - start > 1.5:
                    cl.process_on(old_port).stop()  # SIGKILL
                    killed_at = time.monotonic()
                    watcher = asyncio.create_task(watch())
                if killed_at and not promoted_at and not ready_checked and failures:
                    async with s.get(f"{n0.url}/readyz") as r:
                        ready = await r.json()
                    if r.status == 503:
                        ready_checked = True
                        assert ready["checks"]["broker"].startswith("unavailable")
                if (
                    promoted_at
                    and now - promoted_at > 3
                    and all(sub.live_in(acked[-1][0]) for sub in subs)
                ):
                    break
                assert now - start < 40, "the failover did not complete"
                await publish(i)
                i += 1
                await asyncio.sleep(max(0.0, start + i / 100 - time.monotonic()))
            assert watcher is not None
            await watcher
            # During the failover publishing failed fast, and only then.
            assert failures, "the master was killed but nothing failed"
            assert all(killed_at <= t <= promoted_at + 10 for t in failures)
            # Sockets stayed open; deliveries arrive.
            await asyncio.sleep(1.0)
            for sub in subs:
                assert not sub.ws.closed
            # No (epoch, seq) with two contents, anywhere.
            contents: dict[tuple[str, int], set[int]] = {}
            for e, sq, n in acked:
                contents.setdefault((e, sq), set()).add(n)
            for sub in subs:
                for kind, e, sq, n in sub.events:
                    if kind == "pub":
                        contents.setdefault((e, sq), set()).add(n)
            assert all(len(v) == 1 for v in contents.values()), contents
            # Every acked publication was received, or its subscriber was told.
            for sub in subs:
                missing = [a for a in acked if not sub.covers(*a)]
                assert not missing, (missing, sub.events[-20:])
            # The failover is visible as a new epoch; live delivery resumed in it.
            epochs = {e for e, _, _ in acked}
            assert len(epochs) >= 2
            # Presence and SyncPlay rooms work on the new master.
            async with s.get(
                f"{n1.url}/api/v1/realtime/presence/{CH}",
                headers={"Authorization": f"Bearer {API_KEY}"},
            ) as r:
                assert r.status == 200
                assert {m["user_id"] for m in (await r.json())["members"]} == {"sam"}
            a = await ws_connect(s, n0, "alice")
            b = await ws_connect(s, n1, "bob")
            made = await request(
                a, "syncplay.create", {"name": "R", "content": {"type": "movie", "id": "m"}}, "c"
            )
            assert made["type"] == "ack", made
            rid = made["data"]["room"]["room_id"]
            joined = await request(b, "syncplay.join", {"room_id": rid}, "j")
            assert joined["type"] == "ack", joined
            for ws in (a, b, *(sub.ws for sub in subs)):
                await ws.close()
            for task in readers:
                await task
            print(
                f"killed→promoted {promoted_at - killed_at:.2f}s, "
                f"failures {len(failures)} from +{failures[0] - killed_at:.2f}s to "
                f"+{failures[-1] - killed_at:.2f}s, acked {len(acked)}, epochs {len(epochs)}"
            )
