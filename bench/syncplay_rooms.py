"""SyncPlay at scale: 100 rooms x 50 members on one node.

One hub process (memory broker and room store) on 127.0.0.1; 5,000 real
:class:`revenge_ws.client.Client` connections spread over 2-4 worker processes (member ``j``
of room ``r`` lives in worker ``(r + j) % W``, so every room's fan-out crosses every worker).
Every member joins its room and reports ``ready``, then sends a ``syncplay.report`` every 5 s
(what real players do — it is also their presence heartbeat: a member silent for 30 s is
marked disconnected). While measuring, one member of each room sends a control request every
PERIOD seconds, cycling ``seek`` -> ``pause`` -> ``play`` (the first one is the ``play`` that
starts the room). Each ``--phases`` entry PERIOD is one measurement window on the same
connections (default ``0,5,2``: idle — the hub's baseline: reports, heartbeats, the SyncPlay
timeout sweep —, then a request per room every 5 s, then every 2 s); before each, the
workers wait until the setup's publications have all arrived. ``--pin`` puts the hub on the
first core and the workers on the others (``--worker-nice`` lowers their priority).

Measured: the time from just before a member sends ``syncplay.play``/``seek``/``pause`` until
the LAST of the room's 50 members has received the resulting ``syncplay.command`` (all
processes read the same wall clock; a worker takes the time in the client's handler, right
after the frame was decoded), as p50/p99/max over every command of the window; the first
member's receipt too; how many ``play``/``seek`` reached a member after their ``when``; the
hub's CPU (user + system from ``/proc/PID/stat``), run-queue wait (``schedstat``) and RSS;
every worker's CPU; the load average.

Diagnostics: the hub runs through ``--hub``, a wrapper around ``revenge-ws serve`` that logs
full garbage collections (and any of 5 ms or more) and times the notifications' on-connect
hook; ``--profile`` samples it with py-spy. Connections are opened in a closed loop (at most
``--unserved`` waiting for the hub's first pong): the hub reads a new connection only after its
on-connect hooks ran, and an open-loop burst (``--unserved 0``) can leave connections unread
long enough to be closed with 4003. ``--diag-gc-threshold`` and ``--diag-skip-redeliver``
change the hub for A/B tests (see docs/benchmarks-syncplay.md).

    python bench/syncplay_rooms.py                       # 100 x 50, 4 workers, 3 x 30 s
    python bench/syncplay_rooms.py --phases 0,5,2,1 --json /tmp/rooms.json
    python bench/syncplay_rooms.py --quick               # 4 rooms x 5 members (smoke test)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.helpers import API_KEY, SECRET, HubProcess, free_port, make_settings  # noqa: E402

from bench.common import (  # noqa: E402
    emit_results,
    loadavg,
    percentile,
    proc_rss,
    raise_nofile,
    run_loop,
    sched_wait,
    self_cpu,
)
from bench.common import proc_cpu as proc_user_system  # noqa: E402
from revenge_ws.auth import mint_token  # noqa: E402
from revenge_ws.client import Client  # noqa: E402
from revenge_ws.client.syncplay import Timeline  # noqa: E402

CONTENT = {"type": "movie", "id": "bench-rooms"}


def split_cores() -> tuple[set[int] | None, set[int] | None]:
    """(hub core, worker cores): the first allowed core for the hub, the rest for the
    load generators — so the clients never take the hub's CPU (others' processes still may)."""
    avail = sorted(os.sched_getaffinity(0))
    if len(avail) < 2:
        return None, None
    return {avail[0]}, set(avail[1:])


def pin_process(pid: int, cores: set[int]) -> None:
    """Pin every thread of a process (threads started later inherit the main thread's)."""
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(task), cores)


def user_of(room: int, member: int) -> str:
    return f"r{room:03d}m{member:02d}"


def worker_of(room: int, member: int, workers: int) -> int:
    return (room + member) % workers


