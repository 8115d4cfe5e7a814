"""The ``devices`` phase of ``python -m bench`` (issue #16, part 8): remote control and
now-playing reports (contract v1.1 §13).

**Remote command round trip.** ``devices`` remote-controllable devices (one per user, a
load process of their own) answer every ``remote.command`` at once with ``remote.result``
``ok``; a second load process holds one controller connection per user and sends
``rate`` commands/s per device, open-loop, spread evenly (1,000/s for 100 devices × 10/s).
Measured: request → reply latency (the ``ack`` with the device's result) p50/p99/max over
the window, the hub's CPU per command, the clients' CPU. Two scenarios: *same node*
(devices and controllers on one hub, memory broker) and *across nodes* (devices on node
A, controllers on node B, a private ``redis-server`` as broker: the command and its
result travel as control messages).

**playback.update storm.** ``storm_devices`` devices (one per user, over
``storm_procs`` load processes) each report ``playback.update`` every ``period`` s,
evenly spread (10,000 × every 10 s ≈ 1,000 updates/s). Round 0 starts an item (a durable
event when the backend is set: stored in the outbox before the ack); then ``rounds``
rounds of progress are measured: hub CPU per update (the hub process' CPU over the window
÷ updates; also net of the same connections' idle CPU, measured before), ``playback.update``
ack latency, ``device.updated`` received. One admin connection is subscribed to
``sessions`` (an open dashboard). Twice: without ``backend.playback_url``, and with it
pointing at a receiver in this process (aiohttp on 127.0.0.1, answers 200) that counts
batches, events per batch and each event's delivery lag (receipt − its ``at``).

Every hub runs with its defaults except what is named: the storm raises
``server.max_connections`` (N + 1,000) and the accept rate (connections are set-up, not
measured). Hubs (and Redis) are pinned to the servers' core, load processes and this
orchestrator to the load core.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from .common import API_KEY, HOST, free_port, loadavg, percentile, proc_cpu
from .load import core_busy
from .storm import RedisServer, StormError, _split, cpu_s, log_summary

if TYPE_CHECKING:
    from .run import Bench, LoadProc
    from .servers import Server

__all__ = ["GOALS", "DevicesSettings", "run_devices"]

#: The issue's goals on this machine.
GOALS = {"same_p99_ms": 5.0, "cross_p99_ms": 10.0, "us_per_update": 30.0}
PARTS = ("same", "cross", "playback", "backend", "floor")


@dataclass
class DevicesSettings:
    devices: int = 100
    #: Commands per second per device.
    rate: float = 10.0
    warmup: float = 3.0
    window: float = 20.0
    storm_devices: int = 10_000
    storm_procs: int = 4
    period: float = 10.0
    #: Progress rounds measured (after round 0, the first item).
    rounds: int = 3
    #: Seconds of idle CPU measured before the reports start.
    idle: float = 5.0
    #: Which scenarios run: ``same`` / ``cross`` (remote commands on one node / across
    #: two; ``cross@5``: at 5 commands/s per device instead of ``rate``), ``playback`` /
    #: ``backend`` (the storm without / with the backend receiver), ``floor`` (the same
    #: connections and schedule sending the cheapest request with a reply instead).
    parts: tuple[str, ...] = PARTS
    profile: bool = False
    errors: list[str] = field(default_factory=list)


# -- the backend's receiver ------------------------------------------------------------
class Receiver:
    """``backend.playback_url``: counts batches and events, answers 200."""

    def __init__(self) -> None:
        self.port = free_port()
        #: (receipt time, events, bytes)
        self.batches: list[tuple[float, int, int]] = []
        #: (receipt time, receipt − at in ms) per event
        self.lags: list[tuple[float, float]] = []
        self.event_ids: set[str] = set()
        self.duplicates = 0
        self.bad_auth = 0
        self._runner: Any = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/playback"

    async def start(self) -> None:
        from aiohttp import web

        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            now = time.time()
            if request.headers.get("Authorization") != f"Bearer {API_KEY}":
                self.bad_auth += 1
            events = orjson.loads(body).get("events") or []
            self.batches.append((now, len(events), len(body)))
            ms = now * 1000
            for e in events:
                self.lags.append((now, ms - float(e.get("at", ms))))
                eid = e.get("event_id")
                if eid in self.event_ids:
                    self.duplicates += 1
                else:
                    self.event_ids.add(eid)
            return web.json_response({})

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/playback", handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, HOST, self.port).start()

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        b = [x for x in self.batches if t0 <= x[0] < t1]
        lags = sorted(lag for t, lag in self.lags if t0 <= t < t1)
        events = sum(x[1] for x in b)
        wall = max(1e-9, t1 - t0)
        return {
            "batches": len(b),
            "batches_per_s": round(len(b) / wall, 2),
            "events": events,
            "events_per_batch": round(events / len(b), 1) if b else 0.0,
            "largest_batch": max((x[1] for x in b), default=0),
            "kib_per_batch": round(sum(x[2] for x in b) / 1024 / len(b), 1) if b else 0.0,
            "delivery_lag_p50_ms": round(percentile(lags, 50), 1),
            "delivery_lag_p99_ms": round(percentile(lags, 99), 1),
            "delivery_lag_max_ms": round(lags[-1], 1) if lags else 0.0,
        }

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


# -- helpers ----------------------------------------------------------------------------
def _cpu(servers: list[Server]) -> list[tuple[float, float]]:
    """(user, system) CPU seconds of each server."""
    out = []
    for s in servers:
        try:
            out.append(proc_cpu(s.pid))
        except OSError:
            out.append((0.0, 0.0))
    return out


async def _each(procs: list[LoadProc], tag: str, timeout: float) -> list[Any]:
    return list(await asyncio.gather(*(lp.expect(tag, timeout) for lp in procs)))


async def _sleep_until(t: float) -> None:
    delay = t - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


def _ms(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    return {
        "p50_ms": round(1000 * percentile(v, 50), 3),
        "p99_ms": round(1000 * percentile(v, 99), 3),
        "max_ms": round(1000 * v[-1], 3) if v else 0.0,
    }


# -- remote commands ---------------------------------------------------------------------
async def remote_scenario(
    bench: Bench, s: DevicesSettings, cross: bool, rate: float
) -> dict[str, Any]:
    say = bench.progress.say
    redis: RedisServer | None = None
    procs: list[LoadProc] = []
    spies: list[dict[str, Any]] = []
    servers: list[Server] = []
    res: dict[str, Any] = {
        "scenario": "cross" if cross else "same",
        "devices": s.devices,
        "rate_per_device": rate,
        "rate": s.devices * rate,
        "window_s": s.window,
        "warmup_s": s.warmup,
        "broker": "redis" if cross else "memory",
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "loadavg_start": loadavg(),
    }
    bench.loadavg_samples.append(loadavg())
    try:
        quiet = {"REVENGE_NODE_ID": "dev-a"}
        if cross:
            redis = await asyncio.to_thread(RedisServer, bench.server_core)
            env = {"REVENGE_BROKER_URL": redis.url}
            servers.append(await bench.start_server("hub", {**env, **quiet}))
            servers.append(await bench.start_server("hub", {**env, "REVENGE_NODE_ID": "dev-b"}))
        else:
            servers.append(await bench.start_server("hub", quiet))
        dev_hub, ctl_hub = servers[0], servers[-1]
        base = {"mode": "devices", "n": s.devices, "offset": 0, "deadline": 600}

        async def connected(role: str, port: int) -> LoadProc:
            """A client process of ``role`` with every one of its connections up."""
            lp = await bench.load({**base, "role": role, "port": port})
            procs.append(lp)
            await lp.expect("L", 60)
            ready = await lp.expect("READY", 180)
            if ready["connected"] < s.devices:
                raise StormError(f"only {ready['connected']} of {s.devices} {role}s: {ready}")
            return lp

        devices = await connected("device", dev_hub.port)
        controllers = await connected("controller", ctl_hub.port)
        bench.progress.watch(f"remote {res['scenario']}", dev_hub.pid, [lp.pid for lp in procs])
        say(
            f"remote commands ({'across nodes, Redis' if cross else 'same node'}): "
            f"{s.devices} devices × {rate:g}/s for {s.window:g} s"
        )
        go = {"rate": s.devices * rate, "warmup": s.warmup, "window": s.window}
        controllers.send("go " + orjson.dumps(go).decode())
        await controllers.expect("WINDOW", s.warmup + 60)
        c0 = _cpu(servers)
        r0 = cpu_s(redis.proc.pid if redis else None)
        l0 = [cpu_s(lp.pid) for lp in procs]
        k0 = core_busy([bench.server_core])
        w0 = time.monotonic()
        if s.profile:
            for srv, tag in zip(servers, ("a", "b"), strict=False):
                spies.append(
                    bench.start_pyspy(srv.pid, f"hub-remote-{res['scenario']}-{tag}", s.window)
                )
        await controllers.expect("END", s.window + 60)
        c1 = _cpu(servers)
        r1 = cpu_s(redis.proc.pid if redis else None)
        l1 = [cpu_s(lp.pid) for lp in procs]
        k1 = core_busy([bench.server_core])
        wall = max(1e-3, time.monotonic() - w0)
        ctl = await controllers.expect("R", 60)
        for lp in procs:
            lp.send("stop")
        dev = await devices.expect("R", 30)
        for spy in spies:
            if spy.get("proc") is not None:
                spy["proc"].send_signal(signal.SIGINT)
                spy["duration"] = 0
        if spies:
            res["profile"] = [await bench.finish_pyspy(spy) for spy in spies]
            spies = []
        await bench.stop_loads(procs)
        procs = []
        hub_s = [sum(b) - sum(a) for a, b in zip(c0, c1, strict=True)]
        hub_sys = sum(b[1] - a[1] for a, b in zip(c0, c1, strict=True))
        sent = max(1, ctl["sent_in_window"])
        res.update(
            {
                "sent": ctl["sent_in_window"],
                "ok": ctl["ok"],
                "errors": ctl["errors"],
                "unanswered": ctl["unanswered"],
                "latency": ctl["latency"],
                "latency_from_schedule": ctl["latency_from_schedule"],
                "send_lag": ctl["send_lag"],
                "device_answered": dev["answered"],
                "device_errors": dev["errors"],
                "hub_cpu_s": [round(x, 2) for x in hub_s],
                "hub_cpu_pct": [round(100 * x / wall, 1) for x in hub_s],
                "hub_us_per_command": round(1e6 * sum(hub_s) / sent, 1),
                "hub_sys_us_per_command": round(1e6 * hub_sys / sent, 1),
                "redis_cpu_pct": round(100 * (r1 - r0) / wall, 1) if redis else None,
                "controllers_cpu_pct": round(100 * (l1[1] - l0[1]) / wall, 1),
                "devices_cpu_pct": round(100 * (l1[0] - l0[0]) / wall, 1),
                "server_core_other_pct": round(
                    100 * max(0.0, k1["busy"] - k0["busy"] - sum(hub_s) - (r1 - r0)) / wall,
                    1,
                ),
                "hub_log": [log_summary(srv) for srv in servers],
                "loadavg_end": loadavg(),
            }
        )
        return res
    finally:
        for spy in spies:
            if spy.get("proc") is not None and spy["proc"].poll() is None:
                spy["proc"].kill()
        await bench.kill_loads(procs)
        for srv in servers:
            await bench.stop_server(srv)
        if redis is not None:
            await asyncio.to_thread(redis.stop)


# -- the playback.update storm ------------------------------------------------------------
async def playback_scenario(
    bench: Bench, s: DevicesSettings, backend: bool, floor: bool = False
) -> dict[str, Any]:
    say = bench.progress.say
    n = s.storm_devices
    procs: list[LoadProc] = []
    receiver: Receiver | None = None
    server: Server | None = None
    spy: dict[str, Any] = {}
    parts = _split(n, s.storm_procs)
    res: dict[str, Any] = {
        "scenario": "floor" if floor else "backend" if backend else "playback",
        "devices": n,
        "client_processes": len(parts),
        "period_s": s.period,
        "rounds": s.rounds,
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "loadavg_start": loadavg(),
    }
    bench.loadavg_samples.append(loadavg())
    try:
        env = {
            "REVENGE_NODE_ID": "dev-storm",
            "REVENGE_SERVER_MAX_CONNECTIONS": str(n + 1000),
            "REVENGE_SERVER_ACCEPT_RATE": "1000000",
            "REVENGE_SERVER_ACCEPT_BURST": "1000000",
        }
        if backend:
            receiver = Receiver()
            await receiver.start()
            env["REVENGE_BACKEND_PLAYBACK_URL"] = receiver.url
        server = await bench.start_server("hub", env)
        offset = 0
        for i, count in enumerate(parts):
            cfg = {
                "mode": "devices",
                "role": "reporter",
                "port": server.port,
                "n": count,
                "offset": offset,
                "user_prefix": "p",
                "dashboard": i == 0,
                "deadline": 900,
            }
            offset += count
            procs.append(await bench.load(cfg))
        bench.progress.watch(f"playback {res['scenario']}", server.pid, [lp.pid for lp in procs])
        t_connect = time.monotonic()
        await _each(procs, "L", 120)
        ready = await _each(procs, "READY", 400)
        connected = sum(r["connected"] for r in ready)
        res["connect_s"] = round(time.monotonic() - t_connect, 1)
        if connected < n:
            raise StormError(f"only {connected} of {n} devices connected: {ready}")
        await asyncio.sleep(2.0)  # the hellos' device.updated and sessions.updated
        say(
            f"playback storm ({res['scenario']}): {n:,} "
            f"devices connected in {res['connect_s']} s; idle {s.idle:g} s, then a report "
            f"every {s.period:g} s ({n / s.period:,.0f}/s), 1 + {s.rounds} rounds"
        )
        i0, ti0 = cpu_s(server.pid), time.monotonic()
        await asyncio.sleep(s.idle)
        i1, ti1 = cpu_s(server.pid), time.monotonic()
        idle_rate = (i1 - i0) / max(1e-3, ti1 - ti0)
        t0 = time.time() + 1.0
        go = {"t0": t0, "period": s.period, "rounds": 1 + s.rounds, "total": n, "floor": floor}
        for lp in procs:
            lp.send("go " + orjson.dumps(go).decode())
        await _sleep_until(t0)
        c0 = cpu_s(server.pid)
        await _sleep_until(t0 + s.period)
        (cpu1,) = _cpu([server])
        c1 = sum(cpu1)
        k1 = core_busy([bench.server_core])
        l1 = sum(cpu_s(lp.pid) for lp in procs)
        if s.profile:
            spy = bench.start_pyspy(
                server.pid, f"hub-playback-{res['scenario']}", s.rounds * s.period
            )
        t_end = t0 + (1 + s.rounds) * s.period
        await _sleep_until(t_end)
        (cpu2,) = _cpu([server])
        c2 = sum(cpu2)
        k2 = core_busy([bench.server_core])
        l2 = sum(cpu_s(lp.pid) for lp in procs)
        rss = 0
        with contextlib.suppress(OSError):
            from .common import proc_rss

            rss = proc_rss(server.pid)
        if spy.get("proc") is not None:
            spy["proc"].send_signal(signal.SIGINT)
            spy["duration"] = 0
            res["profile"] = await bench.finish_pyspy(spy)
            spy = {}
        await asyncio.sleep(3.0)  # the last acks and the last batches
        for lp in procs:
            lp.send("stop")
        reports = await _each(procs, "R", 60)
        await bench.stop_loads(procs)
        procs = []
        steady_s = c2 - c1
        steady_wall = s.rounds * s.period
        updates = n * s.rounds
        progress_lat = sorted(v for r in reports for v in r.pop("ack_progress_samples"))
        dash = [x for r in reports for x in r.get("sessions_updated") or []]
        dash_in = [x for x in dash if t0 + s.period <= x[0] < t_end]
        res.update(
            {
                "sent": sum(r["sent"] for r in reports),
                "acked": sum(r["acked"] for r in reports),
                "errors": _sum([r["errors"] for r in reports]),
                "unanswered": sum(r["unanswered"] for r in reports),
                "updates_in_window": updates,
                "updates_per_s": round(updates / steady_wall, 1),
                "idle_cpu_pct": round(100 * idle_rate, 1),
                "hub_cpu_pct": round(100 * steady_s / steady_wall, 1),
                "hub_us_per_update": round(1e6 * steady_s / updates, 1),
                "hub_sys_us_per_update": round(1e6 * (cpu2[1] - cpu1[1]) / updates, 1),
                "hub_us_per_update_net": round(
                    1e6 * max(0.0, steady_s - idle_rate * steady_wall) / updates, 1
                ),
                "hub_us_per_first_update": round(1e6 * (c1 - c0) / n, 1),
                "hub_rss_mib": round(rss / 2**20, 1),
                "ack_progress": _ms(progress_lat),
                "ack_first_p99_ms": max(r["ack_durable"]["p99_ms"] for r in reports),
                "ack_first_max_ms": max(r["ack_durable"]["max_ms"] for r in reports),
                "send_lag_p99_ms": max(r["send_lag"]["p99_ms"] for r in reports),
                "device_updated": sum(r["device_updated"] for r in reports),
                "sessions_updated_per_s": round(len(dash_in) / steady_wall, 2),
                "sessions_updated_devices_per_msg": round(
                    sum(x[1] for x in dash_in) / len(dash_in), 1
                )
                if dash_in
                else 0,
                "sessions_updated_kib_per_msg": round(
                    sum(x[3] for x in dash_in) / 1024 / len(dash_in), 1
                )
                if dash_in
                else 0,
                "clients_cpu_pct": round(100 * (l2 - l1) / steady_wall, 1),
                "server_core_other_pct": round(
                    100 * max(0.0, k2["busy"] - k1["busy"] - steady_s) / steady_wall, 1
                ),
                "hub_log": log_summary(server),
                "loadavg_end": loadavg(),
            }
        )
        if receiver is not None:
            res["backend"] = receiver.window(t0 + s.period, t_end)
            res["backend"].update(
                {
                    "events_total": len(receiver.event_ids),
                    "duplicates": receiver.duplicates,
                    "bad_auth": receiver.bad_auth,
                    "first_round": receiver.window(t0, t0 + s.period),
                }
            )
        return res
    finally:
        if spy.get("proc") is not None and spy["proc"].poll() is None:
            spy["proc"].kill()
        await bench.kill_loads(procs)
        if server is not None:
            await bench.stop_server(server)
        if receiver is not None:
            await receiver.close()


def _sum(items: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in items:
        for k, v in d.items():
            out[k] = out.get(k, 0) + int(v)
    return out


# -- the phase ----------------------------------------------------------------------------
async def run_devices(bench: Bench, s: DevicesSettings) -> dict[str, Any]:
    out: dict[str, Any] = {
        "settings": {
            "devices": s.devices,
            "rate_per_device": s.rate,
            "window_s": s.window,
            "warmup_s": s.warmup,
            "storm_devices": s.storm_devices,
            "storm_procs": s.storm_procs,
            "period_s": s.period,
            "rounds": s.rounds,
            "idle_s": s.idle,
        },
        "goals": GOALS,
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "remote": {},
        "playback": {},
        "errors": [],
    }
    say = bench.progress.say
    for name in s.parts:
        # "cross@5": the cross scenario at 5 commands/s per device (another rate).
        base, _, at = name.partition("@")
        if base == "cross" and shutil.which("redis-server") is None:
            out["errors"].append("devices cross: skipped, redis-server is not installed")
            continue
        try:
            if base in ("same", "cross"):
                r = await remote_scenario(bench, s, base == "cross", float(at or s.rate))
                r["scenario"] = name
                out["remote"][name] = r
                say(summary_remote(r))
            else:
                r = await playback_scenario(bench, s, name == "backend", name == "floor")
                out["playback"][name] = r
                say(summary_playback(r))
        except (StormError, RuntimeError, OSError, TimeoutError) as exc:
            out["errors"].append(f"devices {name}: {type(exc).__name__}: {exc}")
            say(f"devices {name} FAILED: {exc}")
    return out


def summary_remote(r: dict[str, Any]) -> str:
    lat = r["latency"]
    return (
        f"  remote {r['scenario']}: {r['ok']:,}/{r['sent']:,} ok, p50 {lat['p50_ms']} ms, "
        f"p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms; hub {r['hub_us_per_command']} µs "
        f"CPU/command ({'+'.join(str(x) for x in r['hub_cpu_pct'])} %), controllers "
        f"{r['controllers_cpu_pct']} %, devices {r['devices_cpu_pct']} %; errors {r['errors']}"
    )


def summary_playback(r: dict[str, Any]) -> str:
    b = r.get("backend") or {}
    tail = (
        f"; backend {b.get('batches_per_s')} batches/s × {b.get('events_per_batch')} events"
        if b
        else ""
    )
    return (
        f"  playback {r['scenario']}: {r['updates_per_s']:,}/s, hub {r['hub_us_per_update']} µs"
        f" CPU/update ({r['hub_us_per_update_net']} net of idle {r['idle_cpu_pct']} %), hub "
        f"{r['hub_cpu_pct']} %; ack p99 {r['ack_progress']['p99_ms']} ms; errors "
        f"{r['errors']}{tail}"
    )
