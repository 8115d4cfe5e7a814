"""The Broker Protocol (broker/base.py), run against every implementation.

Each test runs on the in-process ``MemoryBroker`` and on the ``RedisBroker`` (private
redis-server): both must assign seq/epoch, keep history, recover and dedupe identically.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from revenge_ws.broker.base import Broker, PresenceInfo, Publication
from revenge_ws.broker.memory import MemoryBroker
from revenge_ws.config import HistoryFamily
from revenge_ws.exceptions import BrokerUnavailable
from revenge_ws.protocol import StreamPosition, encode_publication, frame_text

from .redis_fixtures import (
    MakeBroker,
    Recorder,
    eventually,
    make_redis_broker,
    prefix,
    redis_url,
)

__all__ = ["make_redis_broker", "prefix", "redis_url"]

FAM = HistoryFamily(size=100, ttl=300)
CH = "library"


@dataclass
class Subject:
    name: str
    broker: Broker
    handler: Recorder

    async def delivered(self, n: int, channel: str = CH) -> list[int]:
        """Wait until ``n`` publications of ``channel`` arrived; return their seqs."""
        await eventually(lambda: len(self.handler.seqs(channel)) >= n)
        await asyncio.sleep(0.02 if self.name == "redis" else 0)  # nothing more comes
        return self.handler.seqs(channel)


@pytest.fixture(params=["memory", "redis"])
async def subject(
    request: pytest.FixtureRequest, make_redis_broker: MakeBroker
) -> AsyncIterator[Subject]:
    if request.param == "memory":
        broker: Broker = MemoryBroker()
        handler = Recorder()
        await broker.start(handler)
        yield Subject("memory", broker, handler)
        await broker.close()
    else:
        rb, handler = await make_redis_broker()
        yield Subject("redis", rb, handler)


async def publish_n(
    b: Broker, n: int, channel: str = CH, fam: HistoryFamily = FAM
) -> list[Publication]:
    return [await b.publish(channel, "item.updated", {"i": i}, fam) for i in range(n)]


# -- seq / epoch / payload -------------------------------------------------------------------
async def test_seq_starts_at_one_and_increments_within_one_epoch(subject: Subject) -> None:
    pubs = await publish_n(subject.broker, 5)
    assert [p.seq for p in pubs] == [1, 2, 3, 4, 5]
    assert len({p.epoch for p in pubs}) == 1 and pubs[0].epoch
    res = await subject.broker.history(CH)
    assert res.position == StreamPosition(pubs[0].epoch, 5)
    assert res.recovered and res.publications == []


async def test_channels_are_independent(subject: Subject) -> None:
    await publish_n(subject.broker, 3, "library")
    other = await subject.broker.publish("server", "x", {}, FAM)
    assert other.seq == 1


async def test_payload_is_the_envelope_encoded_once(subject: Subject) -> None:
    pub = await subject.broker.publish(CH, "item.updated", {"id": "é", "n": [1, 2]}, FAM)
    assert pub.payload == encode_publication(
        CH, "item.updated", 1, pub.epoch, {"id": "é", "n": [1, 2]}, pub.timestamp
    )
    assert pub.frame == frame_text(pub.payload)
    assert pub.timestamp.endswith("Z") and pub.created_ms > 0
    (again,) = (await subject.broker.history(CH, None, 1)).publications
    assert again.payload == pub.payload and again.data == pub.data and again.type == pub.type


async def test_history_of_a_new_channel_starts_an_epoch_that_publish_continues(
    subject: Subject,
) -> None:
    first = await subject.broker.history(CH)
    assert first.position.seq == 0 and first.position.epoch and first.recovered
    assert (await subject.broker.history(CH)).position == first.position
    res = await subject.broker.history(CH, StreamPosition(first.position.epoch, 0))
    assert res.recovered and res.publications == []
    pub = await subject.broker.publish(CH, "x", {}, FAM)
    assert pub.position == StreamPosition(first.position.epoch, 1)


# -- history / recovery --------------------------------------------------------------------
async def test_history_without_since_returns_the_last_limit(subject: Subject) -> None:
    pubs = await publish_n(subject.broker, 5)
    b = subject.broker
    assert (await b.history(CH, None, 0)).publications == []
    res = await b.history(CH, None, 2)
    assert [p.seq for p in res.publications] == [4, 5] and res.recovered
    assert [p.seq for p in (await b.history(CH, None, 50)).publications] == [1, 2, 3, 4, 5]
    assert [p.data for p in (await b.history(CH, None, 50)).publications] == [p.data for p in pubs]


async def test_recovery_returns_everything_after_since(subject: Subject) -> None:
    pubs = await publish_n(subject.broker, 5)
    epoch = pubs[0].epoch
    res = await subject.broker.history(CH, StreamPosition(epoch, 2))
    assert res.recovered and [p.seq for p in res.publications] == [3, 4, 5]
    assert [p.payload for p in res.publications] == [p.payload for p in pubs[2:]]
    res = await subject.broker.history(CH, StreamPosition(epoch, 0))
    assert res.recovered and [p.seq for p in res.publications] == [1, 2, 3, 4, 5]
    top = await subject.broker.history(CH, StreamPosition(epoch, 5))
    assert top.recovered and top.publications == [] and top.position.seq == 5


@pytest.mark.parametrize("since", [("other", 2), ("SAME", 9)])
async def test_unknown_epoch_or_future_seq_is_not_recovered(
    subject: Subject, since: tuple[str, int]
) -> None:
    pubs = await publish_n(subject.broker, 5)
    epoch = pubs[0].epoch if since[0] == "SAME" else since[0]
    res = await subject.broker.history(CH, StreamPosition(epoch, since[1]))
    assert not res.recovered and res.publications == []
    assert res.position == StreamPosition(pubs[0].epoch, 5)


async def test_since_outside_the_retained_window_is_never_partial(subject: Subject) -> None:
    fam = HistoryFamily(size=3, ttl=300)
    pubs = await publish_n(subject.broker, 5, fam=fam)
    epoch = pubs[0].epoch
    assert [p.seq for p in (await subject.broker.history(CH, None, 10)).publications] == [3, 4, 5]
    res = await subject.broker.history(CH, StreamPosition(epoch, 1))
    assert not res.recovered and res.publications == []
    res = await subject.broker.history(CH, StreamPosition(epoch, 2))
    assert res.recovered and [p.seq for p in res.publications] == [3, 4, 5]


async def test_more_missed_than_limit_is_not_recovered(subject: Subject) -> None:
    pubs = await publish_n(subject.broker, 5)
    epoch = pubs[0].epoch
    res = await subject.broker.history(CH, StreamPosition(epoch, 1), limit=3)
    assert not res.recovered and res.publications == []
    res = await subject.broker.history(CH, StreamPosition(epoch, 2), limit=3)
    assert res.recovered and [p.seq for p in res.publications] == [3, 4, 5]


async def test_expired_history_is_not_returned_nor_recovered(subject: Subject) -> None:
    fam = HistoryFamily(size=10, ttl=0.3)
    pubs = await publish_n(subject.broker, 2, fam=fam)
    epoch = pubs[0].epoch
    await asyncio.sleep(0.45)
    b = subject.broker
    assert (await b.history(CH, None, 10)).publications == []
    assert not (await b.history(CH, StreamPosition(epoch, 0))).recovered
    top = await b.history(CH, StreamPosition(epoch, 2))
    assert top.recovered and top.position == StreamPosition(epoch, 2)
    third = await b.publish(CH, "x", {}, fam)
    assert third.position == StreamPosition(epoch, 3)
    res = await b.history(CH, StreamPosition(epoch, 2))
    assert res.recovered and [p.seq for p in res.publications] == [3]


async def test_a_family_without_history_still_counts(subject: Subject) -> None:
    fam = HistoryFamily(size=0, ttl=300)
    pubs = await publish_n(subject.broker, 3, fam=fam)
    assert [p.seq for p in pubs] == [1, 2, 3]
    assert (await subject.broker.history(CH, None, 10)).publications == []
    assert not (await subject.broker.history(CH, StreamPosition(pubs[0].epoch, 1))).recovered


# -- idempotency -----------------------------------------------------------------------------
async def test_idempotency_key_publishes_once(subject: Subject) -> None:
    b = subject.broker
    await b.subscribe(CH)
    first = await b.publish(CH, "x", {"v": 1}, FAM, idempotency_key="k1")
    again = await b.publish(CH, "x", {"v": 2}, FAM, idempotency_key="k1")
    assert again.position == first.position and again.data == {"v": 1}
    other = await b.publish(CH, "x", {"v": 3}, FAM, idempotency_key="k2")
    assert other.seq == first.seq + 1
    elsewhere = await b.publish("server", "x", {}, FAM, idempotency_key="k1")
    assert elsewhere.seq == 1
    assert (await b.history(CH)).position.seq == 2
    assert await subject.delivered(2) == [1, 2]


# -- delivery --------------------------------------------------------------------------------
async def test_subscribed_channels_are_delivered_in_seq_order(subject: Subject) -> None:
    b = subject.broker
    await b.subscribe(CH)
    pubs = await asyncio.gather(*(b.publish(CH, "x", {"i": i}, FAM) for i in range(30)))
    assert sorted(p.seq for p in pubs) == list(range(1, 31))
    await b.publish("server", "x", {}, FAM)  # not subscribed: never delivered
    assert await subject.delivered(30) == list(range(1, 31))
    by_seq = {p.seq: p.payload for p in pubs}
    assert all(p.payload == by_seq[p.seq] for p in subject.handler.pubs)
    assert all(p.channel == CH for p in subject.handler.pubs)


async def test_unsubscribe_stops_delivery(subject: Subject) -> None:
    b = subject.broker
    await b.subscribe(CH)
    await b.publish(CH, "x", {}, FAM)
    await subject.delivered(1)
    await b.unsubscribe(CH)
    await b.publish(CH, "x", {}, FAM)
    await b.subscribe("server")
    await b.publish("server", "x", {}, FAM)
    await subject.delivered(1, "server")
    assert subject.handler.seqs(CH) == [1]


async def test_control_message_reaches_this_node(subject: Subject) -> None:
    await subject.broker.publish_control({"op": "disconnect", "user_id": "u1"})
    await eventually(lambda: subject.handler.controls == [{"op": "disconnect", "user_id": "u1"}])


# -- presence --------------------------------------------------------------------------------
async def test_presence_members(subject: Subject) -> None:
    p = subject.broker.presence
    await p.add(CH, "c1", PresenceInfo("u1", "Ann", "n1"))
    await p.add(CH, "c2", PresenceInfo("u2", "Bob", "n1"))
    await p.add("server", "c3", PresenceInfo("u3", "Cy", "n1"))
    assert await p.members(CH) == {
        "c1": PresenceInfo("u1", "Ann", "n1"),
        "c2": PresenceInfo("u2", "Bob", "n1"),
    }
    await p.remove(CH, "c1")
    await p.remove(CH, "nobody")
    assert list(await p.members(CH)) == ["c2"]
    assert await p.members("empty") == {}


async def test_connection_counting(subject: Subject) -> None:
    p = subject.broker.presence
    assert await p.connection_count("u1") == 0
    assert await p.online_users() == 0
    assert [await p.add_connection("u1", c) for c in ("a", "b", "c")] == [1, 2, 3]
    assert await p.add_connection("u2", "z") == 1
    assert await p.connection_count("u1") == 3
    assert await p.online_users() == 2
    assert await p.remove_connection("u1", "b") == 2
    assert await p.remove_connection("u1", "b") == 2
    assert await p.remove_connection("u2", "z") == 0
    assert await p.remove_connection("nobody", "x") == 0
    assert await p.online_users() == 1


# -- kv --------------------------------------------------------------------------------------
async def test_key_value(subject: Subject) -> None:
    b = subject.broker
    assert await b.get_value("k") is None
    assert await b.set_if_absent("k", "v1", 10) is None
    assert await b.set_if_absent("k", "v2", 10) == "v1"
    assert await b.get_value("k") == "v1"
    await b.set_value("k", "v3", 10)
    assert await b.get_value("k") == "v3"
    await b.set_value("short", "x", 0.2)
    assert await b.set_if_absent("brief", "y", 0.2) is None
    await asyncio.sleep(0.35)
    assert await b.get_value("short") is None
    assert await b.set_if_absent("brief", "z", 10) is None
    assert await b.get_value("brief") == "z"
    assert await b.get_values(["k", "short", "brief", "never"]) == ["v3", None, "z", None]
    assert await b.get_values([]) == []
    many = {f"m{i}": str(i) for i in range(2_500)}  # more than one Redis pipeline
    await b.set_values(many, 10)
    await b.set_values({}, 10)
    assert await b.get_values(list(many)) == list(many.values())


async def test_ping(subject: Subject, make_redis_broker: MakeBroker) -> None:
    """``ping`` returns at once, with nothing, exactly when the broker serves (a publish
    right after it is delivered); a broker whose backend cannot be reached raises
    ``BrokerUnavailable`` (the in-process broker has no backend to lose)."""
    await subject.broker.subscribe(CH)
    assert await asyncio.wait_for(subject.broker.ping(), 2.0) is None
    pub = await subject.broker.publish(CH, "item.updated", {"i": 0}, FAM)
    assert await subject.delivered(1) == [pub.seq]
    if subject.name == "memory":
        return
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down, _ = await make_redis_broker(url=f"redis://127.0.0.1:{port}", timeout=0.5)
    with pytest.raises(BrokerUnavailable):
        await asyncio.wait_for(down.ping(), 2.0)


async def test_memory_kv_forgets_keys_when_they_expire_not_only_when_read() -> None:
    """Idempotency keys are written for every publish and never read again: the memory
    broker must drop them as they expire (not keep them until a 100,000-key sweep, which
    looked like a leak in the soak), and keep what has not expired."""
    now = [1000.0]
    b = MemoryBroker(clock=lambda: now[0])
    await b.set_value("revoked:u", "1", 30 * 24 * 3600)  # long-lived, written first
    for i in range(1000):
        await b.set_if_absent(f"idem:{i}", "x", 600)
    await b.set_value("idem:0", "again", 600)  # an overwrite leaves a stale heap entry
    now[0] += 601
    await b.set_if_absent("idem:new", "x", 600)
    assert set(b._kv) == {"revoked:u", "idem:new"}
    assert len(b._kv_expiry) <= 3
    assert await b.get_value("revoked:u") == "1"


async def test_memory_history_expires_on_channels_nobody_reads() -> None:
    """Past its TTL a publication leaves the history of a channel that is never read again
    (the sweep runs during publishes, once a minute); the channel keeps its position, and
    a channel left without history gives its deque back."""
    from revenge_ws.broker import memory

    now = [1000.0]
    b = MemoryBroker(clock=lambda: now[0])
    short, long = HistoryFamily(size=10, ttl=30), HistoryFamily(size=10, ttl=3600)
    for _ in range(3):
        await b.publish("library:once", "t", {}, short)
    await b.publish("notifications:u", "t", {}, long)
    before = await b.history("library:once", None, 10)
    now[0] += memory.SWEEP_INTERVAL + 1
    await b.publish("library:other", "t", {}, short)  # a publish runs the sweep
    assert b._channels["library:once"].history is memory._NO_HISTORY
    assert len(b._channels["notifications:u"].history) == 1  # not expired
    after = await b.history("library:once", None, 10)
    assert after.position == before.position and after.publications == []
