"""The client as a device (contract §13): ``device.hello`` on every connection, the
``playback.update`` reporter, and the answers to ``remote.command``.

:class:`DeviceLoop` fills in the connection loop's two hooks: before the re-subscription
of a new connection it says hello (when a :class:`DeviceInfo` is set) and starts the
reporter, which re-sends the current playback and repeats it while playing; on the
reader it takes ``remote.command`` (answered by the handler of
:meth:`Client.on_command`) and ``device.ended`` (another connection took the device
over: no hello again until the next connection). The application API is in
``_client.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Mapping
from typing import Any

from ..exceptions import ConnectionClosed, RequestError, RequestTimeout
from ._connection import ConnectionLoop
from ._types import MAX_RESULT_ERROR, DeviceInfo, Message

log = logging.getLogger("revenge_ws.client")


class DeviceLoop(ConnectionLoop):
    """The device side of a :class:`~revenge_ws.client.Client`."""

    # -- hello -------------------------------------------------------------------
    async def _before_resubscribe(self, gen: int) -> bool:
        info = self._dev.info
        if info is None:
            return True
        try:
            await self._hello(info, gen, self.config.request_timeout)
        except RequestTimeout:
            await self._abort("device.hello timed out")
            return False
        except RequestError as exc:
            # Refused (a bad DeviceInfo for this hub): the connection stays useful for
            # everything else; the application hears of it.
            log.warning("device.hello was refused: %s %s", exc.code.value, exc.message)
            self._emit("client.device_error", {"code": exc.code.value, "message": exc.message})
        return True

    async def _hello(self, info: DeviceInfo, gen: int, timeout: float) -> dict[str, Any]:
        """``device.hello`` on connection ``gen``; returns the hub's device object."""

        def accepted(msg: Message, _t3: float) -> None:
            # On the reader: the device is live before any later frame (device.ended,
            # remote.command) is read.
            if msg.get("type") != "ack" or gen != self._gen or self._dev.info is not info:
                return
            device = (msg.get("data") or {}).get("device")
            dev = self._dev
            dev.record = dict(device) if isinstance(device, dict) else None
            dev.gen = gen
            dev.resend = True
            dev.wake.set()
            self.stats.device_hellos += 1
            if dev.reporter is None or dev.reporter.done():
                task = asyncio.get_running_loop().create_task(
                    self._reporter(gen), name="revenge-client-reporter"
                )
                dev.reporter = task
                self._conn_tasks.add(task)
                task.add_done_callback(self._conn_tasks.discard)

        reply = await self._call("device.hello", info.hello(), timeout, on_reply=accepted)
        device = (reply.get("data") or {}).get("device")
        return dict(device) if isinstance(device, dict) else {}

    # -- playback ------------------------------------------------------------------
    async def _send_playback(self, timeout: float) -> bool:
        """Send the current playback (extrapolated) on the connection the device is live
        on; False when there is none (it is re-sent after the next hello)."""
        dev = self._dev
        async with dev.lock:
            pb = dev.playback
            ws = self._ws
            if pb is None or dev.gen != self._gen or ws is None or ws.closed:
                return False
            data = pb.data(self._local_ms())
            dev.sent_at = asyncio.get_running_loop().time()
            dev.wake.set()  # the reporter counts its interval from now
            self.stats.playback_updates += 1
            try:
                await self._call("playback.update", data, timeout)
            except ConnectionClosed:
                return False
        return True

    async def _reporter(self, gen: int) -> None:
        """While the device is live on connection ``gen``: re-send the playback after a
        hello, and send it every ``playback_interval`` while playing."""
        dev = self._dev
        loop = asyncio.get_running_loop()
        interval = max(0.01, self.config.playback_interval)
        while dev.gen == gen == self._gen:
            dev.wake.clear()
            pb = dev.playback
            due: float | None = None
            if dev.resend:
                dev.resend = False
                if pb is not None and pb.state != "stopped":
                    due = loop.time()
            elif pb is not None and pb.state == "playing":
                due = dev.sent_at + interval
            if due is not None and due <= loop.time():
                try:
                    await self._send_playback(self.config.request_timeout)
                except (RequestError, RequestTimeout) as exc:
                    log.warning("periodic playback.update failed: %s", exc)
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if due is None else due - loop.time()):
                    await dev.wake.wait()

    # -- incoming --------------------------------------------------------------------
    def _on_direct(self, msg: Message) -> bool:
        mtype = msg.get("type")
        if mtype == "remote.command":
            data = msg.get("data")
            self.stats.commands_received += 1
            task = asyncio.ensure_future(
                self._answer(data if isinstance(data, dict) else {}, self._gen)
            )
            self._bg.add(task)
            task.add_done_callback(self._bg_done)
            return True
        if mtype == "device.ended":
            data = msg.get("data") or {}
            dev = self._dev
            mine = dev.info is not None and data.get("device_id") in (None, dev.info.device_id)
            if mine and dev.gen >= 0:
                log.info("device %s ended: %s", data.get("device_id"), data.get("reason"))
                dev.gen = -1
                dev.wake.set()  # the reporter stops
        return False  # device.ended is delivered too (handlers, messages())

    async def _answer(self, data: dict[str, Any], gen: int) -> None:
        """Run the command handler (bounded by ``command_timeout``) and send its
        ``remote.result`` on the connection the command came from."""
        command_id = data.get("command_id")
        if not isinstance(command_id, str):
            log.warning("ignored a remote.command without a command_id")
            return
        result = await self._run_handler(data)
        if gen != self._gen:
            log.info("remote.command %s finished after its connection ended", command_id)
            return
        try:
            await self._call(
                "remote.result", {"command_id": command_id, **result}, self.config.request_timeout
            )
        except (RequestError, RequestTimeout, ConnectionClosed) as exc:
            log.info("remote.result %s was not taken: %s", command_id, exc)
            return
        self.stats.commands_answered += 1

    async def _run_handler(self, data: dict[str, Any]) -> dict[str, Any]:
        handler = self._dev.handler
        if handler is None:
            return {"ok": False, "error": "no handler"}
        command = str(data.get("command") or "")
        args = data.get("args")
        sender = data.get("from")
        limit = self.config.command_timeout
        try:
            async with asyncio.timeout(limit) as scope:
                value = handler(
                    command,
                    dict(args) if isinstance(args, dict) else {},
                    dict(sender) if isinstance(sender, dict) else {},
                )
                if inspect.isawaitable(value):
                    value = await value
        except TimeoutError as exc:
            error = f"no result within {limit:g}s" if scope.expired() else _describe(exc)
            return {"ok": False, "error": error}
        except Exception as exc:
            return {"ok": False, "error": _describe(exc)}
        result: dict[str, Any] = {"ok": True}
        if isinstance(value, Mapping):
            result["state"] = dict(value)
        return result


def _describe(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__)[:MAX_RESULT_ERROR]
