"""Devices, now playing and remote control (contract v1.1 §13).

A connection becomes a device with ``device.hello``; the node that holds the connection
is the device's only writer. Its record (the device object plus the connection's session
and node ids) is claimed in the cluster-wide :class:`~revenge_ws.devices.DeviceRegistry`
at once (so a takeover is decided atomically, and other nodes can reach it); later
changes (``playback.update``) are kept in this node's memory and written to the registry
by the flush tick, together with their ``device.updated``.

Costs, by design: a ``playback.update`` is validated, stored in a dict and marked dirty.
The tick (every ``update_interval / 4``) publishes ``device.updated`` for each dirty device
whose last one is ``update_interval`` old (newest state wins), writes those records to the
registry in one batch, and publishes one ``sessions.updated`` per node and interval. No
step touches another user's connections: the work grows with the updates, not with the
connections.

Remote commands: the node where a command is asked (a connection's request or the backend's
HTTP call) checks the caller's right and the device's capabilities, then hands the command
to the node holding the device (itself, or through a control message). That node counts the
commands in flight to the device, sends ``remote.command`` and waits for the device's
``remote.result`` until the command's deadline; its one reply goes back to the asking node,
which answers the caller. A device that leaves answers its commands in flight
``UNAVAILABLE``; the asking node alone decides ``TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import BaseModel, ConfigDict, Field

from ..codes import ErrorCode
from ..core import control
from ..core.connection import Connection
from ..core.node import Node, Request
from ..devices import DeviceRegistry, MemoryDeviceRegistry, Record, public
from ..devices.validation import (
    MAX_TIMEOUT_MS,
    Hello,
    ListReq,
    PlaybackUpdate,
    RemoteCommandReq,
    RemoteResultReq,
    validate,
    validate_command,
)
from ..exceptions import BrokerUnavailable, RequestError, StoreUnavailable
from ..protocol import encode_message, now_ms
from .web import backend_auth, json_body, json_response, op, path_param, query_param

__all__ = ["CommandBody", "Devices", "PlaybackSink", "install", "open_registry"]

log = logging.getLogger("revenge_ws.devices")
#: Remote commands this node waits for at once (all callers together); more are refused.
MAX_WAITING = 10_000
#: How long a device's location read from the registry is reused by commands (s), and
#: how many locations are remembered.
LOCATE_TTL = 5.0
MAX_LOCATED = 10_000
#: Records written to the registry, or expired records collected, per batch.
BATCH = 500
#: In-process publications of one flush between two turns of the event loop.
YIELD_EVERY = 64
#: Longest flush tick (s): a device.updated waits at most about this after its interval.
MAX_TICK = 0.25


class PlaybackSink(Protocol):
    """Where playback events go (the backend's ``backend.playback_url``)."""

    async def record(
        self, user_id: str, device_id: str, update: dict[str, Any], *, durable: bool
    ) -> None:
        """Queue an event; with ``durable``, return only once it is stored durably."""
        ...


class CommandBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: str = Field(min_length=1, max_length=128)
    command: str = Field(min_length=1, max_length=64)
    args: dict[str, Any] = Field(default_factory=dict)
    timeout_ms: int = Field(10_000, ge=1, le=MAX_TIMEOUT_MS)


@dataclass(slots=True, eq=False)
class Waiting:
    """A command asked on this node, until its reply, its timeout or its refusal."""

    result: asyncio.Future[dict[str, Any]]
    timer: asyncio.TimerHandle
    msg: control.RemoteCommand
    key: tuple[str, str]
    #: Routed by a remembered location: a NOT_FOUND re-routes it once.
    reroute: bool


@dataclass(slots=True)
class Inflight:
    """A command delivered to a device of this node, awaiting its ``remote.result``."""

    origin: str
    timer: asyncio.TimerHandle


@dataclass(slots=True, eq=False)
class LocalDevice:
    """A device held by a connection of this node."""

    conn: Connection
    #: The registry record; this node is its only writer.
    record: Record
    last_published: float = -math.inf
    inflight: dict[str, Inflight] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return self.record["user_id"], self.record["device_id"]


class _Metrics:
    """The feature's metrics, exported at ``/metrics`` with the node's."""

    def __init__(self, registry: CollectorRegistry, devices: Devices) -> None:
        Gauge(
            "revenge_devices",
            "Devices held by connections of this node",
            registry=registry,
        ).set_function(lambda: len(devices.by_session))
        self.updates = Counter(
            "revenge_playback_updates",
            "playback.update requests accepted",
            registry=registry,
        )
        self.commands = Counter(
            "revenge_remote_commands",
            "Remote commands asked on this node, by outcome (ok or the error code)",
            ["outcome"],
            registry=registry,
        )


def open_registry(node: Node) -> DeviceRegistry:
    """Devices live in the broker: this process for ``memory://``, Redis otherwise."""
    if node.broker_in_process:
        return MemoryDeviceRegistry()
    from ..devices.redis_registry import RedisDeviceRegistry

    return RedisDeviceRegistry.for_broker(node.broker)


class Devices:
    def __init__(
        self,
        node: Node,
        registry: DeviceRegistry,
        sink: PlaybackSink | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        metrics: CollectorRegistry | None = None,
    ) -> None:
        self.node = node
        self.registry = registry
        self.sink = sink
        self.clock = clock
        cfg = node.settings.devices
        self.interval = cfg.update_interval
        self.max_inflight = cfg.max_inflight_commands
        self.max_listed = cfg.max_listed
        self.by_session: dict[str, LocalDevice] = {}
        self.by_key: dict[tuple[str, str], LocalDevice] = {}
        self._dirty: set[str] = set()
        #: What the next ``sessions.updated`` reports.
        self._changed: dict[tuple[str, str], dict[str, Any]] = {}
        self._removed: dict[tuple[str, str], None] = {}
        self._sessions_at = -math.inf
        #: Commands asked on this node, by command id.
        self._waiting: dict[str, Waiting] = {}
        #: Devices of other nodes located recently: (when, record).
        self._located: dict[tuple[str, str], tuple[float, Record]] = {}
        self.metrics = _Metrics(metrics or CollectorRegistry(), self)

    # -- device.hello ------------------------------------------------------------------
    async def hello(self, req: Request) -> dict[str, Any]:
        h = validate(Hello, req.data)
        conn, node = req.conn, self.node
        sid, user = conn.session_id, conn.user_id
        now = int(now_ms())
        mine = self.by_session.get(sid)
        if mine is not None and mine.record["device_id"] != h.device_id:
            await self._end(mine, "renamed")
            mine = None
        record: Record = {
            "device_id": h.device_id,
            "user_id": user,
            "name": h.name,
            "client": h.client,
            "version": h.version,
            "capabilities": h.capabilities.model_dump(),
            "connected_at": mine.record["connected_at"] if mine else now,
            "updated_at": now,
            "now_playing": mine.record["now_playing"] if mine else None,
            "session_id": sid,
            "node_id": node.node_id,
        }
        other = self.by_key.get((user, h.device_id))
        if other is not None and other.conn is not conn:
            self._taken_over(other)
        local = mine or LocalDevice(conn, record)
        local.record = record
        self.by_session[sid] = local
        self.by_key[local.key] = local
        replaced = await node.call(self.registry.claim(record))
        if conn.closed and sid not in self.by_session:
            # Closed while the claim was on its way: the disconnect hook ran first.
            with contextlib.suppress(BrokerUnavailable):
                await node.call(self.registry.remove(user, h.device_id, sid))
            raise RequestError(ErrorCode.UNAVAILABLE, "the connection closed")
        if replaced is not None and replaced["node_id"] != node.node_id:
            # Held on another node: that node tells its connection (a claim of this
            # node's own connection was handled above).
            await node.send_control(control.DeviceTakeover(replaced["session_id"], h.device_id))
        self._mark(local)
        return {"device": public(record)}

    def _detach(self, local: LocalDevice, why: str) -> None:
        """The connection is no longer the device: forget it here, and answer the
        commands in flight to it ``UNAVAILABLE`` (``why``)."""
        sid = local.conn.session_id
        if self.by_session.get(sid) is local:
            del self.by_session[sid]
        if self.by_key.get(local.key) is local:
            del self.by_key[local.key]
        self._dirty.discard(sid)
        self._fail_inflight(local, why)

    def _taken_over(self, local: LocalDevice) -> None:
        """Another connection holds the device now: this one is no longer it."""
        self._detach(local, "the device was taken over by another connection")
        local.conn.send(
            encode_message(
                "device.ended", {"device_id": local.record["device_id"], "reason": "replaced"}
            )
        )

    # -- playback.update ---------------------------------------------------------------
    async def playback_update(self, req: Request) -> dict[str, Any]:
        local = self.by_session.get(req.conn.session_id)
        if local is None:
            raise RequestError(ErrorCode.CONFLICT, "say device.hello before playback.update")
        update = validate(PlaybackUpdate, req.data).model_dump(exclude_none=True)
        record = local.record
        previous = record["now_playing"]
        stopped = update["state"] == "stopped"
        if self.sink is not None:
            durable = stopped or previous is None or previous["item_id"] != update["item_id"]
            await self.sink.record(record["user_id"], record["device_id"], update, durable=durable)
        at = int(now_ms())
        if stopped:
            record["now_playing"] = None
        else:
            update["updated_at"] = at
            record["now_playing"] = update
        record["updated_at"] = at
        self._mark(local)
        self.metrics.updates.inc()
        return {}

    def _mark(self, local: LocalDevice) -> None:
        self._dirty.add(local.conn.session_id)

    # -- devices.list ------------------------------------------------------------------
    async def list_request(self, req: Request) -> dict[str, Any]:
        r = validate(ListReq, req.data)
        claims = req.claims
        if (r.all or (r.user_id not in (None, claims.sub))) and not claims.is_admin:
            raise RequestError(ErrorCode.FORBIDDEN, "only admins list other users' devices")
        return {"devices": await self.listing(None if r.all else (r.user_id or claims.sub))}

    async def listing(self, user_id: str | None) -> list[dict[str, Any]]:
        """A user's devices, or everyone's (``None``), cluster-wide."""
        reg = self.registry
        if user_id is None:
            records = await self.node.call(reg.list_all(self.max_listed))
        else:
            records = await self.node.call(reg.list(user_id))
        # This node's own devices as they are now (the registry has them as of the
        # last flush tick).
        out = []
        for rec in records:
            local = self.by_key.get((rec["user_id"], rec["device_id"]))
            if local is not None and local.record["session_id"] == rec["session_id"]:
                rec = local.record
            out.append(public(rec))
        return out

    async def http_list(self, request: web.Request) -> web.Response:
        backend_auth(request)
        user = request.query.get("user_id") or None
        return json_response({"devices": await self.listing(user)})

    # -- remote control: the asking side -------------------------------------------------
    async def remote_command(self, req: Request) -> dict[str, Any]:
        if req.envelope.id is None:
            raise RequestError(ErrorCode.INVALID_MESSAGE, "remote.command needs an id")
        r = validate(RemoteCommandReq, req.data)
        claims = req.claims
        target = r.user_id or claims.sub
        if target != claims.sub and not claims.is_admin:
            raise RequestError(ErrorCode.FORBIDDEN, "another user's device")
        mine = self.by_session.get(req.conn.session_id)
        result = await self.command(
            target,
            r.device_id,
            r.command,
            r.args,
            r.timeout_ms,
            from_user=claims.sub,
            from_device=mine.record["device_id"] if mine else None,
            guess_owner=r.user_id is None and not claims.is_admin,
        )
        # Checked and sent now; the wait for the device goes on without the connection.
        req.defer(result)
        return {}

    async def http_command(self, request: web.Request) -> web.Response:
        backend_auth(request)
        body = await json_body(request, CommandBody)
        result = await self.command(
            body.user_id,
            request.match_info["device_id"],
            body.command,
            body.args,
            body.timeout_ms,
            from_user=None,
            from_device=None,
        )
        return json_response(await result)

    async def command(
        self,
        user_id: str,
        device_id: str,
        command: str,
        args: dict[str, Any],
        timeout_ms: int,
        *,
        from_user: str | None,
        from_device: str | None,
        guess_owner: bool = False,
    ) -> asyncio.Future[dict[str, Any]]:
        """Check a command and send it to the device; raises the refusals
        (``INVALID_MESSAGE``, ``NOT_FOUND``, ``FORBIDDEN``, ``REJECTED``...). The future
        it returns becomes the reply ``{command_id, result}``, or the error (``REJECTED``,
        ``TIMEOUT``, ``UNAVAILABLE``...), within ``timeout_ms``: a timer settles it, no
        task waits for it.

        ``guess_owner``: a user named no ``user_id``; a device of that name held by
        another user is ``FORBIDDEN`` rather than ``NOT_FOUND``.
        """
        key = (user_id, device_id)
        try:
            args = validate_command(command, args)
            record, cached = await self._target(key, command, guess_owner)
        except RequestError as exc:
            self.metrics.commands.labels(exc.code.value).inc()
            raise
        node = self.node
        cid = uuid.uuid4().hex
        msg = control.RemoteCommand(
            record["node_id"],
            record["session_id"],
            device_id,
            cid,
            node.node_id,
            command,
            args,
            from_user,
            from_device,
            timeout_ms,
        )
        loop = asyncio.get_running_loop()
        result: asyncio.Future[dict[str, Any]] = loop.create_future()
        timer = loop.call_later(
            timeout_ms / 1000,
            self._settle,
            cid,
            RequestError(
                ErrorCode.TIMEOUT, f"device {device_id!r} did not answer within {timeout_ms} ms"
            ),
        )
        self._waiting[cid] = Waiting(result, timer, msg, key, reroute=cached)
        result.add_done_callback(lambda f: self._done(cid, f))
        try:
            await self._route(msg)
        except BaseException:
            result.cancel()
            raise
        return result

    async def _target(
        self, key: tuple[str, str], command: str, guess_owner: bool
    ) -> tuple[Record, bool]:
        """The record of the device a command may be sent to, and whether it came from
        the cache; raises NOT_FOUND, FORBIDDEN, REJECTED or RATE_LIMITED."""
        user_id, device_id = key
        record, cached = await self._locate(key)
        if record is None:
            if guess_owner and await self.node.call(self.registry.owner(device_id)) not in (
                None,
                user_id,
            ):
                raise RequestError(ErrorCode.FORBIDDEN, "another user's device")
            raise RequestError(ErrorCode.NOT_FOUND, f"no device {device_id!r} online")
        caps = record.get("capabilities") or {}
        if not caps.get("remote_control") or command not in caps.get("commands", ()):
            raise RequestError(
                ErrorCode.REJECTED, f"device {device_id!r} does not support {command!r}"
            )
        if len(self._waiting) >= MAX_WAITING:
            raise RequestError(ErrorCode.RATE_LIMITED, "too many remote commands in flight")
        return record, cached

    async def _locate(
        self, key: tuple[str, str], *, fresh: bool = False
    ) -> tuple[Record | None, bool]:
        """The device's record, and whether it came from the cache: this node's own,
        else the registry's, remembered ``LOCATE_TTL`` seconds (a command routed by a
        remembered record whose connection is gone is re-routed once, afresh)."""
        local = self.by_key.get(key)
        if local is not None:
            return local.record, False
        cached = self._located.get(key)
        if not fresh and cached is not None and self.clock() - cached[0] < LOCATE_TTL:
            return cached[1], True
        record = await self.node.call(self.registry.get(*key))
        self._located.pop(key, None)
        if record is not None:
            if len(self._located) >= MAX_LOCATED:
                self._located.pop(next(iter(self._located)))
            self._located[key] = (self.clock(), record)
        return record, False

    async def _route(self, msg: control.RemoteCommand) -> None:
        if msg.node_id == self.node.node_id:
            self.deliver(msg)
        else:
            await self.node.send_control(msg)

    async def _reroute(self, cid: str, waiting: Waiting) -> None:
        """The remembered connection of the device was gone: find it afresh, once."""
        old = waiting.msg
        try:
            record, _ = await self._locate(waiting.key, fresh=True)
            if record is None or (record["session_id"], record["node_id"]) == (
                old.session_id,
                old.node_id,
            ):
                self._settle(cid, RequestError(ErrorCode.NOT_FOUND, "the device is offline"))
                return
            waiting.msg = dataclasses.replace(
                old, node_id=record["node_id"], session_id=record["session_id"]
            )
            await self._route(waiting.msg)
        except BrokerUnavailable as exc:
            self._settle(cid, RequestError(ErrorCode.UNAVAILABLE, str(exc)))

    def _settle(self, cid: str, outcome: dict[str, Any] | RequestError) -> None:
        waiting = self._waiting.get(cid)
        if waiting is None or waiting.result.done():
            return
        if isinstance(outcome, RequestError):
            waiting.result.set_exception(outcome)
        else:
            waiting.result.set_result(outcome)

    def _done(self, cid: str, fut: asyncio.Future[dict[str, Any]]) -> None:
        waiting = self._waiting.pop(cid, None)
        if waiting is not None:
            waiting.timer.cancel()
        if fut.cancelled():
            outcome = "cancelled"
        else:
            exc = fut.exception()
            outcome = exc.code.value if isinstance(exc, RequestError) else "ok"
        self.metrics.commands.labels(outcome).inc()

    def on_reply(self, msg: control.RemoteReply) -> None:
        if msg.node_id != self.node.node_id:
            return
        waiting = self._waiting.get(msg.command_id)
        if waiting is None:
            return
        if msg.code == ErrorCode.NOT_FOUND and waiting.reroute:
            waiting.reroute = False
            self.node.spawn(self._reroute(msg.command_id, waiting), name="remote-reroute")
            return
        if msg.code:
            try:
                code = ErrorCode(msg.code)
            except ValueError:
                code = ErrorCode.INTERNAL
            self._settle(msg.command_id, RequestError(code, msg.message or code.value))
            return
        result: dict[str, Any] = {"ok": True}
        if msg.state is not None:
            result["state"] = msg.state
        self._settle(msg.command_id, {"command_id": msg.command_id, "result": result})

    # -- remote control: the device's side -----------------------------------------------
    def deliver(self, msg: control.RemoteCommand) -> None:
        """A command for a device of this node: send it on, or answer why not."""
        if msg.node_id != self.node.node_id:
            return
        local = self.by_session.get(msg.session_id)
        if local is None or local.record["device_id"] != msg.device_id:
            self._reply(msg.origin, msg.command_id, ErrorCode.NOT_FOUND, "the device is offline")
            return
        if len(local.inflight) >= self.max_inflight:
            self._reply(
                msg.origin,
                msg.command_id,
                ErrorCode.RATE_LIMITED,
                f"{self.max_inflight} commands already in flight to this device",
            )
            return
        loop = asyncio.get_running_loop()
        timer = loop.call_later(msg.timeout_ms / 1000, self._expire, local, msg.command_id)
        local.inflight[msg.command_id] = Inflight(msg.origin, timer)
        local.conn.send(
            encode_message(
                "remote.command",
                {
                    "command_id": msg.command_id,
                    "command": msg.command,
                    "args": msg.args,
                    "from": {"user_id": msg.from_user, "device_id": msg.from_device},
                },
            )
        )

    def _expire(self, local: LocalDevice, command_id: str) -> None:
        # The asking node answers TIMEOUT by itself; a result after this is NOT_FOUND.
        local.inflight.pop(command_id, None)

    async def remote_result(self, req: Request) -> dict[str, Any]:
        r = validate(RemoteResultReq, req.data)
        local = self.by_session.get(req.conn.session_id)
        pending = local.inflight.pop(r.command_id, None) if local else None
        if pending is None:
            raise RequestError(ErrorCode.NOT_FOUND, "no such command in flight (late?)")
        pending.timer.cancel()
        if r.ok:
            self._reply(pending.origin, r.command_id, state=r.state)
        else:
            self._reply(
                pending.origin, r.command_id, ErrorCode.REJECTED, r.error or "refused by the device"
            )
        return {}

    def _reply(
        self,
        origin: str,
        command_id: str,
        code: ErrorCode | None = None,
        message: str = "",
        *,
        state: dict[str, Any] | None = None,
    ) -> None:
        msg = control.RemoteReply(origin, command_id, code.value if code else "", message, state)
        if origin == self.node.node_id:
            self.on_reply(msg)
        else:
            self.node.spawn(self._send_reply(msg), name="remote-reply")

    async def _send_reply(self, msg: control.RemoteReply) -> None:
        try:
            await self.node.send_control(msg)
        except BrokerUnavailable as exc:
            # The asking node answers TIMEOUT in the end.
            log.warning("remote.result not relayed: %s", exc)

    def _fail_inflight(self, local: LocalDevice, why: str) -> None:
        for cid, pending in local.inflight.items():
            pending.timer.cancel()
            self._reply(pending.origin, cid, ErrorCode.UNAVAILABLE, why)
        local.inflight.clear()

    # -- control messages ----------------------------------------------------------------
    def on_control(self, msg: control.ControlMessage) -> None:
        match msg:
            case control.RemoteCommand():
                self.deliver(msg)
            case control.RemoteReply():
                self.on_reply(msg)
            case control.DeviceTakeover(session_id=sid, device_id=dev):
                local = self.by_session.get(sid)
                if local is not None and local.record["device_id"] == dev:
                    self._taken_over(local)
            case _:
                pass

    # -- the end of a device ---------------------------------------------------------------
    async def disconnected(self, conn: Connection) -> None:
        local = self.by_session.get(conn.session_id)
        if local is not None:
            await self._end(local, "the device disconnected")

    async def _end(self, local: LocalDevice, why: str) -> None:
        self._detach(local, why)
        if self.node.closing:
            # A restart is not a departure: the device comes back within the advised
            # window and claims its record again; one that does not expires (Redis) and
            # is reported then. Nobody would read a removal from an in-process registry.
            return
        user, dev = local.key
        if await self.node.call(self.registry.remove(user, dev, local.conn.session_id)):
            await self._removed_device(user, dev)

    async def _removed_device(self, user: str, dev: str) -> None:
        self._changed.pop((user, dev), None)
        self._removed[(user, dev)] = None
        await self.node.publish(f"user:{user}", "device.removed", {"device_id": dev})

    # -- the flush tick ----------------------------------------------------------------------
    async def tick_forever(self) -> None:
        tick = min(MAX_TICK, self.interval / 4)
        while True:
            await asyncio.sleep(tick)
            try:
                await self.flush()
            except (BrokerUnavailable, StoreUnavailable) as exc:
                log.warning("devices: flush failed, retried next tick: %s", exc)

    async def flush(self, *, force: bool = False) -> None:
        """Publish what is due: ``device.updated`` of dirty devices whose last one is
        ``update_interval`` old (all of them with ``force``), then ``sessions.updated``."""
        now = self.clock()
        due: list[LocalDevice] = []
        for sid in list(self._dirty):
            local = self.by_session.get(sid)
            if local is None:
                self._dirty.discard(sid)
            elif force or now - local.last_published >= self.interval:
                self._dirty.discard(sid)
                local.last_published = now
                due.append(local)
        for i in range(0, len(due), BATCH):
            await self._publish_updates(due[i : i + BATCH])
        if (self._changed or self._removed) and (force or now - self._sessions_at >= self.interval):
            self._sessions_at = now
            changed, removed = self._changed, self._removed
            self._changed, self._removed = {}, {}
            await self.node.publish(
                "sessions",
                "sessions.updated",
                {
                    "devices": list(changed.values()),
                    "removed": [{"user_id": u, "device_id": d} for u, d in removed],
                },
            )

    async def _publish_updates(self, due: list[LocalDevice]) -> None:
        node = self.node
        if not node.broker_in_process:
            await self._refresh(due)
        pubs = []
        failed: list[BaseException] = []
        for n, local in enumerate(due, 1):
            if self.by_session.get(local.conn.session_id) is not local:
                continue
            device = public(local.record)
            self._changed[local.key] = device
            pub = node.publish(f"user:{device['user_id']}", "device.updated", {"device": device})
            if not node.broker_in_process:
                pubs.append(pub)
                continue
            # In process: no I/O to overlap, so no task per publication; a pause every
            # YIELD_EVERY lets the requests that arrived meanwhile be served between.
            try:
                await pub
            except BrokerUnavailable as exc:
                failed.append(exc)
            if n % YIELD_EVERY == 0:
                await asyncio.sleep(0)
        if pubs:
            results = await asyncio.gather(*pubs, return_exceptions=True)
            failed.extend(r for r in results if isinstance(r, BaseException))
        if failed:
            log.warning("devices: %d device.updated not published: %s", len(failed), failed[0])

    # -- keeping records alive (Redis) ---------------------------------------------------------
    async def keep_alive_forever(self, every: float) -> None:
        """Re-write this node's records before they expire, and report the devices of
        nodes that stopped writing theirs (each expired record is handed to one node)."""
        while True:
            await asyncio.sleep(every)
            try:
                await self.keep_alive()
            except BrokerUnavailable as exc:
                log.warning("devices: keep-alive failed, retried: %s", exc)

    async def _refresh(self, devices: list[LocalDevice]) -> None:
        """Write these devices' records to the registry; a record another session holds
        now means a takeover message was missed: act as if told."""
        lost = await self.node.call(self.registry.refresh([d.record for d in devices]))
        for record in lost:
            local = self.by_session.get(record["session_id"])
            if local is not None:
                self._taken_over(local)

    async def keep_alive(self) -> None:
        node = self.node
        locals_ = list(self.by_session.values())
        for i in range(0, len(locals_), BATCH):
            await self._refresh(locals_[i : i + BATCH])
        for _ in range(100):  # bounded: 100 batches per round at most
            gone = await node.call(self.registry.expired(BATCH))
            for record in gone:
                await self._removed_device(record["user_id"], record["device_id"])
            if len(gone) < BATCH:
                break


def install(
    node: Node,
    app: web.Application,
    sink: PlaybackSink | None = None,
    *,
    registry: CollectorRegistry | None = None,
) -> Devices:
    """Register the feature; its metrics go to ``registry`` (the application's)."""
    feature = Devices(node, open_registry(node), sink, metrics=registry)
    node.register("device.hello", feature.hello)
    node.register("playback.update", feature.playback_update)
    node.register("devices.list", feature.list_request)
    node.register("remote.command", feature.remote_command)
    node.register("remote.result", feature.remote_result)
    node.on_disconnect.append(feature.disconnected)
    node.control_hooks.append(feature.on_control)
    app.router.add_get("/api/v1/realtime/devices", feature.http_list)
    app.router.add_post("/api/v1/realtime/devices/{device_id}/command", feature.http_command)

    async def stop() -> None:
        await feature.flush(force=True)

    node.on_stop.append(stop)
    return feature


def start(node: Node, feature: Devices) -> None:
    """The feature's background work, once the node runs."""
    node.spawn(feature.tick_forever(), name="devices-flush")
    every = getattr(node.broker, "presence_refresh", None)
    if not node.broker_in_process and isinstance(every, int | float):
        node.spawn(feature.keep_alive_forever(float(every)), name="devices-keep-alive")


def openapi_paths() -> dict[str, Any]:
    """This feature's HTTP routes, for ``/api/v1/openapi.json``."""
    return {
        "/api/v1/realtime/devices": {
            "get": op(
                "Devices online (a user's, or everyone's), with what they play",
                security="backend",
                params=[query_param("user_id")],
                errors=(401, 403, 503),
            )
        },
        "/api/v1/realtime/devices/{device_id}/command": {
            "post": op(
                "Send a remote command to a device and wait for its result",
                security="backend",
                body="CommandBody",
                params=[path_param("device_id")],
                errors=(400, 401, 403, 404, 422, 429, 503, 504),
            )
        },
    }


#: The request bodies :func:`openapi_paths` names.
OPENAPI_MODELS: dict[str, type[BaseModel]] = {"CommandBody": CommandBody}
