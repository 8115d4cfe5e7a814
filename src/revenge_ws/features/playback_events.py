"""Playback events to the backend (contract §13, "Playback events to the backend").

When ``backend.playback_url`` is set, the devices feature hands every ``playback.update``
to :meth:`PlaybackEvents.record`, and a sender task POSTs them in batches::

    POST <backend.playback_url>
    Authorization: Bearer <the first of api.keys>
    {"events": [{"event_id", "user_id", "device_id", "at", ...the update...}, ...]}

Two kinds of events, two guarantees:

* **Durable** (``stopped``, a change of ``item_id``): written to the store's outbox (SQLite
  or PostgreSQL) before :meth:`~PlaybackEvents.record` returns, so before the client's
  ``playback.update`` is acked; deleted only after the backend answered 2xx. They survive
  a SIGKILL of the hub: the next start (of this node or, with PostgreSQL, of any node)
  sends them. At least once: the backend de-duplicates by ``event_id``.
* **Progress** (everything else): kept in memory, newest per ``(user_id, device_id)``
  only, at most ``backend.max_progress`` devices (the oldest is dropped past it, and
  counted). While the backend is slow or down, a device's progress is conflated to its
  newest value; a durable event of a device supersedes its pending progress.

Batches: the first event of a batch waits ``backend.batch_interval`` (1 s) for others,
unless ``backend.batch_size`` (500) are waiting; one POST at a time. Durable events go
first (oldest first, claimed from the outbox with a lease so that nodes sharing a
database do not send the same ones at once), progress fills the rest of a batch; inside a
batch, events are in the order of ``at``. A failed POST (not 2xx, timeout, no connection)
is retried after an exponential backoff from ``batch_interval`` up to
``backend.max_backoff``, with jitter; a retry rebuilds the batch from the outbox and the
newest progress, each event keeping its ``event_id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Final

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge

from ..config import BackendSettings, Settings
from ..core.node import Node
from ..exceptions import StoreError
from ..protocol import now_ms
from ..store.base import NotificationStore, OutboxEvent, new_id, redact_url

__all__ = ["PLAYBACK_EVENTS", "TOPIC", "PlaybackEvents", "install"]

log = logging.getLogger("revenge_ws.playback_events")

#: The outbox topic of playback events.
TOPIC: Final = "playback"
#: With nothing to do, the sender still looks at the outbox this often (s): events a dead
#: node held (their lease over) or another node's left-overs.
POLL_INTERVAL: Final = 10.0
#: Seconds a cancelled sender may spend handing its claimed events back.
RELEASE_TIMEOUT: Final = 1.0
#: Why a delivery attempt failed: not 2xx, no answer in time, no connection, the outbox
#: could not be read, a bug (logged with its traceback).
FAILURE_REASONS: Final = ("status", "timeout", "connection", "store", "error")
PLAYBACK_EVENTS: web.AppKey[PlaybackEvents] = web.AppKey("playback_events", object)  # type: ignore[arg-type]

Key = tuple[str, str]


class _Metrics:
    def __init__(self, registry: CollectorRegistry, events: PlaybackEvents) -> None:
        self.registry = r = registry
        self.pending = Gauge(
            "revenge_playback_events_pending",
            "Playback events not yet delivered to the backend: durable ones in the outbox "
            "(every node's), progress in this node's memory",
            ["kind"],
            registry=r,
        )
        self.pending.labels("durable").set_function(lambda: events.outbox_count)
        self.pending.labels("progress").set_function(lambda: len(events.progress))
        self.oldest = Gauge(
            "revenge_playback_events_oldest_seconds",
            "Age of the oldest undelivered playback event (0 when none)",
            registry=r,
        )
        self.oldest.set_function(events.oldest_age)
        self.delivered = Counter(
            "revenge_playback_events_delivered",
            "Playback events the backend confirmed (2xx)",
            registry=r,
        )
        self.failures = Counter(
            "revenge_playback_delivery_failures",
            "Failed attempts to deliver a batch of playback events, by reason",
            ["reason"],
            registry=r,
        )
        for reason in FAILURE_REASONS:
            self.failures.labels(reason)  # exported as 0 from the start
        self.dropped = Counter(
            "revenge_playback_events_dropped",
            "Progress events dropped undelivered: backend.max_progress devices waited",
            registry=r,
        )


class PlaybackEvents:
    """Records playback updates and delivers them to the backend (see the module doc).

    Call :meth:`start` once the store is started (it spawns the sender on the node),
    :meth:`stop` on shutdown (a bounded last flush). ``api_key`` goes into the
    ``Authorization`` header and nowhere else (never logged).
    """

    def __init__(
        self,
        settings: BackendSettings,
        store: NotificationStore,
        *,
        api_key: str | None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if not settings.playback_url:
            raise ValueError("backend.playback_url is not set")
        self.url = settings.playback_url
        self._settings = settings
        self._store = store
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        #: Held by one claim for this long (ms): longer than a POST can take, so no other
        #: node sends them meanwhile; a node that dies holding them delays them this long.
        self.lease_ms = int((2 * settings.request_timeout + 5.0) * 1000)
        #: The newest undelivered progress per (user, device), least recently updated first.
        self.progress: OrderedDict[Key, dict[str, Any]] = OrderedDict()
        #: The outbox as last counted (plus what this node added since).
        self.outbox_count = 0
        self._outbox_oldest: int | None = None
        #: Events recorded since the last batch was built, and when the first came.
        self._fresh = 0
        self._since: float | None = None
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._failures = 0
        self.metrics = _Metrics(registry or CollectorRegistry(), self)

    # -- recording ------------------------------------------------------------------------

    async def record(
        self, user_id: str, device_id: str, update: Mapping[str, Any], *, durable: bool
    ) -> None:
        """Queue one ``playback.update`` of a device for the backend.

        ``durable`` (a ``stopped``, or a change of ``item_id``): the event is committed to
        the outbox when this returns; raises :class:`~revenge_ws.exceptions.StoreError`
        (``StoreUnavailable``: retryable) when it could not be, and then nothing was
        queued. Otherwise the event replaces the device's pending progress, in memory.
        """
        at = int(now_ms())
        event: dict[str, Any] = {
            **update,
            "event_id": new_id(at),
            "user_id": user_id,
            "device_id": device_id,
            "at": at,
        }
        key = (user_id, device_id)
        if durable:
            payload = orjson.dumps(event).decode()
            await self._store.outbox_add([OutboxEvent(event["event_id"], TOPIC, at, payload)])
            # Older progress of the device says less than this event and would arrive
            # after it when the outbox is backed up: it is superseded.
            self.progress.pop(key, None)
            self.outbox_count += 1
            if self._outbox_oldest is None:
                self._outbox_oldest = at
        else:
            self.progress[key] = event
            self.progress.move_to_end(key)
            while len(self.progress) > self._settings.max_progress:
                self.progress.popitem(last=False)
                self.metrics.dropped.inc()
        if self._since is None:
            self._since = time.monotonic()
        self._fresh += 1
        if self._fresh >= self._settings.batch_size:
            self._full.set()
        self._wake.set()

    def oldest_age(self) -> float:
        """Seconds since the oldest undelivered event (0 when there is none)."""
        oldest = [self._outbox_oldest] if self._outbox_oldest is not None else []
        first = next(iter(self.progress.values()), None)
        if first is not None:
            oldest.append(int(first["at"]))
        return max(0.0, (now_ms() - min(oldest)) / 1000.0) if oldest else 0.0

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self, node: Node) -> None:
        """Open the HTTP session and spawn the sender on ``node``; it first sends what the
        outbox holds (events of an earlier run)."""
        if self._task is not None:
            return
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._settings.request_timeout),
            # One POST at a time; a second connection only when the first is being closed.
            connector=aiohttp.TCPConnector(limit=2),
        )
        await self._refresh_stats()
        self._wake.set()
        self._task = node.spawn(self._run(), name="playback-events")
        log.info("playback events go to %s", redact_url(self.url))

    async def stop(self) -> None:
        """Deliver what is left within ``backend.flush_timeout``, then stop sending.

        Durable events that miss it stay in the outbox (their claim handed back, so the
        next start sends them at once); progress that misses it is lost. Idempotent.
        """
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake.set()
        self._full.set()
        task = self._task
        if task is not None and not task.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, self._settings.flush_timeout)
        if self._session is not None:
            await self._session.close()
        if self.progress or self.outbox_count:
            log.info(
                "playback events at shutdown: %d progress updates undelivered (lost), "
                "%d durable events in the outbox (sent after the next start)",
                len(self.progress),
                self.outbox_count,
            )

    # -- the sender -------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()
            if not stopping:
                await self._idle()
                await self._gather()
            try:
                ok, more = await self._attempt()
            except Exception:
                log.exception("playback events: sending a batch failed")
                self.metrics.failures.labels("error").inc()
                ok, more = False, False
            if stopping or self._stop.is_set():
                if not ok or not more:
                    return
                continue
            if ok:
                if more:
                    self._wake.set()
                continue
            self._failures += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.backoff(self._failures)):
                    await self._stop.wait()
            self._wake.set()

    def backoff(self, failures: int) -> float:
        """Seconds before retry number ``failures``: ``batch_interval`` doubled per failure,
        at most ``max_backoff``, times a random factor in [0.5, 1) (so that nodes and
        restarts do not retry in step)."""
        base = self._settings.batch_interval * float(2 ** min(failures - 1, 30))
        return min(self._settings.max_backoff, base) * (0.5 + random.random() / 2)

    async def _idle(self) -> None:
        """Until an event is recorded, or the poll interval passed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(POLL_INTERVAL):
                await self._wake.wait()
        self._wake.clear()

    async def _gather(self) -> None:
        """Until the first waiting event has waited ``batch_interval``, or a batch is full."""
        if self._since is None or self._full.is_set():
            return
        delay = self._since + self._settings.batch_interval - time.monotonic()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._full.wait()

    async def _attempt(self) -> tuple[bool, bool]:
        """Build and send one batch: ``(delivered or nothing to send, maybe more waiting)``."""
        size = self._settings.batch_size
        try:
            rows = await self._store.outbox_claim(TOPIC, size, self.lease_ms)
        except StoreError as exc:
            self._failed("store", f"reading the outbox: {exc}")
            return False, False
        # What is recorded from now on waits for the next batch.
        self._fresh = 0
        self._since = None
        self._full.clear()
        progress = list(itertools.islice(self.progress.values(), size - len(rows)))
        if not rows and not progress:
            await self._refresh_stats()
            return True, False
        ids = [r.event_id for r in rows]
        events: list[tuple[int, str, Any]] = [
            (r.created_at, r.event_id, orjson.Fragment(r.payload)) for r in rows
        ]
        events += [(int(e["at"]), str(e["event_id"]), e) for e in progress]
        events.sort(key=lambda e: (e[0], e[1]))
        body = orjson.dumps({"events": [e[2] for e in events]})
        try:
            ok = await self._post(body)
        except asyncio.CancelledError:
            # Stopped mid-POST: hand the claim back so that the next start (or another
            # node) need not wait for the lease to end.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._store.outbox_release(ids), RELEASE_TIMEOUT)
            raise
        if ok:
            if self._failures:
                log.info(
                    "playback events: delivered again after %d failed attempts", self._failures
                )
            self._failures = 0
            self.metrics.delivered.inc(len(events))
            for e in progress:
                key = (e["user_id"], e["device_id"])
                if self.progress.get(key) is e:  # not replaced by newer progress meanwhile
                    del self.progress[key]
            try:
                await self._store.outbox_delete(ids)
            except StoreError as exc:
                # They stay claimed until the lease ends, then go again: a duplicate the
                # backend drops by event_id.
                log.warning("playback events: cannot delete delivered events: %s", exc)
        else:
            try:
                await self._store.outbox_release(ids)
            except StoreError as exc:
                log.debug("playback events: cannot release claimed events: %s", exc)
        await self._refresh_stats()
        return ok, len(events) >= size

    async def _post(self, body: bytes) -> bool:
        session = self._session
        if session is None:
            raise RuntimeError("PlaybackEvents.start was not called")
        try:
            async with session.post(
                self.url, data=body, headers=self._headers, allow_redirects=False
            ) as response:
                status = response.status
        except TimeoutError:
            self._failed("timeout", f"no answer within {self._settings.request_timeout:g}s")
            return False
        except (aiohttp.ClientError, OSError) as exc:
            self._failed("connection", f"{type(exc).__name__}: {exc}")
            return False
        if 200 <= status < 300:
            return True
        self._failed("status", f"HTTP {status}")
        return False

    def _failed(self, reason: str, detail: str) -> None:
        self.metrics.failures.labels(reason).inc()
        n = self._failures + 1
        # The 1st, 10th, 100th... failure in a row: an outage is visible without a line
        # per retry.
        level = logging.WARNING if str(n).rstrip("0") == "1" else logging.DEBUG
        log.log(
            level,
            "playback events: delivery to %s failed (%s; attempt %d in a row); retrying",
            redact_url(self.url),
            detail,
            n,
        )

    async def _refresh_stats(self) -> None:
        try:
            self.outbox_count, self._outbox_oldest = await self._store.outbox_stats(TOPIC)
        except StoreError as exc:
            log.debug("playback events: cannot count the outbox: %s", exc)


def install(
    node: Node,
    app: web.Application,
    store: NotificationStore,
    *,
    registry: CollectorRegistry | None = None,
) -> PlaybackEvents | None:
    """The playback-event sender for ``node.settings``, or None when
    ``backend.playback_url`` is unset (then the devices feature reports nothing).

    Its metrics go to ``registry`` (the application's, exported at ``/metrics``). The
    caller starts it once the store is started (:meth:`PlaybackEvents.start`); its stop
    runs with the node's stop hooks.
    """
    settings: Settings = node.settings
    if not settings.backend.playback_url:
        return None
    keys = settings.api.keys
    if not keys:
        log.warning(
            "backend.playback_url is set but api.keys is empty: playback events are sent "
            "without an Authorization header"
        )
    api_key = keys[0].get_secret_value() if keys else None
    feature = PlaybackEvents(settings.backend, store, api_key=api_key, registry=registry)
    node.on_stop.append(feature.stop)
    app[PLAYBACK_EVENTS] = feature
    return feature