# =========================================================================== the hub
def hub_main() -> int:
    """``--hub``: ``revenge-ws serve``, plus a ``gc.callbacks`` hook that logs every full
    (generation 2) collection and every collection of 5 ms or more to stderr, so stalls of
    the hub's event loop can be told apart from CPU starvation."""
    import gc

    started = [0.0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        ms = (time.perf_counter() - started[0]) * 1000.0
        if info["generation"] == 2 or ms >= 5.0:
            tracked = len(gc.get_objects(2)) if info["generation"] == 2 else -1
            sys.stderr.write(
                f"GCPAUSE {time.time():.3f} gen={info['generation']} ms={ms:.1f} "
                f"collected={info['collected']} gen2_objects={tracked}\n"
            )

    threshold = os.environ.get("BENCH_GC_THRESHOLD")
    if threshold:
        gc.set_threshold(*(int(x) for x in threshold.split(",")))
    gc.callbacks.append(on_gc)

    # The notifications feature's on_connect hook (redeliver unacknowledged notifications)
    # runs before the hub reads the connection's first frame: time it (diagnosis only).
    from revenge_ws.features import notifications

    original = notifications.Notifications.redeliver
    skip = os.environ.get("BENCH_SKIP_REDELIVER") == "1"

    async def timed_redeliver(self: Any, conn: Any) -> None:
        t = time.perf_counter()
        if not skip:
            await original(self, conn)
        sys.stderr.write(
            f"HOOK {time.time():.3f} redeliver ms={(time.perf_counter() - t) * 1e3:.1f}\n"
        )

    notifications.Notifications.redeliver = timed_redeliver  # type: ignore[method-assign]
    from revenge_ws.cli import main as serve_main

    return serve_main(["serve"])


def start_hub(
    env: dict[str, str],
    timeout: float = 30.0,
    *,
    skip_redeliver: bool = False,
    gc_threshold: str = "",
) -> HubProcess:
    """The hub (``--hub``) on a free port; waits until it accepts connections."""
    port = free_port()
    full = {k: v for k, v in os.environ.items() if not k.startswith("REVENGE_")}
    full.pop("COVERAGE_PROCESS_START", None)
    full["PYTHONPATH"] = os.pathsep.join([str(ROOT), full.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    full.update(
        {
            "REVENGE_JWT_SECRET": SECRET,
            "REVENGE_API_KEYS": API_KEY,
            "REVENGE_SERVER_PORT": str(port),
            "REVENGE_STORE_URL": "sqlite:///:memory:",
        }
    )
    full.update(env)
    if skip_redeliver:
        full["BENCH_SKIP_REDELIVER"] = "1"
    if gc_threshold:
        full["BENCH_GC_THRESHOLD"] = gc_threshold
    fd, log_name = tempfile.mkstemp(prefix="bench-rooms-hub-", suffix=".log")
    try:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--hub"], env=full, stdout=fd, stderr=subprocess.STDOUT
        )
    finally:
        os.close(fd)
    return HubProcess(proc, port, full, Path(log_name)).wait_ready(timeout, log_tail=2000)


def hook_times(hub: HubProcess) -> dict[str, Any]:
    """Durations of the hub's on-connect notification redelivery hook (logged by ``--hub``)."""
    ms = []
    with contextlib.suppress(OSError):
        for line in hub.log().splitlines():
            if line.startswith("HOOK "):
                ms.append(float(line.rsplit("=", 1)[1]))
    ms.sort()
    return {
        "n": len(ms),
        "p50": percentile(ms, 50),
        "p99": percentile(ms, 99),
        "max": ms[-1] if ms else None,
    }


def gc_pauses(hub: HubProcess, t0: float, t1: float) -> dict[str, Any]:
    """The hub's logged collections between wall-clock ``t0`` and ``t1`` (s)."""
    full: list[float] = []
    slow: list[float] = []
    objects = 0
    with contextlib.suppress(OSError):
        for line in hub.log().splitlines():
            if not line.startswith("GCPAUSE "):
                continue
            parts = line.split()
            at = float(parts[1])
            if not t0 <= at <= t1:
                continue
            gen = int(parts[2].split("=")[1])
            ms = float(parts[3].split("=")[1])
            (full if gen == 2 else slow).append(ms)
            if gen == 2 and len(parts) > 5:
                objects = max(objects, int(parts[5].split("=")[1]))
    both = full + slow
    return {
        "full_collections": len(full),
        "full_ms_max": round(max(full), 1) if full else 0.0,
        "over_5ms": len([x for x in both if x >= 5.0]),
        "max_ms": round(max(both), 1) if both else 0.0,
        "total_ms": round(sum(both), 1),
        "gen2_objects": objects,
    }


# =========================================================================== worker process
class Worker:
    """The members of every room that live in this process."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.index = int(spec["index"])
        self.workers = int(spec["workers"])
        self.url = str(spec["url"])
        #: (room, member) -> client
        self.clients: dict[tuple[int, int], Client] = {}
        self.room_ids: dict[int, str] = {}
        self.room_of_id: dict[str, int] = {}
        #: (room_id, command_seq) -> [count, first receipt, last receipt] (ms)
        self.receipts: dict[tuple[str, int], list[float]] = {}
        #: room index -> the latest Timeline (for the reports' positions) and its seq
        self.timelines: dict[int, tuple[int, Timeline]] = {}
        self.sends: list[list[Any]] = []
        self.errors: list[str] = []
        self.request_errors = 0
        self.reports_sent = 0
        self.session: Any = None
        #: room -> requests sent so far (the cycle continues across phases) and seek position
        self.issued: dict[int, int] = {}
        self.reporters: set[asyncio.Task[None]] = set()
        self.report_ms: list[float] = []
        self.positions: dict[int, float] = {}

    def emit(self, event: str, **data: Any) -> None:
        sys.stdout.write(json.dumps({"event": event, **data}) + "\n")
        sys.stdout.flush()

    # -- receipt
    def _handler(self, room: int) -> Any:
        def on_command(msg: dict[str, Any]) -> None:
            t = time.time() * 1000.0
            cmd = msg.get("data") or {}
            seq = cmd.get("command_seq")
            rid = cmd.get("room_id")
            if not isinstance(seq, int) or not isinstance(rid, str):
                return
            when = cmd.get("when")
            late = t - float(when) if isinstance(when, int | float) else float("-inf")
            rec = self.receipts.get((rid, seq))
            if rec is None:
                self.receipts[(rid, seq)] = [1, t, t, late]
            else:
                rec[0] += 1
                rec[1] = min(rec[1], t)
                rec[2] = max(rec[2], t)
                rec[3] = max(rec[3], late)
            known = self.timelines.get(room)
            if known is None or known[0] < seq:
                kind = cmd.get("command")
                playing = kind == "play" or (
                    kind in ("seek", "rate") and known is not None and known[1].playing
                )
                tl = Timeline(
                    float(cmd["position"]), float(cmd["when"]), float(cmd["rate"]), playing
                )
                self.timelines[room] = (seq, tl)

        return on_command

    # -- phases
    async def connect(
        self, members: list[list[int]], rate: float, concurrency: int, until_served: bool
    ) -> None:
        """Open the connections, at most ``rate``/s and ``concurrency`` at a time; with
        ``until_served`` a connection counts until the hub answered its first ping (closed
        loop: the hub serves a new connection only after its on-connect hooks ran)."""
        import aiohttp

        settings = make_settings()
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, connect=30),
        )
        sem = asyncio.Semaphore(concurrency)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        failed = 0

        async def one(k: int, room: int, member: int) -> None:
            nonlocal failed
            await asyncio.sleep(max(0.0, t0 + k / rate - loop.time()))
            async with sem:
                user = user_of(room, member)
                c = Client(
                    self.url,
                    token=mint_token(settings.jwt, user, name=user, ttl=7200),
                    session=self.session,
                    queue_size=0,
                    reconnect=False,
                    request_timeout=30.0,
                    connect_timeout=30.0,
                )
                c.on("syncplay.command", self._handler(room))
                self.clients[(room, member)] = c
                await c.start()
                try:
                    await c.wait_connected(timeout=60)
                except Exception as exc:
                    failed += 1
                    if len(self.errors) < 20:
                        self.errors.append(f"connect {user}: {type(exc).__name__}: {exc}")
                    return
                for _ in range(1200):  # bounded: 120 s
                    if not until_served or c.clock.samples or not c.connected:
                        break
                    await asyncio.sleep(0.1)

        await asyncio.gather(*(one(k, r, m) for k, (r, m) in enumerate(members)))
        # How long after its welcome did the hub first read (and answer) each connection's
        # first ping? (t1 of the first pong minus the welcome's server_time, both hub clock.)
        for _ in range(240):  # bounded: 120 s
            if all(c.clock.samples for c in self.clients.values() if c.connected):
                break
            await asyncio.sleep(0.5)
        served = []
        unanswered = 0
        for c in self.clients.values():
            samples = c.clock.samples
            st = (c.welcome or {}).get("server_time")
            if samples and isinstance(st, int | float):
                served.append(round(samples[0].t1 - st, 1))
            else:
                unanswered += 1
        self.emit(
            "connected",
            n=len(self.clients) - failed,
            failed=failed,
            errors=self.errors[:10],
            first_ping_served_ms=served,
            unanswered=unanswered,
        )

    async def create(self, rooms: list[int], max_participants: int) -> None:
        async def one(room: int) -> None:
            c = self.clients[(room, 0)]
            data = {
                "name": f"bench room {room}",
                "content": CONTENT,
                "max_participants": max_participants,
            }
            ack = await c.request("syncplay.create", data, timeout=30)
            self.room_ids[room] = ack["room"]["room_id"]

        await asyncio.gather(*(one(r) for r in rooms))
        self.emit("created", rooms={str(r): rid for r, rid in self.room_ids.items()})

    async def join(self, room_ids: dict[int, str], concurrency: int, report: float) -> None:
        self.room_ids = dict(room_ids)
        self.room_of_id = {rid: r for r, rid in room_ids.items()}
        sem = asyncio.Semaphore(concurrency)
        failed = 0

        async def one(room: int, member: int, c: Client) -> None:
            nonlocal failed
            rid = room_ids[room]
            async with sem:
                try:
                    if member != 0:
                        await c.request("syncplay.join", {"room_id": rid}, timeout=60)
                    await c.request("syncplay.ready", {"room_id": rid, "position": 0.0}, timeout=60)
                except Exception as exc:
                    failed += 1
                    if len(self.errors) < 20:
                        self.errors.append(
                            f"join {room}/{member} at {time.strftime('%H:%M:%S')}: "
                            f"{type(exc).__name__}: {exc}"
                        )
                    return
            if report > 0:
                # Like a real player: report from the moment it is in the room.
                task = asyncio.create_task(self._reporter(room, c, report))
                self.reporters.add(task)
                task.add_done_callback(self.reporters.discard)

        await asyncio.gather(*(one(r, m, c) for (r, m), c in self.clients.items()))
        self.emit("joined", n=len(self.clients) - failed, failed=failed, errors=self.errors[:10])

    async def _reporter(self, room: int, c: Client, interval: float) -> None:
        """``syncplay.report`` every ``interval`` s until the worker closes (bounded by the
        worker's lifetime: it exits after ``--max-lifetime``)."""
        rid = self.room_ids[room]
        await asyncio.sleep(random.uniform(0, interval))
        for _ in range(1_000_000):
            known = self.timelines.get(room)
            now = time.time() * 1000.0
            data: dict[str, Any] = {"room_id": rid, "is_playing": False, "position": 0.0}
            if known is not None:
                seq, tl = known
                data.update(
                    position=round(tl.at(now), 3), is_playing=tl.running(now), command_seq=seq
                )
            data["rtt_ms"] = c.rtt
            sent = time.monotonic()
            try:
                await c.request("syncplay.report", data, timeout=30)
                self.reports_sent += 1
                if len(self.report_ms) < 200_000:
                    self.report_ms.append(round((time.monotonic() - sent) * 1000.0, 2))
            except Exception:
                self.request_errors += 1
            await asyncio.sleep(interval)

    async def _issuer(self, room: int, period: float, end: float) -> None:
        """Control requests for one room from this worker's members of it, in turn."""
        loop = asyncio.get_running_loop()
        rid = self.room_ids[room]
        mine = sorted(m for (r, m) in self.clients if r == room)
        cycle = ("seek", "pause", "play")
        # The first request starts the room (play from idle); rooms are spread over a period.
        due = loop.time() + random.uniform(0, period)
        for _ in range(100_000):
            await asyncio.sleep(max(0.0, due - loop.time()))
            if loop.time() >= end:
                return
            k = self.issued.get(room, 0)
            self.issued[room] = k + 1
            kind = "play" if k == 0 else cycle[(k - 1) % 3]
            data: dict[str, Any] = {"room_id": rid}
            if kind == "seek":
                position = self.positions.get(room, 30.0) + 91.5
                self.positions[room] = position
                data["position"] = position
            c = self.clients[(room, mine[k % len(mine)])]
            sent = time.time() * 1000.0
            try:
                ack = await c.request(f"syncplay.{kind}", data, timeout=30)
            except Exception as exc:
                self.request_errors += 1
                if len(self.errors) < 20:
                    self.errors.append(f"{kind} in room {room}: {type(exc).__name__}: {exc}")
            else:
                acked = time.time() * 1000.0
                state = ack.get("state") or {}
                if ack.get("applied") and isinstance(state.get("command_seq"), int):
                    self.sends.append([rid, state["command_seq"], kind, sent, acked])
            due += period

    async def measure(
        self, issue_rooms: list[int], start_at: float, duration: float, period: float
    ) -> None:
        loop = asyncio.get_running_loop()
        self.sends, self.receipts = [], {}
        await asyncio.sleep(max(0.0, start_at - time.time()))
        self.reports_sent = self.request_errors = 0
        self.report_ms = []
        cpu0, wait0, t0 = self_cpu(), sched_wait("self"), loop.time()
        end = t0 + duration
        tasks = (
            [asyncio.create_task(self._issuer(r, period, end)) for r in issue_rooms]
            if period > 0
            else []
        )
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), duration + 60)
            await asyncio.sleep(max(0.0, end - loop.time()))  # the whole window, idle too
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(min(2.0, period * 2) if period > 0 else 0.5)  # let the last arrive
        cpu = self_cpu() - cpu0
        wait = sched_wait("self") - wait0
        wall = loop.time() - t0
        dropped = sum(1 for c in self.clients.values() if not c.connected)
        self.emit(
            "measured",
            sends=self.sends,
            receipts=[[rid, seq, *rec] for (rid, seq), rec in self.receipts.items()],
            cpu_s=round(cpu, 3),
            wait_s=round(wait, 3),
            wall_s=round(wall, 3),
            reports=self.reports_sent,
            report_ms=self.report_ms,
            request_errors=self.request_errors,
            disconnected=dropped,
            errors=self.errors[:20],
        )

    async def drain(self, quiet: float, timeout: float) -> None:
        """Wait until no publication arrived for ``quiet`` s (the setup's member/state
        storm has been delivered), at most ``timeout`` s."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        last = -1
        still_since = loop.time()
        while loop.time() - start < timeout:
            now_delivered = sum(c.stats.delivered for c in self.clients.values())
            if now_delivered != last:
                last, still_since = now_delivered, loop.time()
            elif loop.time() - still_since >= quiet:
                break
            await asyncio.sleep(0.25)
        self.emit("drained", seconds=round(loop.time() - start, 1), delivered=last)

    async def close(self) -> None:
        for task in list(self.reporters):
            task.cancel()
        await asyncio.gather(*self.reporters, return_exceptions=True)
        sem = asyncio.Semaphore(500)

        async def one(c: Client) -> None:
            async with sem:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(c.close(), 10)

        await asyncio.gather(*(one(c) for c in self.clients.values()))
        if self.session is not None:
            await self.session.close()
        self.emit("closed")


async def worker_main(max_lifetime: float) -> None:
    """``--worker``: obey JSON lines on stdin, answer JSON lines on stdout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_lifetime
    w: Worker | None = None
    try:
        for _ in range(100):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                line = await asyncio.wait_for(
                    loop.run_in_executor(None, sys.stdin.readline), remaining
                )
            except TimeoutError:
                return
            if not line:
                return
            msg = json.loads(line)
            op = msg["op"]
            if op == "connect":
                w = Worker(msg)
                await w.connect(
                    msg["members"], msg["rate"], msg["concurrency"], msg["until_served"]
                )
            elif op == "create":
                assert w is not None
                await w.create(msg["rooms"], msg["max_participants"])
            elif op == "join":
                assert w is not None
                await w.join(
                    {int(k): v for k, v in msg["room_ids"].items()},
                    msg["concurrency"],
                    msg["report"],
                )
            elif op == "measure":
                assert w is not None
                await w.measure(
                    msg["issue_rooms"],
                    msg["start_at"],
                    msg["duration"],
                    msg["period"],
                )
            elif op == "drain":
                assert w is not None
                await w.drain(msg["quiet"], msg["timeout"])
            elif op == "stop":
                return
    finally:
        if w is not None:
            await w.close()


# =========================================================================== coordinator
class WorkerProc:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        fd, name = tempfile.mkstemp(prefix=f"bench-rooms-w{index}-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)

    async def start(self, max_lifetime: float, extra: list[str]) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        )
        err = os.open(self.log_path, os.O_WRONLY | os.O_TRUNC)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--worker",
                "--max-lifetime",
                str(max_lifetime),
                *extra,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                env=env,
                limit=256 * 1024 * 1024,
            )
        finally:
            os.close(err)

    async def send(self, op: str, **data: Any) -> None:
        assert self.proc is not None
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"op": op, **data}) + "\n").encode())
        await self.proc.stdin.drain()

    async def expect(self, event: str, timeout: float) -> dict[str, Any]:
        assert self.proc is not None
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"worker {self.index} exited: {self.tail()}")
        msg: dict[str, Any] = json.loads(line)
        if msg.get("event") != event:
            raise RuntimeError(f"worker {self.index}: expected {event}, got {msg.get('event')}")
        return msg

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-2000:]
        return ""

    async def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(Exception):
                await self.send("stop")
                if proc.stdin is not None:
                    proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await asyncio.wait_for(proc.wait(), 5)
        with contextlib.suppress(OSError):
            self.log_path.unlink()


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    def log(text: str) -> None:
        if not args.silent:
            print(text, flush=True)

    nofile = raise_nofile(args.rooms * args.members + 1000)
    results: dict[str, Any] = {
        "meta": {
            "rooms": args.rooms,
            "members": args.members,
            "connections": args.rooms * args.members,
            "workers": args.workers,
            "connect_rate": args.connect_rate,
            "unserved": args.unserved,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "phases": args.phases,
            "report_interval_s": args.report_interval,
            "nofile": nofile,
            "nproc": os.cpu_count(),
            "python": sys.version.split()[0],
            "loadavg_start": loadavg(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        },
        "errors": [],
    }
    total = args.rooms * args.members
    hub_env = {
        "REVENGE_NODE_ID": "bench-rooms",
        "REVENGE_LOGGING_LEVEL": args.hub_log_level,
        "REVENGE_LOGGING_ACCESS_LOG": "false",
        "REVENGE_SERVER_MAX_CONNECTIONS": str(total + 1000),
        "REVENGE_SERVER_ACCEPT_RATE": str(max(1000.0, args.connect_rate * 2)),
        "REVENGE_SERVER_ACCEPT_BURST": str(max(2000, total)),
        "REVENGE_SYNCPLAY_MAX_ROOMS": str(max(10000, args.rooms)),
    }
    hub = start_hub(
        hub_env,
        timeout=30,
        skip_redeliver=args.diag_skip_redeliver,
        gc_threshold=args.diag_gc_threshold,
    )
    results["meta"]["diag_skip_redeliver"] = args.diag_skip_redeliver
    results["meta"]["diag_gc_threshold"] = args.diag_gc_threshold or "default"
    hub_cores, worker_cores = split_cores() if args.pin else (None, None)
    if hub_cores:
        pin_process(hub.proc.pid, hub_cores)
    extra = ["--nice", str(args.worker_nice)]
    if worker_cores:
        extra += ["--cores", ",".join(map(str, sorted(worker_cores)))]
    results["meta"]["hub_cores"] = sorted(hub_cores) if hub_cores else "any"
    results["meta"]["worker_cores"] = sorted(worker_cores) if worker_cores else "any"
    results["meta"]["worker_nice"] = args.worker_nice
    workers = [WorkerProc(i) for i in range(args.workers)]
    lifetime = 600 + args.duration * 2
    try:
        for w in workers:
            await w.start(lifetime, extra)
        # -- connect
        t = time.monotonic()
        for w in workers:
            members = [
                [r, m]
                for r in range(args.rooms)
                for m in range(args.members)
                if worker_of(r, m, args.workers) == w.index
            ]
            members.sort(key=lambda rm: (rm[1] != 0, rm[0], rm[1]))  # leaders first
            await w.send(
                "connect",
                index=w.index,
                workers=args.workers,
                url=hub.ws_url,
                members=members,
                rate=args.connect_rate / args.workers,
                concurrency=max(1, args.unserved // args.workers) if args.unserved else 200,
                until_served=args.unserved > 0,
            )
        timeout = 120 + total / max(1.0, args.connect_rate) * 3
        got = await asyncio.gather(*(w.expect("connected", timeout) for w in workers))
        connected = sum(g["n"] for g in got)
        failed = sum(g["failed"] for g in got)
        results["setup"] = {"connected": connected, "connect_failed": failed}
        served = sorted(x for g in got for x in g["first_ping_served_ms"])
        results["setup"]["first_ping_read_after_welcome_ms"] = {
            "p50": percentile(served, 50),
            "p99": percentile(served, 99),
            "max": served[-1] if served else None,
            "never_within_120s": sum(g["unanswered"] for g in got),
        }
        results["setup"]["redeliver_hook_ms"] = hook_times(hub)
        log(
            "first ping read by the hub after the welcome (ms): "
            f"{results['setup']['first_ping_read_after_welcome_ms']}; on-connect "
            f"notification redelivery (ms): {results['setup']['redeliver_hook_ms']}"
        )
        results["setup"]["connect_s"] = round(time.monotonic() - t, 1)
        log(f"connected {connected}/{total} in {time.monotonic() - t:.1f}s (failed {failed})")
        if failed:
            errs = [e for g in got for e in g.get("errors", [])][:10]
            raise RuntimeError(f"{failed} connections failed: {errs}")
        # -- create
        t = time.monotonic()
        for w in workers:
            leaders = [r for r in range(args.rooms) if worker_of(r, 0, args.workers) == w.index]
            await w.send("create", rooms=leaders, max_participants=args.members)
        room_ids: dict[str, str] = {}
        for g in await asyncio.gather(*(w.expect("created", 60) for w in workers)):
            room_ids.update(g["rooms"])
        # -- join + ready
        for w in workers:
            await w.send("join", room_ids=room_ids, concurrency=100, report=args.report_interval)
        timeout = 120 + total / 50
        got = await asyncio.gather(*(w.expect("joined", timeout) for w in workers))
        joined = sum(g["n"] for g in got)
        results["setup"]["joined"] = joined
        results["setup"]["join_s"] = round(time.monotonic() - t, 1)
        log(f"{len(room_ids)} rooms, {joined} members joined+ready in {time.monotonic() - t:.1f}s")
        if joined != total:
            errs = [e for g in got for e in g.get("errors", [])][:10]
            raise RuntimeError(f"only {joined}/{total} members joined: {errs}")
        results["setup"]["drain_s"] = await drain(workers, args.settle, log)
        # -- measure, phase by phase (same rooms and connections)
        results["phases"] = []
        for period in args.phases:
            phase = await measure_phase(args, hub, workers, period, log)
            results["phases"].append(phase)
            results["errors"].extend(phase.pop("worker_errors"))
            if len(results["phases"]) < len(args.phases):
                phase["drain_after_s"] = await drain(workers, args.settle, log)
    finally:
        await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)
        code = hub.stop(signal.SIGTERM, timeout=30)
        if code not in (0, -15):
            results["errors"].append(f"hub exited with {code}: {hub.log()[-1000:]}")
        if args.hub_log:
            with contextlib.suppress(OSError):
                shutil.copyfile(hub.log_path, args.hub_log)
        with contextlib.suppress(OSError):
            hub.log_path.unlink()
    results["meta"]["loadavg_end"] = loadavg()
    return results


async def drain(workers: list[WorkerProc], quiet: float, log: Any) -> float:
    """Wait until no worker received a publication for ``quiet`` s (bounded)."""
    t = time.monotonic()
    for w in workers:
        await w.send("drain", quiet=quiet, timeout=300)
    await asyncio.gather(*(w.expect("drained", 330) for w in workers))
    took = round(time.monotonic() - t, 1)
    log(f"  drained in {took}s")
    return took


async def measure_phase(
    args: argparse.Namespace,
    hub: HubProcess,
    workers: list[WorkerProc],
    period: float,
    log: Any,
) -> dict[str, Any]:
    report = args.report_interval
    pid = hub.proc.pid
    start_at = time.time() + 1.0
    for w in workers:
        issue = [r for r in range(args.rooms) if r % args.workers == w.index]
        await w.send(
            "measure",
            issue_rooms=issue,
            start_at=start_at,
            duration=args.duration,
            period=period,
        )
    await asyncio.sleep(max(0.0, start_at - time.time()))
    load0 = loadavg()
    cpu0, wait0, wall0 = sum(proc_user_system(pid)), sched_wait(pid), time.monotonic()
    t_start = time.time()
    rss0 = proc_rss(pid)
    log(
        f"measuring {args.duration:g}s: a request per room every {period:g}s (0: none), "
        f"reports every {report:g}s (load {load0})"
    )
    samples_load = [load0[0]]
    profiler = None
    if args.profile:
        profiler = await asyncio.create_subprocess_exec(
            args.py_spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(args.duration)),
            "--rate",
            "50",
            "--format",
            "raw",
            "--output",
            str(args.profile) + f".{period:g}.txt",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )

    async def sample_load() -> None:
        for _ in range(10_000):
            await asyncio.sleep(5)
            samples_load.append(loadavg()[0])

    sampler = asyncio.create_task(sample_load())
    try:
        await asyncio.sleep(args.duration)
        cpu1, wait1, wall1 = sum(proc_user_system(pid)), sched_wait(pid), time.monotonic()
        t_end = time.time()
        rss1 = proc_rss(pid)
        got = await asyncio.gather(*(w.expect("measured", args.duration + 120) for w in workers))
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        if profiler is not None:
            try:
                await asyncio.wait_for(profiler.wait(), 30)
            except TimeoutError:
                profiler.kill()
                await profiler.wait()
    wall = wall1 - wall0
    phase: dict[str, Any] = {
        "period_s": period,
        "report_interval_s": report,
        "hub": {
            "cpu_percent": round(100 * (cpu1 - cpu0) / wall, 1),
            "cpu_wait_percent": round(100 * (wait1 - wait0) / wall, 1),
            "rss_mib_start": round(rss0 / 2**20, 1),
            "rss_mib_end": round(rss1 / 2**20, 1),
            "gc": gc_pauses(hub, t_start, t_end),
        },
        "workers": [
            {
                "cpu_percent": round(100 * g["cpu_s"] / max(1e-9, g["wall_s"]), 1),
                "cpu_wait_percent": round(100 * g["wait_s"] / max(1e-9, g["wall_s"]), 1),
                "reports": g["reports"],
                "reports_per_s": round(g["reports"] / max(1e-9, g["wall_s"]), 1),
                "request_errors": g["request_errors"],
                "disconnected": g["disconnected"],
            }
            for g in got
        ],
        "worker_errors": [e for g in got for e in g["errors"]],
        "loadavg": {"start": load0, "end": loadavg(), "max_1min": max(samples_load)},
        "latency": merge(got, args.members, args.warmup, args.duration),
    }
    rep_ms = sorted(x for g in got for x in g["report_ms"])
    phase["report_ack"] = {
        "n": len(rep_ms),
        "p50_ms": round(percentile(rep_ms, 50), 2),
        "p99_ms": round(percentile(rep_ms, 99), 2),
        "max_ms": round(rep_ms[-1], 2) if rep_ms else 0.0,
    }
    lat = phase["latency"]
    log(
        f"  commands {lat['commands']} ({lat['incomplete']} incomplete, play/seek after when: "
        f"{lat['after_when']}/{lat['scheduled']}): request -> last member "
        f"p50 {lat['last_p50_ms']} p99 {lat['last_p99_ms']} max {lat['last_max_ms']} ms; "
        f"hub CPU {phase['hub']['cpu_percent']}% (waiting for a CPU "
        f"{phase['hub']['cpu_wait_percent']}%); report ack p50 {phase['report_ack']['p50_ms']} "
        f"p99 {phase['report_ack']['p99_ms']} ms; hub GC: {phase['hub']['gc']}"
    )
    return phase


