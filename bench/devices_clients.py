"""The clients of the ``devices`` phase: one load process (``python -m bench.load``, mode
``devices``) in one of three roles.

- ``device``: N connections (users ``d<offset+i>``), each a remote-controllable device
  (``device.hello``, device id ``tv``, every command of §13 in its capabilities) that
  answers every ``remote.command`` at once with ``remote.result`` ``ok``.
- ``controller``: N connections of the same users (the phone in the hand of the TV's
  owner). On ``go {rate, warmup, window}`` they send ``remote.command`` open-loop at
  ``rate``/s in total, round robin over the connections (so each device gets
  ``rate / N``/s), spread evenly over time (a tick every 1 ms sends what is due; a
  late tick catches up). The latency of a command is from just before its frame is
  written to the socket until its reply (the ``ack`` carrying the device's result) is
  read; the send lag (actual minus scheduled send time) is reported beside it, so a
  client that falls behind shows. Only commands sent inside the window are counted.
- ``reporter``: N devices that report ``playback.update`` every ``period`` seconds from
  ``go {t0, period, rounds}`` on (wall clock, shared with the orchestrator): device ``g``
  of ``total`` reports at ``t0 + g / total * period + k * period``, so the whole fleet
  reports evenly. Round 0 starts a new item (a durable event for the backend), later
  rounds are progress (with ``floor`` in ``go``: an ``unsubscribe`` of a channel they do
  not have instead — the cheapest request with a reply). The one with ``dashboard`` also
  holds an admin connection
  subscribed to ``sessions`` (an open admin dashboard) and records every
  ``sessions.updated``.

Answers on stdout (see ``bench.load``): ``READY {json}`` once every connection is ready;
controllers ``WINDOW`` and ``END`` at the edges of the measurement window; every role
``R {json}`` after ``stop`` (controllers and reporters by themselves once done).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from .common import SECRET, percentile, self_cpu
from .wsclient import FIRST_ID, HandshakeRefused, Stats, WSClient, build_request, open_client

__all__ = ["COMMANDS", "DEVICE_ID", "DevConn", "hello_message", "run"]

DEVICE_ID = "tv"
#: What the devices can do (every command §13 validates).
COMMANDS = [
    "play", "pause", "unpause", "toggle_pause", "stop", "seek", "next", "previous",
    "set_volume", "mute", "unmute", "display_message",
]  # fmt: skip
#: What the controllers send, in turn (with the arguments the hub validates).
SENT: list[tuple[str, dict[str, Any]]] = [
    ("pause", {}),
    ("seek", {"position": 1234.5}),
    ("unpause", {}),
    ("set_volume", {"volume": 40}),
    ("toggle_pause", {}),
    ("next", {}),
]


#: The floor's request: ``unsubscribe`` of a channel the connection does not have (the
#: whole request path, a handler that does nothing, an ack).
FLOOR = ["library:bench-floor"]


def hello_message(index: int) -> bytes:
    return orjson.dumps(
        {
            "type": "device.hello",
            "id": FIRST_ID,
            "data": {
                "device_id": DEVICE_ID,
                "name": f"Living room {index}",
                "client": "revenge-bench",
                "version": "1.0.0",
                "capabilities": {"remote_control": True, "commands": COMMANDS},
            },
        }
    )


def token(sub: str, role: str = "user") -> str:
    from revenge_ws.auth import mint_token
    from revenge_ws.config import JwtSettings

    return mint_token(JwtSettings(secret=SECRET), sub, role=role, ttl=7200)


class DevConn(WSClient):
    """A hub connection that sends ``first`` after the ``welcome`` and is ready at its
    ``ack`` (id :data:`FIRST_ID`; without ``first``: at the ``welcome``); every later text
    frame goes to ``on_msg(conn, payload)``."""

    def __init__(
        self,
        request: bytes,
        stats: Stats,
        first: bytes | None,
        on_msg: Callable[[DevConn, bytes], None],
        index: int = 0,
    ) -> None:
        super().__init__("hub", request, stats, subscribe=first, track=True)
        self.on_msg = on_msg
        self.index = index

    def _text(self, p: bytes) -> None:
        if self.ready:
            self.on_msg(self, p)
        else:
            super()._text(p)


async def open_dev(
    port: int,
    tok: str,
    stats: Stats,
    first: bytes | None,
    on_msg: Callable[[DevConn, bytes], None],
    index: int,
    timeout: float = 15.0,
) -> DevConn:
    request = build_request("hub", port, tok)
    return await open_client(lambda: DevConn(request, stats, first, on_msg, index), port, timeout)


async def connect_many(
    port: int,
    specs: Sequence[tuple[str, bytes | None, int]],
    on_msg: Callable[[DevConn, bytes], None],
    *,
    concurrency: int,
    deadline: float,
    progress: bool,
) -> tuple[list[DevConn], dict[str, int]]:
    """Open a connection per ``(token, first message, index)``, retrying refusals and
    timeouts until ``deadline``; the connections in the order of ``specs``."""
    from .load import out

    stats = Stats()
    sem = asyncio.Semaphore(concurrency)
    errors: Counter[str] = Counter()
    done = [0]

    async def one(tok: str, first: bytes | None, index: int) -> DevConn | None:
        async with sem:
            while time.monotonic() < deadline:
                try:
                    c = await open_dev(port, tok, stats, first, on_msg, index)
                    done[0] += 1
                    return c
                except HandshakeRefused as exc:
                    errors[f"http {exc.status}"] += 1
                    if exc.status not in (429, 503):
                        return None
                    await asyncio.sleep(min(exc.retry_after or 0.2, 1.0) * random.random())
                except (OSError, TimeoutError, ConnectionError) as exc:
                    errors[type(exc).__name__] += 1
                    await asyncio.sleep(0.05 + 0.2 * random.random())
            return None

    async def report() -> None:
        while True:
            await asyncio.sleep(0.5)
            out("P", {"phase": "connect", "connected": done[0], "of": len(specs)})

    reporter = asyncio.create_task(report()) if progress else None
    try:
        got = await asyncio.gather(*(one(*s) for s in specs))
    finally:
        if reporter is not None:
            reporter.cancel()
    return [c for c in got if c is not None], dict(errors)


def _ms(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    return {
        "p50_ms": round(1000 * percentile(v, 50), 3),
        "p90_ms": round(1000 * percentile(v, 90), 3),
        "p99_ms": round(1000 * percentile(v, 99), 3),
        "p999_ms": round(1000 * percentile(v, 99.9), 3),
        "max_ms": round(1000 * v[-1], 3) if v else 0.0,
    }


def _error_code(msg: dict[str, Any]) -> str:
    data = msg.get("data")
    return str(data.get("code")) if isinstance(data, dict) else "?"


# -- device ------------------------------------------------------------------------------
class Device:
    def __init__(self) -> None:
        self.answered = 0
        self.results_acked = 0
        self.errors: Counter[str] = Counter()
        self.other: Counter[str] = Counter()

    def on_msg(self, conn: DevConn, p: bytes) -> None:
        msg = orjson.loads(p)
        mtype = msg.get("type")
        if mtype == "remote.command":
            cid = msg["data"]["command_id"]
            # A fresh id per request: the hub replays the reply of a repeated id.
            self.answered += 1
            conn.send_text(
                b'{"type":"remote.result","id":"r%d","data":{"command_id":"%s","ok":true}}'
                % (self.answered, cid.encode())
            )
        elif mtype == "ack":
            self.results_acked += 1
        elif mtype == "error":
            self.errors[_error_code(msg)] += 1
        else:
            self.other[str(mtype)] += 1


# -- controller --------------------------------------------------------------------------
class Controller:
    def __init__(self) -> None:
        #: id -> (send time, counted: sent inside the window)
        self.pending: dict[str, tuple[float, bool]] = {}
        self.lat: list[float] = []
        self.sched_lat: list[float] = []
        self.lag: list[float] = []
        self.ok = 0
        self.errors: Counter[str] = Counter()
        self.other: Counter[str] = Counter()
        self.sched: dict[str, float] = {}

    def on_msg(self, conn: DevConn, p: bytes) -> None:
        now = time.perf_counter()
        msg = orjson.loads(p)
        mid = msg.get("id")
        sent = self.pending.pop(mid, None) if mid is not None else None
        if sent is None:
            self.other[str(msg.get("type"))] += 1
            return
        sched = self.sched.pop(mid)
        if msg.get("type") == "ack":
            if sent[1]:
                self.ok += 1
                self.lat.append(now - sent[0])
                self.sched_lat.append(now - sched)
        elif sent[1]:
            self.errors[_error_code(msg)] += 1

    async def drive(
        self, conns: list[DevConn], rate: float, warmup: float, window: float
    ) -> dict[str, Any]:
        from .load import out

        payloads = [(name, orjson.dumps(args)[1:-1] if args else b"") for name, args in SENT]
        t0 = time.perf_counter()
        w0, w1 = t0 + warmup, t0 + warmup + window
        sent = in_window = 0
        in_window_flag = False
        n = len(conns)
        c0 = self_cpu()
        cw0 = cw1 = c0
        while True:
            now = time.perf_counter()
            if not in_window_flag and now >= w0:
                in_window_flag = True
                cw0 = self_cpu()
                out("WINDOW")
            if now >= w1:
                break
            due = int((now - t0) * rate) - sent
            for _ in range(due):
                k = sent
                sched = t0 + k / rate
                name, args = payloads[k % len(payloads)]
                mid = f"c{k}"
                body = (
                    b'{"type":"remote.command","id":"' + mid.encode()
                    + b'","data":{"device_id":"' + DEVICE_ID.encode()
                    + b'","command":"' + name.encode() + b'"'
                    + (b',"args":{' + args + b"}" if args else b"") + b"}}"
                )  # fmt: skip
                counted = sched >= w0
                ts = time.perf_counter()
                self.pending[mid] = (ts, counted)
                self.sched[mid] = sched
                if counted:
                    in_window += 1
                    self.lag.append(ts - sched)
                conns[k % n].send_text(body)
                sent += 1
            await asyncio.sleep(0.001)
        cw1 = self_cpu()
        out("END")
        for _ in range(500):  # the last replies, 10 s at most
            if not any(c for _, c in self.pending.values()):
                break
            await asyncio.sleep(0.02)
        lost = sum(1 for _, c in self.pending.values() if c)
        return {
            "connections": n,
            "rate": rate,
            "window_s": window,
            "sent": sent,
            "sent_in_window": in_window,
            "ok": self.ok,
            "errors": dict(self.errors),
            "unanswered": lost,
            "latency": _ms(self.lat),
            "latency_from_schedule": _ms(self.sched_lat),
            "send_lag": _ms(self.lag),
            "client_cpu_s": round(cw1 - cw0, 3),
            "client_cpu_pct": round(100 * (cw1 - cw0) / window, 1) if window else 0.0,
            "other": dict(self.other),
        }


# -- reporter ----------------------------------------------------------------------------
class Reporter:
    def __init__(self) -> None:
        self.pending: dict[str, tuple[float, bool]] = {}
        self.lat: dict[bool, list[float]] = {True: [], False: []}
        self.acked = 0
        self.errors: Counter[str] = Counter()
        self.updated = 0
        self.other: Counter[str] = Counter()
        #: sessions.updated seen by the dashboard: (time, devices, removed, bytes)
        self.sessions: list[tuple[float, int, int, int]] = []

    def on_msg(self, conn: DevConn, p: bytes) -> None:
        now = time.perf_counter()
        msg = orjson.loads(p)
        mtype = msg.get("type")
        mid = msg.get("id")
        if mid is not None and mid in self.pending:
            sent, durable = self.pending.pop(mid)
            if mtype == "ack":
                self.acked += 1
                self.lat[durable].append(now - sent)
            else:
                self.errors[_error_code(msg)] += 1
        elif mtype == "device.updated":
            self.updated += 1
        elif mtype == "sessions.updated":
            data = msg.get("data") or {}
            self.sessions.append(
                (
                    time.time(),
                    len(data.get("devices") or []),
                    len(data.get("removed") or []),
                    len(p),
                )
            )
        else:
            self.other[str(mtype)] += 1

    async def drive(
        self,
        conns: list[DevConn],
        total: int,
        t0: float,
        period: float,
        rounds: int,
        floor: bool = False,
    ) -> dict[str, Any]:
        n = len(conns)
        if n == 0:
            return {"sent": 0}
        # conns[i].index is the device's global index g: its phase is g / total * period.
        conns = sorted(conns, key=lambda c: c.index)
        phases = [c.index / total * period for c in conns]
        j = 0
        last = rounds * n
        sent_rounds: Counter[int] = Counter()
        lag: list[float] = []
        while j < last:
            now = time.time()
            while j < last:
                k, i = divmod(j, n)
                at = t0 + k * period + phases[i]
                if at > now:
                    break
                c = conns[i]
                g = c.index
                update: dict[str, Any] = {
                    "item_id": f"item-{g}",
                    "item_type": "movie",
                    "title": f"Bench movie {g}",
                    "state": "playing",
                    "position": round(k * period + random.random(), 3),
                    "duration": 7200.0,
                    "rate": 1.0,
                    "volume": 80,
                    "play_method": "direct",
                }
                mid = f"u{j}"
                self.pending[mid] = (time.perf_counter(), k == 0)
                if floor:  # the cheapest request with a reply, on the same schedule
                    msg = {"type": "unsubscribe", "id": mid, "data": {"channels": FLOOR}}
                else:
                    msg = {"type": "playback.update", "id": mid, "data": update}
                c.send_text(orjson.dumps(msg))
                lag.append(now - at)
                sent_rounds[k] += 1
                j += 1
            await asyncio.sleep(0.005)
        for _ in range(500):  # the last acks, 10 s at most
            if not self.pending:
                break
            await asyncio.sleep(0.02)
        return {
            "devices": n,
            "sent": j,
            "sent_per_round": [sent_rounds[k] for k in range(rounds)],
            "acked": self.acked,
            "errors": dict(self.errors),
            "unanswered": len(self.pending),
            "ack_durable": _ms(self.lat[True]),
            "ack_progress": _ms(self.lat[False]),
            "ack_progress_samples": sorted(self.lat[False]),
            "send_lag": _ms(lag),
            "device_updated": self.updated,
            "other": dict(self.other),
        }


# -- the process -------------------------------------------------------------------------
async def run(cfg: dict[str, Any]) -> None:
    from .load import StdinCommands, close_all, out

    cmds = StdinCommands()
    await cmds.start()
    role = cfg["role"]
    n, offset = int(cfg["n"]), int(cfg.get("offset", 0))
    port = int(cfg["port"])
    prefix = cfg.get("user_prefix", "d")
    conns: list[DevConn] = []
    extra: list[DevConn] = []
    deadline = time.monotonic() + float(cfg.get("connect_timeout", 240))
    show = bool(cfg.get("progress"))
    # Devices and reporters say device.hello; controllers are plain connections.
    specs: list[tuple[str, bytes | None, int]] = [
        (token(f"{prefix}{g}"), None if role == "controller" else hello_message(g), g)
        for g in range(offset, offset + n)
    ]
    try:
        out("L")
        if role == "device":
            dev = Device()
            c0 = self_cpu()
            conns, errors = await connect_many(
                port, specs, dev.on_msg, concurrency=32, deadline=deadline, progress=show
            )
            out("READY", {"connected": len(conns), "errors": errors})
            c1 = self_cpu()
            await cmds.expect("stop", cfg.get("hold", 600))
            out(
                "R",
                {
                    "answered": dev.answered,
                    "results_acked": dev.results_acked,
                    "errors": dict(dev.errors),
                    "other": dict(dev.other),
                    "client_cpu_s": round(self_cpu() - c1, 3),
                    "connect_cpu_s": round(c1 - c0, 3),
                },
            )
        elif role == "controller":
            ctl = Controller()
            conns, errors = await connect_many(
                port, specs, ctl.on_msg, concurrency=32, deadline=deadline, progress=show
            )
            out("READY", {"connected": len(conns), "errors": errors})
            go = orjson.loads((await cmds.expect("go", cfg.get("hold", 600))).split(" ", 1)[1])
            res = await ctl.drive(
                conns, float(go["rate"]), float(go["warmup"]), float(go["window"])
            )
            out("R", res)
            await cmds.expect("stop", 120)
        elif role == "reporter":
            rep = Reporter()
            conns, errors = await connect_many(
                port, specs, rep.on_msg, concurrency=64, deadline=deadline, progress=show
            )
            if cfg.get("dashboard"):
                sub = orjson.dumps(
                    {"type": "subscribe", "id": FIRST_ID, "data": {"channels": ["sessions"]}}
                )
                board, _ = await connect_many(
                    port,
                    [(token("bench-admin", "admin"), sub, -1)],
                    rep.on_msg,
                    concurrency=1,
                    deadline=deadline,
                    progress=False,
                )
                extra.extend(board)
            out("READY", {"connected": len(conns), "errors": errors, "dashboard": len(extra)})
            go = orjson.loads((await cmds.expect("go", cfg.get("hold", 600))).split(" ", 1)[1])
            c0 = self_cpu()
            res = await rep.drive(
                conns,
                int(go["total"]),
                float(go["t0"]),
                float(go["period"]),
                int(go["rounds"]),
                bool(go.get("floor")),
            )
            res["client_cpu_s"] = round(self_cpu() - c0, 3)
            await cmds.expect("stop", 120)
            res["sessions_updated"] = rep.sessions
            res["device_updated"] = rep.updated
            out("R", res)
        else:
            raise ValueError(f"unknown role {role}")
    finally:
        await close_all([*conns, *extra])
        cmds.close()
