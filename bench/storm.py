"""The ``storm`` phase of ``python -m bench`` (issue #14, item 4): N users come back after
a node goes away, like real apps, and check what they receive.

Per scenario:

- **a**: one node, memory broker; SIGTERM (the node closes every connection with 1012),
  a new node on the same port. History is lost: ``recovered: false`` is expected.
- **b**: the same with Redis (a private ``redis-server`` on a free port): history survives,
  every resubscribed channel must come back ``recovered: true`` with exactly the missed
  publications.
- **c**: two nodes on Redis behind ``bench/balancer.py`` (round-robin, skips a backend it
  cannot reach); one node is SIGKILLed and its clients move to the other.

Every user (``bench/storm_clients.py``; several load processes on the load core) has the
automatic channels and subscribes to ``activity``, ``library:l1`` and ``library:l2``; every
``notify_every``-th user gets ``notes`` notifications before the storm and never
acknowledges them, so the hub re-sends them after the reconnect (the client counts and
acknowledges them then). During the storm a publisher sends ``rate``/s to the library
channels of the live node, and an observer on ``activity`` (connected to the live node,
reconnecting at once) counts the presence publications. The storm is timed from the new
node listening (a, b) or from the SIGKILL (c; the survivor is listening) to each client's
subscribe ack. Hub settings are the defaults except ``server.max_connections`` (N + 1,000:
all the users fit on one node) and a SQLite file store, shared by the nodes and kept
across the restart (notifications must survive it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from .common import (
    API_KEY,
    HOST,
    ROOT,
    SECRET,
    free_port,
    loadavg,
    percentile,
    pin,
    proc_cpu,
    python,
    python_env,
    wait_port,
)
from .load import core_busy
from .servers import Server, command, hub_env
from .storm_clients import LIBRARIES, StormConn, StormRefused, User, notified, open_conn
from .wsclient import Stats

if TYPE_CHECKING:
    from .run import Bench, LoadProc

__all__ = ["SCENARIOS", "StormSettings", "run_storm"]

SCENARIOS = {
    "a": "restart of a single node (memory broker)",
    "b": "restart of a single node (Redis)",
    "c": "two nodes (Redis) behind a TCP balancer, one SIGKILLed",
}
GOAL_S = 15.0
MOONSHOT_S = 10.0
#: ``activity.presence_window`` default (contract v1.1 §11): the presence budget.
PRESENCE_WINDOW_S = 1.0
PRESENCE_TYPES = ("activity.presence", "activity.user_online", "activity.user_offline")


class StormError(RuntimeError):
    pass


@dataclass
class StormSettings:
    clients: int = 10_000
    procs: int = 4
    timeout: float = 180.0
    scenarios: list[str] = field(default_factory=lambda: ["a", "b", "c"])
    notify_every: int = 10
    notes: int = 5
    rate: float = 5.0
    #: Record the live node with py-spy from t0 to the last ack (--profile).
    profile: bool = False


# -- processes -------------------------------------------------------------------------
class RedisServer:
    """A private redis-server on a free port, no persistence (the hub restarts, not
    Redis), pinned to the servers' core."""

    def __init__(self, core: int | None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise StormError("redis-server is not installed")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", HOST, "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=(lambda: pin({core})) if core is not None else None,
        )  # fmt: skip
        if not wait_port(self.port, 10, lambda: self.proc.poll() is None):
            self.stop()
            raise StormError(f"redis-server did not start on port {self.port}")

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def commands(self) -> int:
        """Commands Redis has processed so far (``INFO stats``); -1 if it cannot say."""
        import socket

        with (
            contextlib.suppress(OSError, ValueError),
            socket.create_connection((HOST, self.port), 2) as sock,
        ):
            sock.settimeout(2)
            sock.sendall(b"*2\r\n$4\r\nINFO\r\n$5\r\nstats\r\n")
            data = b""
            while b"total_commands_processed:" not in data or not data.endswith(b"\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            for line in data.split(b"\r\n"):
                if line.startswith(b"total_commands_processed:"):
                    return int(line.split(b":", 1)[1])
        return -1

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


def spawn_hub(bench: Bench, port: int, env: dict[str, str]) -> Server:
    """A hub process on ``port`` (not waited for: see :func:`wait_listening`)."""
    if bench.args.hub_src:
        env = {**env, "BENCH_HUB_SRC": bench.args.hub_src}
    fd, name = tempfile.mkstemp(prefix="bench-storm-hub-", suffix=".log")
    with os.fdopen(fd, "wb") as log:
        proc = subprocess.Popen(
            command("hub", port, bench.server_core),
            env=hub_env(port, env),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Server("hub", port, proc, Path(name))
    bench.cleanup.servers.append(server)
    return server


async def wait_listening(server: Server, timeout: float = 30.0) -> float:
    """When (``time.time()``) the server's port first accepted a connection, polled every
    5 ms."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not server.alive():
            raise StormError(f"the hub on port {server.port} exited:\n{server.log_tail()}")
        try:
            _, writer = await asyncio.open_connection(HOST, server.port)
        except OSError:
            await asyncio.sleep(0.005)
            continue
        t = time.time()
        writer.close()
        return t
    raise StormError(f"the hub did not listen on port {server.port} within {timeout:g} s")


def spawn_balancers(
    bench: Bench, port: int, backends: list[int], clients: int
) -> list[subprocess.Popen[bytes]]:
    """Balancer processes sharing ``port`` (SO_REUSEPORT): at least two, and enough that
    each holds at most ~12,000 sockets (two per client) under the open-files limit."""
    count = max(2, -(-2 * clients // 12_000))
    procs = []
    for _ in range(count):
        proc = subprocess.Popen(
            [python(), "-m", "bench.balancer", "--port", str(port), "--core",
             str(min(bench.load_cores)), "--backends", ",".join(f"{HOST}:{p}" for p in backends)],
            cwd=ROOT,
            env=python_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        bench.cleanup.others.append(proc)
        procs.append(proc)
        if not wait_port(port, 15, lambda p=proc: p.poll() is None):  # type: ignore[misc]
            raise StormError("the balancer did not start")
    time.sleep(0.3)  # the later ones bind their sockets too
    if any(p.poll() is not None for p in procs):
        raise StormError("a balancer process exited")
    return procs


def cpu_s(pid: int | None) -> float:
    if pid is None:
        return 0.0
    with contextlib.suppress(OSError):
        return sum(proc_cpu(pid))
    return 0.0


def log_summary(server: Server) -> dict[str, Any]:
    """Counts of the hub log's warning and error lines, and their most common texts."""
    from collections import Counter

    levels: Counter[str] = Counter()
    texts: Counter[str] = Counter()
    with contextlib.suppress(OSError):
        for line in server.log_path.read_text(errors="replace").splitlines():
            for level in ("WARNING", "ERROR", "CRITICAL", "Traceback"):
                if level in line:
                    levels[level] += 1
                    # The message without what varies (ids, numbers).
                    msg = line.split(level, 1)[1].strip(" :]-")
                    msg = re.sub(r"\b(?=\w*\d)\w{6,}\b", "…", msg)
                    texts[re.sub(r"\d+", "N", msg)[:90]] += 1
                    break
    return {"levels": dict(levels), "top": texts.most_common(6)}


# -- publisher and observer --------------------------------------------------------------
class Publisher:
    """``rate``/s alternating over the library channels, ``POST /api/v1/realtime/publish``
    to the live node; publications that fail (node down) are counted, not retried."""

    def __init__(self, base: str, rate: float) -> None:
        import aiohttp

        self.base = base
        self.rate = rate
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3))
        self.ok = 0
        self.failed: dict[str, int] = {}
        self.last: dict[str, list[Any]] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.Task[None] | None = None
        self._i = 0

    def start(self) -> None:
        self._loop = asyncio.create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while True:
            delay = t0 + self._i / self.rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(self.tasks) < 50:
                task = asyncio.create_task(self._post(LIBRARIES[self._i % 2], self._i))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            else:
                key = "skipped: 50 in flight"
                self.failed[key] = self.failed.get(key, 0) + 1
            self._i += 1

    async def _post(self, channel: str, i: int) -> None:
        body = {
            "channel": channel,
            "type": "library.changed",
            "data": {
                "library_id": channel.split(":", 1)[1],
                "added": [f"item{i}"],
                "updated": [],
                "removed": [],
            },
        }
        try:
            async with self.session.post(
                f"{self.base}/api/v1/realtime/publish",
                json=body,
                headers={"Authorization": f"Bearer {API_KEY}"},
            ) as r:
                data = await r.read()
                if r.status != 200:
                    key = f"http {r.status}"
                    self.failed[key] = self.failed.get(key, 0) + 1
                    return
            res = orjson.loads(data)
            self.ok += 1
            last = self.last.get(channel)
            if last is None or last[0] != res["epoch"] or last[1] < res["seq"]:
                self.last[channel] = [res["epoch"], res["seq"]]
        except Exception as exc:
            key = type(exc).__name__
            self.failed[key] = self.failed.get(key, 0) + 1

    async def position(self, channel: str) -> list[Any]:
        """The channel's current (epoch, seq) from the node's history endpoint."""
        async with self.session.get(
            f"{self.base}/api/v1/realtime/history/{channel}",
            params={"limit": "1"},
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as r:
            if r.status != 200:
                raise StormError(f"history of {channel}: HTTP {r.status}")
            data = orjson.loads(await r.read())
        return [data["epoch"], data["seq"]]

    async def notify(self, user_ids: list[str], k: int) -> int:
        import aiohttp

        pushed = 0
        for at in range(0, len(user_ids), 10_000):
            async with self.session.post(
                f"{self.base}/api/v1/realtime/notify",
                json={
                    "user_ids": user_ids[at : at + 10_000],
                    "notification_type": "bench.storm",
                    "title": f"storm notification {k}",
                    "body": "re-sent after every reconnect until acknowledged",
                },
                headers={"Authorization": f"Bearer {API_KEY}"},
                timeout=aiohttp.ClientTimeout(total=60),
            ) as r:
                if r.status != 200:
                    raise StormError(f"notify answered HTTP {r.status}: {await r.text()}")
                pushed += int(orjson.loads(await r.read()).get("pushed", 0))
        return pushed

    async def stop(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
            self._loop = None
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=5)

    async def close(self) -> None:
        await self.stop()
        for t in list(self.tasks):
            t.cancel()
        await self.session.close()


def _stamp(msg: dict[str, Any]) -> float | None:
    ts = msg.get("timestamp")
    if not isinstance(ts, str):
        return None
    with contextlib.suppress(ValueError):
        return datetime.fromisoformat(ts).timestamp()
    return None


class Observer:
    """One client on ``activity`` at the live node: every presence publication with its
    server timestamp; after its connection ends it reconnects at once (every 20 ms) and
    resubscribes with ``since``. What it could not see (a lost history) is counted from
    the channel positions."""

    def __init__(self, port: int) -> None:
        from revenge_ws.auth import mint_token
        from revenge_ws.config import JwtSettings

        token = mint_token(JwtSettings(secret=SECRET), "storm-observer", ttl=7200)  # type: ignore[arg-type]
        self.port = port
        self.user = User(
            -1, token, False, uid="storm-observer", channels=("activity",), automatic=False
        )
        self.user.record = self._record
        self.stats = Stats()
        self.pubs: list[tuple[float, float | None, str, Any]] = []
        #: Publications on activity the observer never received (lost history).
        self.unseen: list[tuple[float, int, str]] = []
        self.reconnects = 0
        self.refused: dict[str, int] = {}
        self.back_at: list[float] = []
        self.conn: StormConn | None = None
        self._task: asyncio.Task[None] | None = None

    def _record(self, t: float, msg: dict[str, Any]) -> None:
        if msg.get("channel") == "activity":
            self.pubs.append((t, _stamp(msg), str(msg.get("type")), msg.get("data")))

    async def start(self) -> None:
        self.conn = await open_conn(self.port, self.user, self.stats, first=True)
        self.conn.send_subscribe(*self.user.resubscribe())
        await asyncio.wait_for(asyncio.shield(self.conn.ack_fut), 10)

    def follow(self, deadline: float) -> None:
        self._task = asyncio.create_task(self._follow(deadline))

    async def _follow(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            assert self.conn is not None
            await self.conn.closed_fut
            before = list(self.user.pos.get("activity") or [None, 0])
            while time.monotonic() < deadline:
                try:
                    sub = self.user.resubscribe()
                    nc = await open_conn(self.port, self.user, self.stats, on_welcome=sub)
                    ack = await asyncio.wait_for(asyncio.shield(nc.ack_fut), 10)
                except (StormRefused, OSError, TimeoutError, ConnectionError) as exc:
                    key = (
                        f"http {exc.status}"
                        if isinstance(exc, StormRefused)
                        else type(exc).__name__
                    )
                    self.refused[key] = self.refused.get(key, 0) + 1
                    await asyncio.sleep(0.02)
                    continue
                self.reconnects += 1
                self.back_at.append(time.time())
                self.conn = nc
                for e in ack.get("subscriptions") or []:
                    if e.get("channel") == "activity" and not e.get("recovered"):
                        base = before[1] if e.get("epoch") == before[0] else 0
                        self.unseen.append((time.time(), max(0, int(e["seq"]) - base), e["epoch"]))
                break

    def presence(self, t0: float, t_end: float, t_before: float | None) -> dict[str, Any]:
        """Presence publications by server timestamp: in [t0, t_end] (the storm), before
        it (since ``t_before``: a shutting-down node's), after it (up to now)."""
        from collections import Counter

        inside: Counter[str] = Counter()
        entries: Counter[str] = Counter()
        before = after = 0
        for _t, ts, mtype, data in self.pubs:
            if mtype not in PRESENCE_TYPES or ts is None:
                continue
            if ts < t0 - 0.002:
                if t_before is not None and ts >= t_before:
                    before += 1
                continue
            if ts > t_end + 0.002:
                after += 1
                continue
            inside[mtype] += 1
            if mtype == "activity.presence" and isinstance(data, dict):
                entries["online"] += len(data.get("online") or [])
                entries["offline"] += len(data.get("offline") or [])
            else:
                entries["online" if mtype.endswith("online") else "offline"] += 1
        unseen = sum(k for _t, k, _e in self.unseen)
        storm_s = max(0.0, t_end - t0)
        total = sum(inside.values()) + unseen
        budget = int(storm_s / PRESENCE_WINDOW_S) + 2
        return {
            "publications": total,
            "by_type": dict(inside),
            "not_seen_individually": unseen,
            "users_reported": sum(entries.values()),
            "users_reported_online": entries["online"],
            "users_reported_offline": entries["offline"],
            "budget": budget,
            "within_budget": total <= budget,
            "before_listening": before,
            "after_last_ack": after,
            "observer_reconnects": self.reconnects,
            "observer_back_after_s": [round(t - t0, 3) for t in self.back_at],
            "observer_failed_attempts": dict(self.refused),
        }

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.conn is not None:
            self.conn.close()


# -- one scenario ------------------------------------------------------------------------
def _split(n: int, parts: int) -> list[int]:
    parts = max(1, min(parts, n))
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def _sum_dicts(items: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in items:
        for k, v in d.items():
            out[k] = out.get(k, 0) + int(v)
    return dict(sorted(out.items()))


async def _each(procs: list[LoadProc], tag: str, timeout: float) -> list[Any]:
    return list(await asyncio.gather(*(lp.expect(tag, timeout) for lp in procs)))


async def run_scenario(bench: Bench, name: str, s: StormSettings) -> dict[str, Any]:
    redis_broker = name in ("b", "c")
    n = s.clients
    tmp = tempfile.mkdtemp(prefix="bench-storm-")
    procs: list[LoadProc] = []
    redis: RedisServer | None = None
    balancers: list[subprocess.Popen[bytes]] = []
    pub: Publisher | None = None
    obs: Observer | None = None
    spy: dict[str, Any] = {}
    say = bench.progress.say
    res: dict[str, Any] = {
        "scenario": name,
        "title": SCENARIOS[name],
        "clients": n,
        "client_processes": len(_split(n, s.procs)),
        "broker": "redis" if redis_broker else "memory",
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "loadavg_start": loadavg(),
    }
    bench.loadavg_samples.append(loadavg())
    try:
        env = {
            "REVENGE_STORE_URL": f"sqlite:///{tmp}/store.sqlite3",
            "REVENGE_SERVER_MAX_CONNECTIONS": str(n + 1000),
        }
        if redis_broker:
            redis = await asyncio.to_thread(RedisServer, bench.server_core)
            env["REVENGE_BROKER_URL"] = redis.url
        if name == "c":
            pa, pb, plb = free_port(), free_port(), free_port()
            gone = spawn_hub(bench, pa, {**env, "REVENGE_NODE_ID": "storm-1"})
            live = spawn_hub(bench, pb, {**env, "REVENGE_NODE_ID": "storm-2"})
            await wait_listening(gone)
            await wait_listening(live)
            balancers = await asyncio.to_thread(spawn_balancers, bench, plb, [pa, pb], n)
            client_port = plb
        else:
            port = free_port()
            gone = spawn_hub(bench, port, {**env, "REVENGE_NODE_ID": "storm-1"})
            await wait_listening(gone)
            live = gone
            client_port = port
        offset = 0
        for count in _split(n, s.procs):
            cfg = {
                "mode": "storm",
                "port": client_port,
                "n": count,
                "offset": offset,
                "notify_every": s.notify_every,
                "concurrency": 64,
                "recover_timeout": s.timeout,
                "deadline": s.timeout + 900,
            }
            offset += count
            procs.append(await bench.load(cfg))
        bench.progress.watch(f"storm {name}", live.pid, [lp.pid for lp in procs])
        await _each(procs, "L", 120)
        obs = Observer(live.port)
        await obs.start()
        for lp in procs:
            lp.send("connect")
        ready = await _each(procs, "READY", 400)
        connected = sum(r["connected"] for r in ready)
        res["nodes_before"] = _sum_dicts([r["nodes"] for r in ready])
        if connected < n:
            raise StormError(f"only {connected} of {n} clients connected: {ready}")
        for lp in procs:
            lp.send("subscribe")
        subscribed = sum(r["subscribed"] for r in await _each(procs, "SUBSCRIBED", 300))
        if subscribed < n:
            raise StormError(f"only {subscribed} of {n} clients subscribed")
        pub = Publisher(f"http://{HOST}:{live.port}", s.rate)
        users = [f"s{i}" for i in range(n) if notified(i, s.notify_every)]
        pushed = 0
        if users:
            for k in range(s.notes):
                pushed += await pub.notify(users, k)
        pub.start()
        await asyncio.sleep(max(1.0, 4 / s.rate))
        positions = {ch: await pub.position(ch) for ch in LIBRARIES}
        arm = {"positions": positions, "notes": s.notes, "node": "storm-1" if name == "c" else None}
        for lp in procs:
            lp.send("arm " + orjson.dumps(arm).decode())
        armed = await _each(procs, "ARMED", 60)
        res["behind_before_storm"] = sum(a["behind"] for a in armed)
        movers = sum(a["movers"] for a in armed)
        res["movers"] = movers
        res["notified_users"] = len(users)
        res["notifications_pushed_live"] = pushed
        obs.follow(time.monotonic() + s.timeout + 60)
        say(f"storm {name}: {n:,} clients ready ({movers:,} to move); " + SCENARIOS[name])

        # -- the storm -------------------------------------------------------------------
        t_before: float | None = None
        if name == "c":
            c0 = cpu_s(live.pid)
            t0 = time.time()
            os.kill(gone.pid, signal.SIGKILL)
            await asyncio.to_thread(gone.proc.wait, 10)
            res["t0"] = "SIGKILL of one node (the other is listening)"
        else:
            t_before = time.time()
            status = await asyncio.to_thread(gone.stop, 30.0)
            t_down = time.time()
            res["old_exit_status"] = status
            res["shutdown_s"] = round(t_down - t_before, 2)
            res["old_hub_log"] = log_summary(gone)
            live = spawn_hub(bench, gone.port, {**env, "REVENGE_NODE_ID": "storm-1"})
            t0 = await wait_listening(live)
            c0 = cpu_s(live.pid)
            res["listening_after_sigterm_s"] = round(t0 - t_before, 2)
            res["t0"] = "the new node listening"
        r0 = cpu_s(redis.proc.pid if redis else None)
        q0 = redis.commands() if redis else 0
        b0 = sum(cpu_s(p.pid) for p in balancers)
        l0 = sum(cpu_s(lp.pid) for lp in procs)
        k0 = core_busy([bench.server_core])
        w0 = time.time()
        bench.progress.watch(f"storm {name}", live.pid, [lp.pid for lp in procs])
        if s.profile:  # numbers of a profiled run are not comparable (py-spy samples)
            spy = bench.start_pyspy(live.pid, f"hub-storm-{name}", s.timeout)
        backs = await _each(procs, "BACK", s.timeout + 120)
        c1 = cpu_s(live.pid)
        r1 = cpu_s(redis.proc.pid if redis else None)
        q1 = redis.commands() if redis else 0
        b1 = sum(cpu_s(p.pid) for p in balancers)
        l1 = sum(cpu_s(lp.pid) for lp in procs)
        k1 = core_busy([bench.server_core])
        wall = max(1e-3, time.time() - w0)
        if spy.get("proc") is not None:
            spy["proc"].send_signal(signal.SIGINT)  # py-spy writes what it has
            spy["duration"] = 0
            res["profile"] = await bench.finish_pyspy(spy)
        acks = sorted(a - t0 for r in backs for a in r["back"])
        for key in ("handshake_s", "subscribe_s", "waited_s"):
            vals = sorted(v for r in backs for v in r[key])
            res[f"{key[:-2]}_p50_p99_max_s"] = [
                round(percentile(vals, 50), 3),
                round(percentile(vals, 99), 3),
                round(vals[-1], 3) if vals else 0.0,
            ]
        t_last = t0 + acks[-1] if acks else time.time()
        await asyncio.sleep(1.5)  # live traffic after the last ack, then the final check
        await pub.stop()
        await asyncio.sleep(0.5)
        final = {ch: await pub.position(ch) for ch in (*LIBRARIES, "activity")}
        for lp in procs:
            lp.send("check " + orjson.dumps({"positions": final, "timeout": 15}).decode())
        reports = await _each(procs, "R", 90)
        presence = obs.presence(t0, t_last, t_before)
        await bench.stop_loads(procs)
        res.update(assemble(reports, acks, movers, redis_broker, s))
        res.update(
            {
                "hub_cpu_s": round(c1 - c0, 2),
                "hub_cpu_ms_per_reconnect": round(1000 * (c1 - c0) / max(1, len(acks)), 2),
                "redis_cpu_s": round(r1 - r0, 2) if redis else None,
                # Every node's commands from t0 to the last ack (publications included).
                "redis_commands_per_reconnect": round((q1 - q0) / max(1, len(acks)), 1)
                if redis
                else None,
                "balancer_cpu_s": round(b1 - b0, 2) if balancers else None,
                "balancer_processes": len(balancers),
                "clients_cpu_s": round(l1 - l0, 2),
                "window_s": round(wall, 2),
                # The servers' core: time spent by other processes than the hub and Redis
                # (other users of the machine), % of the window: a noisy run shows here.
                "server_core_other_pct": round(
                    100 * max(0.0, k1["busy"] - k0["busy"] - (c1 - c0) - (r1 - r0)) / wall, 1
                ),
                "presence": presence,
                "publisher": {"ok": pub.ok, "failed": dict(pub.failed), "rate": s.rate},
                "final_positions": final,
                "hub_log": log_summary(live),
                "loadavg_end": loadavg(),
            }
        )
        return res
    finally:
        if spy.get("proc") is not None and spy["proc"].poll() is None:
            spy["proc"].kill()
        if obs is not None:
            await obs.close()
        if pub is not None:
            await pub.close()
        await bench.kill_loads(procs)
        for server in list(bench.cleanup.servers):
            await bench.stop_server(server)
        for proc in balancers:
            if proc.poll() is None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
                if proc.poll() is None:
                    proc.kill()
        if redis is not None:
            await asyncio.to_thread(redis.stop)
        shutil.rmtree(tmp, ignore_errors=True)


def assemble(
    reports: list[dict[str, Any]],
    acks: list[float],
    movers: int,
    redis_broker: bool,
    s: StormSettings,
) -> dict[str, Any]:
    """Per-scenario numbers from the load processes' reports."""
    checks = _sum_dicts([r["checks"] for r in reports])
    unrecovered = _sum_dicts([r["unrecovered"] for r in reports])
    behind = _sum_dicts([r["behind_at_end"] for r in reports])
    outcomes = _sum_dicts([r["outcomes"] for r in reports])
    gave_up = _sum_dicts([r["gave_up"] for r in reports])
    gaps = {
        k: v for k, v in checks.items() if k.startswith("gap") and k != "gap: missing publications"
    }
    if checks.get("duplicate"):
        gaps["duplicate"] = checks["duplicate"]
    for fam, v in behind.items():
        gaps[f"behind the final position on {fam}"] = v
    if redis_broker:
        for fam, v in unrecovered.items():
            gaps[f"recovered: false on {fam}"] = v
    never = sum(r["never_closed"] for r in reports)
    notify = {
        "users": sum(r["notify_users"] for r in reports),
        "users_with_all_resent": sum(r["notify_users_resent_all"] for r in reports),
        "resent": sum(r["notes_resent"] for r in reports),
        "resent_distinct": sum(r["notes_resent_distinct"] for r in reports),
        "acked": sum(r["notes_acked"] for r in reports),
        "unexpected": sum(r["notes_unexpected"] for r in reports),
        "expected_per_user": s.notes,
    }
    p = {q: round(percentile(acks, q), 2) for q in (50, 99)}
    return {
        "back": len(acks),
        "all_back": len(acks) >= movers and not gave_up,
        "p50_s": p[50],
        "p99_s": p[99],
        "max_s": round(acks[-1], 2) if acks else None,
        "goal_met": bool(acks) and len(acks) >= movers and acks[-1] <= GOAL_S,
        "moonshot_met": bool(acks) and len(acks) >= movers and acks[-1] <= MOONSHOT_S,
        "acks_s": [round(a, 3) for a in acks],
        "closed": sum(r["closed"] for r in reports),
        "never_closed": never,
        "gave_up": sum(gave_up.values()),
        "gave_up_reasons": gave_up,
        "http_503": outcomes.get("http 503", 0),
        "http_503_with_window": outcomes.get("http 503 with Reconnect-Window", 0),
        "attempts": sum(r["attempts"] for r in reports),
        "outcomes": outcomes,
        "gaps": sum(gaps.values()),
        "gap_kinds": gaps,
        "missing_publications": checks.get("gap: missing publications", 0),
        "recovered_entries": checks.get("recovered", 0),
        "replayed": checks.get("missed (replayed)", 0),
        "unrecovered": unrecovered,
        "checks": checks,
        "notifications": notify,
        "nodes_after": _sum_dicts([r["nodes"] for r in reports]),
    }


async def run_storm(bench: Bench, s: StormSettings) -> dict[str, Any]:
    """Every asked scenario in turn; a failed one is reported, the others still run."""
    out: dict[str, Any] = {
        "clients": s.clients,
        "client_processes": s.procs,
        "timeout_s": s.timeout,
        "notify_every": s.notify_every,
        "notes": s.notes,
        "rate": s.rate,
        "goal_s": GOAL_S,
        "moonshot_s": MOONSHOT_S,
        "presence_window_s": PRESENCE_WINDOW_S,
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "scenarios": {},
        "errors": [],
    }
    for name in s.scenarios:
        if name in ("b", "c") and shutil.which("redis-server") is None:
            out["errors"].append(f"storm {name}: skipped, redis-server is not installed")
            continue
        bench.progress.say(f"storm {name}: {SCENARIOS[name]}, {s.clients:,} clients")
        try:
            res = await run_scenario(bench, name, s)
        except (StormError, RuntimeError, OSError, TimeoutError) as exc:
            out["errors"].append(f"storm {name}: {type(exc).__name__}: {exc}")
            bench.progress.say(f"storm {name} FAILED: {exc}")
            continue
        out["scenarios"][name] = res
        bench.progress.say(summary(res))
    return out


def summary(r: dict[str, Any]) -> str:
    return (
        f"  storm {r['scenario']}: {r['back']:,}/{r['movers']:,} back, p50 {r['p50_s']} s, "
        f"p99 {r['p99_s']} s, max {r['max_s']} s; hub {r['hub_cpu_ms_per_reconnect']} ms CPU"
        f"/reconnect; presence {r['presence']['publications']} (budget "
        f"{r['presence']['budget']}); 503s {r['http_503']:,}; gave up {r['gave_up']}; "
        f"gaps {r['gaps']}; notifications re-sent {r['notifications']['resent']:,}"
    )