def merge(
    got: list[dict[str, Any]], members: int, warmup: float, duration: float
) -> dict[str, Any]:
    """Join every worker's sends and receipts on (room_id, command_seq)."""
    receipts: dict[tuple[str, int], list[float]] = {}
    for g in got:
        for rid, seq, count, first, last, late in g["receipts"]:
            acc = receipts.setdefault((rid, seq), [0, float("inf"), 0.0, float("-inf")])
            acc[0] += count
            acc[1] = min(acc[1], first)
            acc[2] = max(acc[2], last)
            acc[3] = max(acc[3], late)
    sends = [s for g in got for s in g["sends"]]
    t_first = min((s[3] for s in sends), default=0.0)
    last_ms: list[float] = []
    first_ms: list[float] = []
    ack_ms: list[float] = []
    by_kind: dict[str, list[float]] = {}
    #: [s since the first request, command, -> last ms, -> first ms, -> ack ms,
    #:  latest receipt - when ms]
    samples: list[list[Any]] = []
    scheduled = after_when = 0
    incomplete = 0
    counted = 0
    for rid, seq, kind, sent, acked in sends:
        if sent - t_first < warmup * 1000.0:
            continue
        counted += 1
        rec = receipts.get((rid, seq))
        if rec is None or rec[0] < members:
            incomplete += 1
            continue
        last_ms.append(rec[2] - sent)
        first_ms.append(rec[1] - sent)
        ack_ms.append(acked - sent)
        by_kind.setdefault(kind, []).append(rec[2] - sent)
        if kind != "pause":  # a pause takes effect at when = now by design
            scheduled += 1
            if rec[3] > 0:
                after_when += 1
        samples.append(
            [
                round((sent - t_first) / 1000.0, 3),
                kind,
                round(rec[2] - sent, 2),
                round(rec[1] - sent, 2),
                round(acked - sent, 2),
                round(rec[3], 2),
            ]
        )
    for v in (last_ms, first_ms, ack_ms, *by_kind.values()):
        v.sort()

    def r(x: float) -> float:
        return round(x, 2)

    return {
        "commands": counted,
        "incomplete": incomplete,
        "commands_per_s": r(counted / max(1e-9, duration - warmup)),
        "deliveries": len(last_ms) * members,
        "last_p50_ms": r(percentile(last_ms, 50)),
        "last_p99_ms": r(percentile(last_ms, 99)),
        "last_max_ms": r(last_ms[-1]) if last_ms else 0.0,
        "first_p50_ms": r(percentile(first_ms, 50)),
        "first_p99_ms": r(percentile(first_ms, 99)),
        "ack_p50_ms": r(percentile(ack_ms, 50)),
        "ack_p99_ms": r(percentile(ack_ms, 99)),
        "by_command": {
            k: {
                "n": len(v),
                "p50_ms": r(percentile(v, 50)),
                "p99_ms": r(percentile(v, 99)),
                "max_ms": r(v[-1]),
            }
            for k, v in sorted(by_kind.items())
        },
        "samples": sorted(samples),
        #: play/seek commands that reached at least one member after their `when`
        "scheduled": scheduled,
        "after_when": after_when,
    }


