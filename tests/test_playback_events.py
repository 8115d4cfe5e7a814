"""Playback events to the backend (contract §13): a real HTTP receiver on 127.0.0.1 that
answers 2xx or 500, hangs, or is down; real stores (SQLite files, PostgreSQL); real hub
processes killed with SIGKILL."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from revenge_ws.app import build_app
from revenge_ws.auth import mint_token
from revenge_ws.broker import open_broker
from revenge_ws.core.node import Node
from revenge_ws.features.playback_events import (
    PLAYBACK_EVENTS,
    TOPIC,
    PlaybackEvents,
    install,
)
from revenge_ws.features.web import NODE
from revenge_ws.store import NotificationStore
from revenge_ws.store.sqlite import SQLiteNotificationStore

from .helpers import (
    API_KEY,
    SECRET,
    free_port,
    make_settings,
    running_hub,
    start_hub_process,
    until,
)
from .store_fixtures import Backend, backend, pg_database

# Re-exported so pytest finds them in this module; see store_fixtures.
__all__ = ["backend", "pg_database"]

EVENT_KEYS = {"event_id", "user_id", "device_id", "at"}


@dataclass
class Receiver:
    """The backend's playback endpoint: answers ``mode`` (``ok``: 204, ``500``, ``hang``:
    nothing until the test ends), or is down (:meth:`down`: its port closed)."""

    port: int = field(default_factory=free_port)
    mode: str = "ok"
    #: Every POST that arrived: its events' ids, in arrival order.
    attempts: list[list[str]] = field(default_factory=list)
    #: The events of the POSTs answered 2xx.
    delivered: list[dict[str, Any]] = field(default_factory=list)
    #: Sizes of the POSTs answered 2xx.
    batches: list[int] = field(default_factory=list)
    authorizations: set[str | None] = field(default_factory=set)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/internal/playback-events"

    async def handle(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        events = body["events"]
        self.attempts.append([e["event_id"] for e in events])
        self.authorizations.add(request.headers.get("Authorization"))
        if self.mode == "500":
            return web.Response(status=500, text="backend broken")
        if self.mode == "hang":
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(30):
                    await self.released.wait()
            return web.Response(status=503)
        self.delivered.extend(events)
        self.batches.append(len(events))
        return web.Response(status=204)

    async def up(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/internal/playback-events", self.handle)
        self.runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def down(self) -> None:
        self.released.set()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        self.released = asyncio.Event()

    def ids(self) -> list[str]:
        return [e["event_id"] for e in self.delivered]

    def of(self, device_id: str) -> list[dict[str, Any]]:
        return [e for e in self.delivered if e["device_id"] == device_id]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.up()
    try:
        yield r
    finally:
        await r.down()


@pytest.fixture
async def down_receiver() -> AsyncIterator[Receiver]:
    """A receiver whose port is closed until the test calls ``up()``."""
    r = Receiver()
    try:
        yield r
    finally:
        await r.down()


def backend_env(url: str, **overrides: str) -> dict[str, str]:
    env = {
        "REVENGE_BACKEND_PLAYBACK_URL": url,
        "REVENGE_BACKEND_BATCH_INTERVAL": "0.05",
        "REVENGE_BACKEND_MAX_BACKOFF": "0.1",
        "REVENGE_BACKEND_REQUEST_TIMEOUT": "5",
    }
    env.update({f"REVENGE_BACKEND_{k.upper()}": v for k, v in overrides.items()})
    return env


Start = Callable[..., Awaitable[PlaybackEvents]]


@pytest.fixture
async def sender(tmp_path: Path) -> AsyncIterator[Start]:
    """``await sender(url, store=None, **backend_settings)``: a started PlaybackEvents on a
    node of its own (a SQLite file store unless one is given); stopped at the end."""
    started: list[PlaybackEvents] = []
    stores: list[NotificationStore] = []

    async def start(
        url: str, store: NotificationStore | None = None, **overrides: str
    ) -> PlaybackEvents:
        if store is None:
            store = SQLiteNotificationStore(tmp_path / f"store-{len(stores)}.db")
            stores.append(store)
            await store.start()
        settings = make_settings(backend_env(url, **overrides))
        node = Node(settings, open_broker(settings))
        feature = install(node, web.Application(), store)
        assert feature is not None
        await feature.start(node)
        started.append(feature)
        return feature

    try:
        yield start
    finally:
        for feature in started:
            await asyncio.wait_for(feature.stop(), 30)
        for store in stores:
            await store.close()


def update(state: str = "playing", item: str = "movie-1", position: float = 0.0) -> dict[str, Any]:
    return {"item_id": item, "state": state, "position": position, "rate": 1.0}


def metric(feature: PlaybackEvents, name: str, **labels: str) -> float:
    registry = feature.metrics.registry
    return float(registry.get_sample_value(name, labels) or 0.0)


# -- delivery ------------------------------------------------------------------------------


async def test_events_arrive_in_batches_with_their_fields(
    receiver: Receiver, sender: Start
) -> None:
    feature = await sender(receiver.url, batch_interval="0.3")
    await feature.record("alice", "tv", update("playing", "movie-1", 12.5), durable=True)
    for n in range(1200):
        await feature.record("bob", f"phone-{n}", update(position=float(n)), durable=False)
    await until(lambda: len(receiver.delivered) == 1201, 30, "every event delivered")
    assert receiver.authorizations == {f"Bearer {API_KEY}"}
    # At most batch_size (500) per POST, and no event twice.
    assert max(receiver.batches) <= 500 and len(receiver.batches) >= 3
    assert len(set(receiver.ids())) == 1201
    [tv] = receiver.of("tv")
    assert set(tv) == EVENT_KEYS | {"item_id", "state", "position", "rate"}
    assert (tv["user_id"], tv["item_id"], tv["state"], tv["position"]) == (
        "alice",
        "movie-1",
        "playing",
        12.5,
    )
    assert isinstance(tv["at"], int) and len(tv["event_id"]) == 26
    assert {e["position"] for e in receiver.delivered if e["user_id"] == "bob"} == {
        float(n) for n in range(1200)
    }
    await until(lambda: metric(feature, "revenge_playback_events_delivered_total") == 1201)
    await until(lambda: feature.outbox_count == 0 and not feature.progress)
    assert metric(feature, "revenge_playback_events_pending", kind="durable") == 0
    assert metric(feature, "revenge_playback_events_oldest_seconds") == 0


async def test_batches_are_ordered_by_time(receiver: Receiver, sender: Start) -> None:
    feature = await sender(receiver.url, batch_interval="0.5")
    await feature.record("alice", "tv", update("playing", "a", 1), durable=False)
    await feature.record("alice", "tv", update("stopped", "a", 2), durable=True)
    await feature.record("alice", "tv", update("playing", "b", 0), durable=True)
    await feature.record("alice", "tv", update("playing", "b", 5), durable=False)
    await until(lambda: len(receiver.delivered) == 3, 10)
    # The first progress was superseded by the stop; the rest in the order recorded.
    assert [(e["item_id"], e["state"], e["position"]) for e in receiver.delivered] == [
        ("a", "stopped", 2),
        ("b", "playing", 0),
        ("b", "playing", 5),
    ]
    assert [e["at"] for e in receiver.delivered] == sorted(e["at"] for e in receiver.delivered)


async def test_a_500_is_retried_with_the_same_event_ids(
    receiver: Receiver, sender: Start, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.mode = "500"
    caplog.set_level(logging.DEBUG, logger="revenge_ws.playback_events")
    feature = await sender(receiver.url)
    await feature.record("alice", "tv", update("stopped"), durable=True)
    await feature.record("alice", "phone", update(position=3), durable=False)
    await until(lambda: len(receiver.attempts) >= 4, 20, "four attempts")
    first = sorted(receiver.attempts[0])
    assert len(first) == 2
    assert all(sorted(a) == first for a in receiver.attempts)
    # The receiver counts a POST before it answers: the sender's count may lag by one.
    await until(
        lambda: metric(feature, "revenge_playback_delivery_failures_total", reason="status") >= 4
    )
    assert feature.outbox_count == 1
    receiver.mode = "ok"
    await until(lambda: len(receiver.delivered) == 2, 20)
    assert sorted(receiver.ids()) == first
    await until(lambda: feature.outbox_count == 0)
    assert "HTTP 500" in caplog.text
    assert API_KEY not in caplog.text


async def test_a_hanging_backend_times_out_and_is_retried(
    receiver: Receiver, sender: Start
) -> None:
    receiver.mode = "hang"
    feature = await sender(receiver.url, request_timeout="0.3")
    await feature.record("alice", "tv", update("stopped"), durable=True)
    await until(lambda: len(receiver.attempts) >= 2, 20, "a retry after the timeout")
    assert metric(feature, "revenge_playback_delivery_failures_total", reason="timeout") >= 1
    receiver.mode = "ok"
    await until(lambda: len(receiver.delivered) == 1, 20)
    assert receiver.ids() == receiver.attempts[0]


async def test_a_down_backend_conflates_progress_and_keeps_durable_events(
    down_receiver: Receiver, sender: Start, backend: Backend
) -> None:
    store = await backend.open()
    feature = await sender(down_receiver.url, store=store)
    await feature.record("alice", "tv", update("playing", "movie-1", 0), durable=True)
    for position in range(1, 51):
        await feature.record("alice", "tv", update("playing", "movie-1", position), durable=False)
    await feature.record("alice", "tv", update("stopped", "movie-1", 51), durable=True)
    for position in range(100, 121):
        await feature.record("bob", "phone", update("playing", "song", position), durable=False)
    await until(
        lambda: (
            metric(feature, "revenge_playback_delivery_failures_total", reason="connection") >= 3
        ),
        20,
    )
    assert metric(feature, "revenge_playback_events_pending", kind="durable") == 2
    assert metric(feature, "revenge_playback_events_pending", kind="progress") == 1
    await until(lambda: metric(feature, "revenge_playback_events_oldest_seconds") > 0)
    assert (await store.outbox_stats(TOPIC))[0] == 2
    await down_receiver.up()
    await until(lambda: len(down_receiver.delivered) == 3, 20)
    # The two durable events of the tv; of bob's 21 progress updates only the newest.
    tv = down_receiver.of("tv")
    assert [(e["state"], e["position"]) for e in tv] == [("playing", 0), ("stopped", 51)]
    assert [e["position"] for e in down_receiver.of("phone")] == [120]
    await until(lambda: feature.outbox_count == 0)
    assert await store.outbox_stats(TOPIC) == (0, None)


async def test_progress_in_memory_is_bounded(down_receiver: Receiver, sender: Start) -> None:
    feature = await sender(down_receiver.url, max_progress="10")
    for n in range(25):
        await feature.record("alice", f"device-{n}", update(position=n), durable=False)
    assert len(feature.progress) == 10
    assert metric(feature, "revenge_playback_events_dropped_total") == 15
    # Durable events are never dropped.
    for n in range(5):
        await feature.record("bob", f"tv-{n}", update("stopped"), durable=True)
    assert feature.outbox_count == 5 and len(feature.progress) == 10
    await down_receiver.up()
    await until(lambda: len(down_receiver.delivered) == 15, 20)
    assert {e["device_id"] for e in down_receiver.delivered if e["user_id"] == "alice"} == {
        f"device-{n}" for n in range(15, 25)
    }


async def test_outbox_events_of_an_earlier_run_are_sent_on_start(
    down_receiver: Receiver, sender: Start, tmp_path: Path
) -> None:
    store = SQLiteNotificationStore(tmp_path / "shared.db")
    await store.start()
    try:
        first = await sender(down_receiver.url, store=store, flush_timeout="0.5")
        await first.record("alice", "tv", update("stopped"), durable=True)
        await first.record("alice", "phone", update(), durable=False)
        await until(
            lambda: (
                metric(first, "revenge_playback_delivery_failures_total", reason="connection") >= 1
            )
        )
        await asyncio.wait_for(first.stop(), 10)
        # The stop handed the claim back: the event is there for the next start.
        [pending] = await store.outbox_claim(TOPIC, 10, 0)
        await down_receiver.up()
        second = await sender(down_receiver.url, store=store)
        await until(lambda: len(down_receiver.delivered) == 1, 20)
        assert down_receiver.ids() == [pending.event_id]
        assert down_receiver.delivered[0]["device_id"] == "tv"  # the progress was lost
        await until(lambda: second.outbox_count == 0)
    finally:
        await store.close()


async def test_stop_flushes_what_is_waiting(receiver: Receiver, sender: Start) -> None:
    feature = await sender(receiver.url, batch_interval="30")
    await feature.record("alice", "tv", update(position=7), durable=False)
    await feature.record("alice", "phone", update("stopped"), durable=True)
    assert receiver.delivered == []  # waiting for the batch interval
    await asyncio.wait_for(feature.stop(), 10)
    assert sorted(e["device_id"] for e in receiver.delivered) == ["phone", "tv"]
    assert feature.outbox_count == 0


async def test_stop_is_bounded_when_the_backend_hangs(receiver: Receiver, sender: Start) -> None:
    receiver.mode = "hang"
    feature = await sender(receiver.url, flush_timeout="0.5", request_timeout="60")
    await feature.record("alice", "tv", update("stopped"), durable=True)
    await until(lambda: len(receiver.attempts) == 1)
    await asyncio.wait_for(feature.stop(), 10)  # not the 60 s request timeout
    # The claim was handed back: nothing waits for the lease to end.
    assert len(await feature._store.outbox_claim(TOPIC, 10, 0)) == 1


# -- configuration, wiring, metrics ---------------------------------------------------------


async def test_without_a_url_nothing_is_installed() -> None:
    settings = make_settings()
    assert settings.backend.playback_url is None
    node = Node(settings, open_broker(settings))
    store = SQLiteNotificationStore(":memory:")
    assert install(node, web.Application(), store) is None
    assert node.on_stop == []
    app = build_app(settings)
    assert PLAYBACK_EVENTS not in app


async def test_the_hub_exports_the_metrics(receiver: Receiver) -> None:
    async with running_hub(make_settings(backend_env(receiver.url))) as hub:
        feature = hub.app[PLAYBACK_EVENTS]
        await feature.record("alice", "tv", update("stopped"), durable=True)
        await until(lambda: len(receiver.delivered) == 1, 10)
        await until(lambda: feature.outbox_count == 0)
        status, text = await hub.request("GET", "/metrics", headers={})
        assert status == 200
        for line in (
            "revenge_playback_events_delivered_total 1.0",
            'revenge_playback_events_pending{kind="durable"} 0.0',
            'revenge_playback_events_pending{kind="progress"} 0.0',
            "revenge_playback_events_oldest_seconds 0.0",
            "revenge_playback_events_dropped_total 0.0",
        ):
            assert line in text
        assert 'revenge_playback_delivery_failures_total{reason="status"} 0.0' in text


# -- SIGKILL ---------------------------------------------------------------------------------

# Records one durable event through PlaybackEvents in a process of its own (as the devices
# feature does before it acks a playback.update), says so, and keeps trying to deliver it.
RECORDER = textwrap.dedent(
    """
    import asyncio, os, sys
    from aiohttp import web
    from revenge_ws.broker import open_broker
    from revenge_ws.config import load_settings
    from revenge_ws.core.node import Node
    from revenge_ws.features.playback_events import install
    from revenge_ws.store import open_store

    async def main():
        settings = load_settings()
        store = open_store(settings.store.url)
        await store.start()
        node = Node(settings, open_broker(settings))
        feature = install(node, web.Application(), store)
        await feature.start(node)
        update = {"item_id": "movie-1", "state": "stopped", "position": 42.0}
        await feature.record("alice", "tv", update, durable=True)
        print("recorded", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


def hub_env(store: Path, receiver: Receiver) -> dict[str, str]:
    return {
        "REVENGE_STORE_URL": f"sqlite:///{store}",
        **backend_env(receiver.url, request_timeout="1", max_backoff="0.3"),
    }


def kill(proc: subprocess.Popen[Any]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


@pytest.mark.slow
async def test_a_recorded_event_survives_sigkill(down_receiver: Receiver, tmp_path: Path) -> None:
    store = tmp_path / "hub.sqlite3"
    env = {k: v for k, v in os.environ.items() if not k.startswith("REVENGE_")}
    env.update({"REVENGE_JWT_SECRET": SECRET, "REVENGE_API_KEYS": API_KEY})
    env.update(hub_env(store, down_receiver))
    recorder = subprocess.Popen(
        [sys.executable, "-c", RECORDER],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert recorder.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(recorder.stdout.readline), 30)
        assert line.strip() == "recorded", line + recorder.stdout.read()
    finally:
        kill(recorder)
        if recorder.stdout is not None:
            recorder.stdout.close()
    # The hub that starts next finds it in the outbox and delivers it once the backend is up.
    hp = start_hub_process(hub_env(store, down_receiver))
    try:
        await down_receiver.up()
        await until(lambda: len(down_receiver.delivered) >= 1, 30, "the event after SIGKILL")
        [event] = down_receiver.delivered
        assert (event["user_id"], event["device_id"], event["state"], event["position"]) == (
            "alice",
            "tv",
            "stopped",
            42.0,
        )
    finally:
        assert hp.stop() == 0


@pytest.mark.slow
async def test_a_stopped_update_acked_before_sigkill_reaches_the_backend(
    down_receiver: Receiver, tmp_path: Path
) -> None:
    """End to end: device.hello, playback.update ``stopped`` acked, the hub SIGKILLed while
    the backend is down, the hub restarted, the backend up: the event arrives."""
    if "playback.update" not in build_app(make_settings())[NODE].handlers:
        pytest.skip("the devices feature is not wired into the app yet")
    store = tmp_path / "hub.sqlite3"
    env = hub_env(store, down_receiver)
    hp = start_hub_process(env)
    try:
        token = mint_token(make_settings().jwt, "alice")
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{hp.ws_url}?token={token}", protocols=["revenge.v1"]) as ws,
        ):
            assert (await ws.receive_json(timeout=5))["type"] == "welcome"

            async def request(mtype: str, data: dict[str, Any], mid: str) -> dict[str, Any]:
                await ws.send_json({"type": mtype, "id": mid, "data": data})
                while True:
                    msg = await ws.receive_json(timeout=10)
                    if msg.get("id") == mid:
                        return dict(msg)

            hello = {"device_id": "tv", "name": "Living room", "client": "test", "version": "1"}
            assert (await request("device.hello", hello, "h1"))["type"] == "ack"
            stopped = {"item_id": "movie-1", "state": "stopped", "position": 42.0}
            assert (await request("playback.update", stopped, "p1"))["type"] == "ack"
        hp.stop(signal.SIGKILL)
    finally:
        hp.stop(signal.SIGKILL)
    hp = start_hub_process(env)
    try:
        await down_receiver.up()
        await until(
            lambda: any(e["state"] == "stopped" for e in down_receiver.of("tv")),
            30,
            "the stopped event after SIGKILL",
        )
        [event] = [e for e in down_receiver.of("tv") if e["state"] == "stopped"]
        assert (event["user_id"], event["item_id"], event["position"]) == (
            "alice",
            "movie-1",
            42.0,
        )
    finally:
        assert hp.stop() == 0