def render(res: dict[str, Any]) -> str:
    meta = res["meta"]
    setup = res.get("setup", {})
    lines = [
        f"{meta['rooms']} rooms x {meta['members']} members = {meta['connections']:,} "
        f"connections in {meta['workers']} worker processes (connected in "
        f"{setup.get('connect_s')} s, joined + ready in {setup.get('join_s')} s); "
        f"{meta['duration_s']:g} s per phase, first {meta['warmup_s']:g} s ignored.",
        "",
        "| request every (per room) | reports/s | commands | cmd/s | request → last "
        "member p50 | p99 | max | → first member p50 | ack p50 | report ack p50 / p99 | hub CPU "
        "| hub waiting for a CPU | hub GC: full / longest | hub RSS | workers CPU / waiting (each) "
        "| load avg 1-min start → end | play/seek reaching a member after `when` | incomplete |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for ph in res.get("phases", []):
        lat, hub = ph["latency"], ph["hub"]
        w_cpu = ", ".join(
            f"{w['cpu_percent']:.0f} / {w['cpu_wait_percent']:.0f}" for w in ph["workers"]
        )
        ra = ph["report_ack"]
        rep = f"{sum(w['reports_per_s'] for w in ph['workers']):.0f}"
        per = f"{ph['period_s']:g} s" if ph["period_s"] > 0 else "none (idle)"
        lines.append(
            f"| {per} | {rep} | {lat['commands']} | {lat['commands_per_s']} | "
            f"{lat['last_p50_ms']} ms | {lat['last_p99_ms']} ms | {lat['last_max_ms']} ms | "
            f"{lat['first_p50_ms']} ms | {lat['ack_p50_ms']} ms | {ra['p50_ms']} / "
            f"{ra['p99_ms']} ms | {hub['cpu_percent']} % | "
            f"{hub['cpu_wait_percent']} % | {hub['gc']['full_collections']} / "
            f"{hub['gc']['max_ms']} ms | {hub['rss_mib_end']} MiB | {w_cpu} % | "
            f"{ph['loadavg']['start'][0]} → {ph['loadavg']['end'][0]} | "
            f"{lat['after_when']} / {lat['scheduled']} | {lat['incomplete']} |"
        )
    lines += [
        "",
        "| request every (per room) | command | n | request → last member p50 | p99 | max |",
        "|---|---|---|---|---|---|",
    ]
    for ph in res.get("phases", []):
        name = f"{ph['period_s']:g} s"
        for k, v in ph["latency"]["by_command"].items():
            lines.append(
                f"| {name} | {k} | {v['n']} | {v['p50_ms']} ms | {v['p99_ms']} ms | "
                f"{v['max_ms']} ms |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 rooms x 5 members, 2 workers, 2 s")
    ap.add_argument("--rooms", type=int, default=100)
    ap.add_argument("--members", type=int, default=50)
    ap.add_argument("--workers", type=int, default=4, help="client processes (2-4)")
    ap.add_argument("--duration", type=float, default=30.0, help="measurement window (s)")
    ap.add_argument("--warmup", type=float, default=3.0, help="commands sent earlier are ignored")
    ap.add_argument(
        "--phases",
        default="0,5,2",
        help="measurement phases: s between control requests in one room, comma-separated "
        "(0: none, the idle baseline)",
    )
    ap.add_argument(
        "--report-interval",
        type=float,
        default=5.0,
        help="s between a member's syncplay.report, from its join on (0: none — members are "
        "then marked disconnected after 30 s and removed after 120 s, by design)",
    )
    ap.add_argument("--profile", type=Path, help="py-spy record the hub: PREFIX.<phase>.txt")
    ap.add_argument("--hub-log", type=Path, help="keep the hub's log (and GC pauses) here")
    ap.add_argument(
        "--hub-log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR")
    )
    ap.add_argument("--connect-rate", type=float, default=500.0, help="connections/s, total")
    ap.add_argument(
        "--unserved",
        type=int,
        default=100,
        help="at most this many new connections (all workers) whose first ping the hub has "
        "not answered yet; 0 = open loop at --connect-rate (a burst: see the notes on the "
        "on-connect hook)",
    )
    ap.add_argument(
        "--settle",
        type=float,
        default=2.0,
        help="before each phase, wait until no publication arrived for this long (s)",
    )
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    ap.add_argument("--silent", action="store_true")
    ap.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="hub on the first core, workers on the others (with >= 2 cores)",
    )
    ap.add_argument("--worker-nice", type=int, default=0, help="niceness of the workers")
    ap.add_argument(
        "--diag-skip-redeliver",
        action="store_true",
        help="diagnosis: the hub skips the notifications' on-connect redelivery (A/B test)",
    )
    ap.add_argument(
        "--diag-gc-threshold",
        default="",
        help="diagnosis: gc.set_threshold(...) in the hub, e.g. 50000,20,10 (A/B test)",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--hub", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cores", default="", help=argparse.SUPPRESS)
    ap.add_argument("--nice", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--max-lifetime", type=float, default=900.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.rooms, args.members, args.workers = 4, 5, 2
        args.duration, args.warmup, args.settle = 2.0, 0.0, 0.3
        args.phases, args.report_interval = "0.5", 1.0
    if not 1 <= args.rooms <= 1000 or not 2 <= args.members <= 1000:
        ap.error("--rooms 1..1000, --members 2..1000")
    if not 1 <= args.workers <= 8:
        ap.error("--workers 1..8")
    if not 0 < args.duration <= 3600 or not 0 <= args.warmup < args.duration:
        ap.error("--duration 0..3600 and --warmup below it")
    try:
        args.phases = [float(p) for p in args.phases.split(",")]
    except ValueError:
        ap.error("--phases is PERIOD[,PERIOD...]")
    if not 1 <= len(args.phases) <= 10 or any(p < 0 for p in args.phases):
        ap.error("1..10 phases, each >= 0 (0: no requests)")
    if args.report_interval < 0:
        ap.error("--report-interval must be >= 0")
    if args.connect_rate <= 0:
        ap.error("--connect-rate must be > 0")
    args.py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if args.profile and not os.path.exists(args.py_spy):
        ap.error("--profile needs py-spy (pip install py-spy)")
    return args


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM: unwind, so every finally stops its processes


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:] == ["--hub"]:
        return hub_main()  # the hub handles SIGTERM itself (graceful shutdown)
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    if args.worker:
        raise_nofile(10_000)
        if args.cores:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, {int(c) for c in args.cores.split(",")})
        if args.nice:
            with contextlib.suppress(OSError):
                os.nice(args.nice)
        run_loop(worker_main(args.max_lifetime))
        return 0
    results = asyncio.run(run_bench(args))
    emit_results(results, render(results), silent=args.silent, json_path=args.json, md_path=args.md)
    phases = results.get("phases") or []
    ok = (
        bool(phases)
        and all(
            (p["latency"]["commands"] or not p["period_s"]) and not p["latency"]["incomplete"]
            for p in phases
        )
        and not results["errors"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
