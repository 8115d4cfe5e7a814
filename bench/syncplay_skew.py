"""SyncPlay start skew: do 20 members behind slow, asymmetric links with skewed clocks start
together?

One hub process on 127.0.0.1. Every member is a real :class:`revenge_ws.client.Client`
connected through its own :class:`tests.faultproxy.FaultProxy` (per-direction delays; all
proxies run in a helper process so their timers do not share the members' event loop).
Each member has a skewed local clock ``local_now() = time.time() * 1000 + skew``:

- the skew is given to the unmodified client as its clock (``Client(clock=...)``, which
  every local timestamp of the client comes from). So every ping's ``t0``/``t3`` — and the
  client's ``ClockSync`` estimate — are in the member's own clock;
- the member's player is driven by :class:`revenge_ws.client.syncplay.SyncController`
  whose server clock is ``local_now() + client.clock_offset``; it starts when that estimate
  reaches the command's ``when``: an asyncio sleep until 2 ms before, then ``sleep(0)``
  spinning to the instant, then ``controller.tick()`` (which calls ``player.play()``).

The hub and every member share the machine's real clock, so the true server-clock offset
of member ``i`` is exactly ``-skew_i``: the NTP error of a member is
``clock_offset + skew``, which theory says is ``(up - down) / 2`` of its link.

Measured per command (``play`` from idle, then rounds of ``seek`` while playing, ``pause``
and ``unpause``): arrival of the command vs ``when`` at every member (true clock; must be
negative), the spread (max - min) of the members' real start instants (``time.time()`` in
``player.play()``), and what explains it: the spread of the NTP errors (the start instants
the estimates imply) and the timer error (real start - implied start).

Goals (issue): every member has the command before ``when``; spread <= 20 ms on symmetric
links; <= 0.5 x (max - min of ``up - down``) + 20 ms on asymmetric ones.

    python bench/syncplay_skew.py              # 20 members, symmetric + asymmetric, 3 rounds
    python bench/syncplay_skew.py --repeat 3 --json /tmp/skew.json
    python bench/syncplay_skew.py --quick      # 4 members, 1 round (the smoke test)
    python bench/syncplay_skew.py --jitter 20  # links with up to 20 ms of queueing noise
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.faultproxy import FaultProxy  # noqa: E402
from tests.helpers import HubProcess, make_settings, start_hub_process  # noqa: E402
from tests.players import SimPlayer  # noqa: E402

from bench.common import emit_results, sched_wait  # noqa: E402
from revenge_ws.auth import mint_token  # noqa: E402
from revenge_ws.client import Client  # noqa: E402
from revenge_ws.client.syncplay import SyncController  # noqa: E402

#: Goal: real start instants within this of each other (plus the NTP floor when asymmetric).
GOAL_MS = 20.0
#: A command whose spread misses the goal while the event loop woke up this late (ms) is
#: counted as machine noise and the scenario is run again (``--retry-noisy``).
NOISY_LAG_MS = 10.0
#: The member timer sleeps until this long before ``when`` (ms), then spins.
SPIN_MS = 2.0
CONTENT = {"type": "movie", "id": "bench-skew"}
HUB_ENV = {
    "REVENGE_NODE_ID": "bench-skew",
    "REVENGE_LOGGING_LEVEL": "WARNING",
    "REVENGE_LOGGING_ACCESS_LOG": "false",
}


# --------------------------------------------------------------------------- clocks
def true_ms() -> float:
    return time.time() * 1000.0


class LagMonitor:
    """Measures how late the event loop wakes up (a 5 ms sleep that returns late means the
    loop was busy or the process was not scheduled); ``take()`` returns the worst lag since
    the previous ``take()``."""

    STEP = 0.005

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(10_000_000):
            t = loop.time()
            await asyncio.sleep(self.STEP)
            self.worst = max(self.worst, (loop.time() - t - self.STEP) * 1000.0)

    def take(self) -> float:
        worst, self.worst = self.worst, 0.0
        return round(worst, 1)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


# --------------------------------------------------------------------------- links
@dataclass(frozen=True)
class Link:
    up: float  # ms, client -> hub
    down: float  # ms, hub -> client

    @property
    def rtt(self) -> float:
        return self.up + self.down

    @property
    def asym(self) -> float:
        """``up - down``: the NTP estimate of the server clock is off by half of it."""
        return self.up - self.down


#: Up-share of the RTT for the asymmetric scenario: half the links symmetric, the others
#: 1:3 .. 4:1 either way (ADSL/cable-like paths, and a few of the reverse).
ASYM_SHARES = (0.5, 0.25, 0.5, 0.75, 0.5, 0.2, 0.5, 0.8, 0.5, 0.35, 0.5, 0.65)


def make_links(n: int, asymmetric: bool, lo: float, hi: float, rng: random.Random) -> list[Link]:
    rtts = [lo + (hi - lo) * i / max(1, n - 1) for i in range(n)]
    rng.shuffle(rtts)
    links = []
    for i, rtt in enumerate(rtts):
        share = ASYM_SHARES[i % len(ASYM_SHARES)] if asymmetric else 0.5
        links.append(Link(round(rtt * share, 1), round(rtt * (1 - share), 1)))
    return links


def ntp_floor(links: list[Link]) -> float:
    """Spread of the NTP errors the links imply: 0.5 x (max - min of up - down)."""
    asym = [link.asym for link in links]
    return 0.5 * (max(asym) - min(asym))


# --------------------------------------------------------------------------- the proxy helper
async def proxy_worker(max_lifetime: float) -> None:
    """``--proxy-worker``: start one FaultProxy per link read from stdin, print the ports,
    stop everything when stdin closes (or after ``max_lifetime`` seconds)."""
    loop = asyncio.get_running_loop()
    spec = json.loads(await loop.run_in_executor(None, sys.stdin.readline))
    proxies: list[FaultProxy] = []
    try:
        jitter = float(spec.get("jitter_ms", 0.0)) / 1000.0
        for i, (up, down) in enumerate(spec["links"]):
            proxy = FaultProxy(
                int(spec["target"]),
                up_delay=up / 1000.0,
                down_delay=down / 1000.0,
                jitter=jitter,
                seed=int(spec.get("seed", 0)) * 1000 + i,
            )
            proxies.append(await proxy.start())
        print(json.dumps({"ports": [p.port for p in proxies]}), flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.read), max_lifetime)
    finally:
        for proxy in proxies:
            await proxy.stop()


class ProxyProcess:
    """The proxies of one scenario, in a child process."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.ports: list[int] = []

    async def start(
        self,
        target: int,
        links: list[Link],
        max_lifetime: float,
        jitter_ms: float = 0.0,
        seed: int = 0,
    ) -> list[int]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        )
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--proxy-worker",
            "--max-lifetime",
            str(max_lifetime),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        spec = {
            "target": target,
            "links": [[lk.up, lk.down] for lk in links],
            "jitter_ms": jitter_ms,
            "seed": seed,
        }
        self.proc.stdin.write((json.dumps(spec) + "\n").encode())
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), 20)
        if not line:
            raise RuntimeError("the proxy helper exited before reporting its ports")
        self.ports = [int(p) for p in json.loads(line)["ports"]]
        return self.ports

    async def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await asyncio.wait_for(proc.wait(), 5)
        self.proc = None


# --------------------------------------------------------------------------- a member


@dataclass
class Arrival:
    true: float  # true ms when the reader handed the command over
    est: float  # the member's estimate of the server clock at that moment
    cmd: dict[str, Any]


@dataclass
class Start:
    true: float  # true ms of player.play()
    est: float  # the member's estimated server time right then
    ntp_err: float  # clock_offset + skew at that moment (ms; the true offset is -skew)
    spins: int
    sleeps: int


@dataclass
class Member:
    idx: int
    user: str
    skew: float
    link: Link
    url: str
    token: str
    client: Client | None = None
    ctx: contextvars.Context | None = None
    player: SimPlayer = field(default_factory=lambda: SimPlayer(true_ms))
    ctl: SyncController | None = None
    arrivals: dict[int, Arrival] = field(default_factory=dict)
    starts: dict[int, Start] = field(default_factory=dict)
    rtt_ms: float | None = None
    errors: list[str] = field(default_factory=list)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    # -- clocks
    def local_now(self) -> float:
        return true_ms() + self.skew

    @property
    def offset(self) -> float:
        assert self.client is not None
        return self.client.clock_offset or 0.0

    def est_server(self) -> float:
        return self.local_now() + self.offset

    # -- the member's tasks (tracked, so close() can cancel them)
    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        assert self.ctx is not None
        task = asyncio.get_running_loop().create_task(coro, context=self.ctx.copy())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def run_in_ctx(self, coro: Any, timeout: float) -> Any:
        return await asyncio.wait_for(self.spawn(coro), timeout)

    # -- lifecycle
    async def connect(self, pings: int) -> None:
        """In the member's context: connect, then ``pings`` extra NTP exchanges."""
        self.client = Client(
            self.url,
            token=self.token,
            queue_size=0,
            reconnect=False,
            request_timeout=10.0,
            clock=self.local_now,
        )
        self.ctl = SyncController(self.player, self.est_server)
        self.client.on("syncplay.command", self._on_command)
        await self.client.start()
        await self.client.wait_connected(timeout=20)
        for _ in range(pings):
            await self.client.ping(timeout=10)
            await asyncio.sleep(0.05)

    def _on_command(self, msg: dict[str, Any]) -> None:
        cmd = msg.get("data") or {}
        seq = cmd.get("command_seq")
        if not isinstance(seq, int):
            return
        self.arrivals[seq] = Arrival(true_ms(), self.est_server(), cmd)
        assert self.ctl is not None
        self.ctl.on_command(cmd)
        tl = self.ctl.timeline
        if tl is not None and tl.playing and cmd.get("command") in ("play", "seek"):
            self.spawn(self._start_at(seq, float(cmd["when"])))
        self.changed.set()

    async def _start_at(self, seq: int, when: float) -> None:
        """Start the player when the estimated server clock reaches ``when``."""
        sleeps = spins = 0
        while sleeps < 100:
            remaining = when - self.est_server()
            if remaining <= SPIN_MS:
                break
            sleeps += 1
            await asyncio.sleep((remaining - SPIN_MS) / 1000.0)
        while self.est_server() < when and spins < 1_000_000:
            spins += 1
            await asyncio.sleep(0)
        assert self.ctl is not None
        if self.ctl.command_seq != seq:
            return  # superseded before it was due
        self.player.played_at = None
        est = self.est_server()
        actions = self.ctl.tick(est)
        if self.player.played_at is None or not any(a.kind == "play" for a in actions):
            self.errors.append(f"command {seq}: the controller did not start the player")
            return
        self.starts[seq] = Start(self.player.played_at, est, self.offset + self.skew, spins, sleeps)
        self.changed.set()

    async def reporter(self, room_id: str, stop: asyncio.Event) -> None:
        """``syncplay.report`` every 5 s, like a real player (also its presence heartbeat)."""
        assert self.client is not None
        assert self.ctl is not None
        for _ in range(10_000):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 5.0)
            if stop.is_set():
                return
            data = {"room_id": room_id, **self.ctl.report(self.client.rtt)}
            with contextlib.suppress(Exception):
                await self.client.request("syncplay.report", data, timeout=5)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.client.close(), 10)


# --------------------------------------------------------------------------- one scenario
def _stats(values: list[float]) -> tuple[float, float]:
    return (min(values), max(values)) if values else (float("nan"), float("nan"))


def measure(members: list[Member], seq: int, when: float, sent_at: float) -> dict[str, Any]:
    arrivals = [m.arrivals[seq] for m in members if seq in m.arrivals]
    late = [a.true - when for a in arrivals]
    late_est = [a.est - when for a in arrivals]
    starts = [(m, m.starts[seq]) for m in members if seq in m.starts]
    real = [s.true - when for _, s in starts]
    implied = [-s.ntp_err for _, s in starts]  # when the estimate says "when", relative
    timer = [s.true - when + s.ntp_err for _, s in starts]  # real - implied
    worst = max(starts, key=lambda ms: abs(ms[1].true - when + ms[1].ntp_err), default=None)
    lo, hi = _stats(real)
    ilo, ihi = _stats(implied)
    return {
        "command_seq": seq,
        "when": when,
        "request_to_when_ms": round(when - sent_at, 1),
        "received": len(arrivals),
        "started": len(starts),
        "arrival_late_max_ms": round(max(late), 1) if late else None,
        "arrival_late_max_est_ms": round(max(late_est), 1) if late_est else None,
        "all_before_when": bool(late) and len(arrivals) == len(members) and max(late) < 0,
        "spread_ms": round(hi - lo, 2) if real else None,
        "start_min_ms": round(lo, 2) if real else None,
        "start_max_ms": round(hi, 2) if real else None,
        "ntp_spread_ms": round(ihi - ilo, 2) if implied else None,
        "timer_err_max_ms": round(max(abs(t) for t in timer), 2) if timer else None,
        "timer_spread_ms": round(max(timer) - min(timer), 2) if timer else None,
        "spins_max": max((s.spins for _, s in starts), default=0),
        "timer_worst_member": None if worst is None else worst[0].idx,
    }


async def wait_all(members: list[Member], done: Any, deadline: float) -> bool:
    """Wait (bounded) until ``done(member)`` holds for every member."""
    loop = asyncio.get_running_loop()
    for _ in range(10_000):
        if all(done(m) for m in members):
            return True
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        for m in members:
            m.changed.clear()
        waiters = [asyncio.ensure_future(m.changed.wait()) for m in members]
        try:
            await asyncio.wait(waiters, timeout=min(remaining, 0.1), return_when="FIRST_COMPLETED")
        finally:
            for w in waiters:
                w.cancel()
    return False


async def run_scenario(
    name: str,
    hub: HubProcess,
    links: list[Link],
    skews: list[float],
    *,
    rounds: int,
    pings: int,
    log: Any,
    tag: str = "",
    jitter_ms: float = 0.0,
    seed: int = 0,
) -> dict[str, Any]:
    settings = make_settings()
    asymmetric = any(abs(lk.asym) > 0.05 for lk in links)
    floor = ntp_floor(links)
    bound = GOAL_MS + (floor if asymmetric else 0.0)
    load_start = os.getloadavg()
    started = time.monotonic()
    proxies = ProxyProcess()
    members: list[Member] = []
    stop_reports = asyncio.Event()
    lag = LagMonitor()
    commands: list[dict[str, Any]] = []
    errors: list[str] = []
    try:
        ports = await proxies.start(
            hub.port, links, max_lifetime=900, jitter_ms=jitter_ms, seed=seed
        )
        for i, (link, skew, port) in enumerate(zip(links, skews, ports, strict=True)):
            user = f"{name}{tag}-m{i:02d}"
            m = Member(
                i,
                user,
                skew,
                link,
                f"ws://127.0.0.1:{port}/api/v1/ws",
                mint_token(settings.jwt, user, name=user),
            )
            m.ctx = contextvars.copy_context()
            members.append(m)
        await asyncio.gather(*(m.run_in_ctx(m.connect(pings), 60) for m in members))
        log(f"  {len(members)} members connected and synced")

        leader = members[0]
        assert leader.client is not None
        created = await leader.run_in_ctx(
            leader.client.request("syncplay.create", {"name": name, "content": CONTENT}), 20
        )
        room_id = created["room"]["room_id"]

        async def join(m: Member) -> None:
            assert m.client is not None
            assert m.ctl is not None
            ack = await m.client.request("syncplay.join", {"room_id": room_id, "rtt_ms": m.rtt_ms})
            m.ctl.on_state(ack["state"])
            await m.client.request("syncplay.ready", {"room_id": room_id, "position": 0.0})

        for m in members:
            assert m.client is not None
            m.rtt_ms = round(m.client.rtt or 0.0, 1)
        await asyncio.gather(*(m.run_in_ctx(join(m), 30) for m in members))
        for m in members:
            m.spawn(m.reporter(room_id, stop_reports))
        await asyncio.sleep(0.5)  # let the member/state publications drain

        plan: list[tuple[str, str, dict[str, Any]]] = [("play", "syncplay.play", {})]
        position = 60.0
        for _ in range(rounds):
            position += 137.25
            plan.append(("seek", "syncplay.seek", {"position": position}))
            plan.append(("pause", "syncplay.pause", {}))
            plan.append(("unpause", "syncplay.play", {}))
        loop = asyncio.get_running_loop()
        lag.start()
        for k, (label, mtype, extra) in enumerate(plan):
            issuer = members[(k * 7) % len(members)]
            assert issuer.client is not None
            lag.take()
            wait0 = sched_wait()
            sent_at = true_ms()
            ack = await issuer.run_in_ctx(
                issuer.client.request(mtype, {"room_id": room_id, **extra}, timeout=10), 15
            )
            state = ack.get("state") or {}
            if not ack.get("applied"):
                errors.append(f"{label}: not applied ({state.get('state')})")
                continue
            seq = int(state["command_seq"])
            when = float(state["when"])
            deadline = loop.time() + max(0.0, when - true_ms()) / 1000.0 + 3.0
            got = await wait_all(members, lambda m, s=seq: s in m.arrivals, deadline)
            if label != "pause":
                got = await wait_all(members, lambda m, s=seq: s in m.starts, deadline) and got
            row = measure(members, seq, when, sent_at)
            row.update(
                command=label,
                issuer=issuer.idx,
                complete=got,
                loop_lag_max_ms=lag.take(),
                sched_wait_ms=round((sched_wait() - wait0) * 1000.0, 1),
            )
            if label == "pause":
                for key in ("spread_ms", "ntp_spread_ms", "timer_err_max_ms", "timer_spread_ms"):
                    row[key] = None
            commands.append(row)
            if not got:
                errors.append(f"{label} (seq {seq}): not every member received/started it")
            log(
                f"  {label:8s} seq {seq:2d}: request->when {row['request_to_when_ms']:6.1f} ms, "
                f"latest arrival {row['arrival_late_max_ms']} ms vs when, "
                f"spread {row['spread_ms']} ms (ntp {row['ntp_spread_ms']}, "
                f"timer max {row['timer_err_max_ms']}; loop lag max {row['loop_lag_max_ms']} ms)"
            )
            await asyncio.sleep(0.3)
    finally:
        stop_reports.set()
        await lag.stop()
        await asyncio.gather(*(m.close() for m in members), return_exceptions=True)
        await proxies.stop()
    for m in members:
        errors.extend(f"member {m.idx}: {e}" for e in m.errors)
        if m.client is not None and m.client.stats.disconnects:
            errors.append(f"member {m.idx}: {m.client.stats.disconnects} disconnect(s)")

    per_member = []
    for m in members:
        errs = [s.ntp_err for s in m.starts.values()]
        per_member.append(
            {
                "member": m.idx,
                "skew_ms": round(m.skew, 1),
                "up_ms": m.link.up,
                "down_ms": m.link.down,
                "rtt_reported_ms": m.rtt_ms,
                "expected_ntp_err_ms": round(m.link.asym / 2, 1),
                "ntp_err_ms": round(sum(errs) / len(errs), 2) if errs else None,
            }
        )
    timed = [c for c in commands if c["command"] != "pause" and c["spread_ms"] is not None]
    worst_spread = max((c["spread_ms"] for c in timed), default=None)
    worst_late = max(
        (
            c["arrival_late_max_ms"]
            for c in commands
            if c["command"] != "pause" and c["arrival_late_max_ms"] is not None
        ),
        default=None,
    )
    # pause takes effect at when = now by design: only play/seek/unpause must come early.
    all_before = bool(timed) and all(
        c["all_before_when"] for c in commands if c["command"] != "pause"
    )
    spread_met = (
        worst_spread is not None
        and worst_spread <= bound
        and len(timed) == len([c for c in commands if c["command"] != "pause"])
    )
    # A miss is noise when the member process' event loop itself stalled during that command
    # (the loop woke up >= 10 ms late): the schedule was right, the process did not run.
    failing = [c for c in timed if c["spread_ms"] > bound]
    noisy = bool(failing) and all(c["loop_lag_max_ms"] >= NOISY_LAG_MS for c in failing)
    return {
        "scenario": name,
        "members": len(links),
        "asymmetric": asymmetric,
        "rtt_range_ms": [min(lk.rtt for lk in links), max(lk.rtt for lk in links)],
        "ntp_floor_ms": round(floor, 1),
        "bound_ms": round(bound, 1),
        "commands": commands,
        "per_member": per_member,
        "worst_spread_ms": worst_spread,
        "worst_arrival_late_ms": worst_late,
        "all_before_when": all_before,
        "spread_goal_met": spread_met,
        "noisy": noisy,
        "errors": errors,
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(time.monotonic() - started, 1),
    }


# --------------------------------------------------------------------------- the bench
def scenarios(args: argparse.Namespace) -> list[tuple[str, list[Link], list[float]]]:
    rng = random.Random(args.seed)
    out = []
    for name, asym in (("symmetric", False), ("asymmetric", True)):
        if args.only and name != args.only:
            continue
        links = make_links(args.members, asym, args.rtt_min, args.rtt_max, rng)
        skews = [round(rng.uniform(-args.skew, args.skew), 1) for _ in links]
        out.append((name, links, skews))
    return out


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    def log(text: str) -> None:
        if not args.silent:
            print(text, flush=True)

    results: dict[str, Any] = {
        "meta": {
            "members": args.members,
            "rtt_ms": [args.rtt_min, args.rtt_max],
            "skew_ms": args.skew,
            "jitter_ms": args.jitter,
            "rounds": args.rounds,
            "pings": args.pings,
            "seed": args.seed,
            "nproc": os.cpu_count(),
            "python": sys.version.split()[0],
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        },
        "runs": [],
        "errors": [],
    }
    hub = start_hub_process(HUB_ENV)
    try:
        for rep in range(args.repeat):
            for name, links, skews in scenarios(args):
                for attempt in range(1 + args.retry_noisy):
                    log(
                        f"[{rep + 1}/{args.repeat}] {name}"
                        f"{f' (retry {attempt})' if attempt else ''}: {len(links)} members, "
                        f"load {tuple(round(x, 2) for x in os.getloadavg())}"
                    )
                    try:
                        res = await asyncio.wait_for(
                            run_scenario(
                                name,
                                hub,
                                links,
                                skews,
                                rounds=args.rounds,
                                pings=args.pings,
                                log=log,
                                tag=f"{rep}{attempt}",
                                jitter_ms=args.jitter,
                                seed=args.seed + rep * 10 + attempt,
                            ),
                            args.scenario_timeout,
                        )
                    except Exception as exc:  # a failed scenario is reported, the others run
                        results["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
                        log(f"  FAILED: {type(exc).__name__}: {exc}")
                        break
                    res["repeat"], res["attempt"] = rep, attempt
                    results["runs"].append(res)
                    results["errors"].extend(f"{name}: {e}" for e in res["errors"])
                    log(
                        f"  => worst spread {res['worst_spread_ms']} ms (bound {res['bound_ms']}), "
                        f"latest arrival {res['worst_arrival_late_ms']} ms vs when, "
                        f"all before when: {res['all_before_when']}"
                        + (
                            " — NOISY (event loop stalled), running it again"
                            if res["noisy"]
                            else ""
                        )
                    )
                    if not res["noisy"]:
                        break
    finally:
        code = hub.stop()
        if code not in (0, -15):
            results["errors"].append(f"hub exited with {code}")
        with contextlib.suppress(OSError):
            hub.log_path.unlink()
    results["meta"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return results


def render(results: dict[str, Any]) -> str:
    jitter = results["meta"].get("jitter_ms") or 0.0
    lines = (
        [f"Links with up to {jitter:g} ms of random extra delay per chunk.", ""] if jitter else []
    )
    lines += [
        "| scenario | runs (noisy) | members | RTT ms | NTP floor ms | bound ms | worst start "
        "spread ms (clean runs) | latest arrival vs when ms | every command before when | "
        "spread goal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("symmetric", "asymmetric"):
        runs = [r for r in results["runs"] if r["scenario"] == name]
        if not runs:
            continue
        clean = [r for r in runs if not r["noisy"]]
        worst = max(
            (r["worst_spread_ms"] for r in clean if r["worst_spread_ms"] is not None), default=None
        )
        late = max(r["worst_arrival_late_ms"] for r in runs)
        r0 = runs[0]
        goal = bool(clean) and all(r["spread_goal_met"] for r in clean)
        lines.append(
            f"| {name} | {len(runs)} ({len(runs) - len(clean)}) | {r0['members']} | "
            f"{r0['rtt_range_ms'][0]:.0f}-{r0['rtt_range_ms'][1]:.0f} | {r0['ntp_floor_ms']} | "
            f"{r0['bound_ms']} | {worst} | {late} | "
            f"{'yes' if all(r['all_before_when'] for r in runs) else 'NO'} | "
            f"{'met' if goal else 'NOT met'} |"
        )
    lines.append("")
    for run in results["runs"]:
        lines.append(
            f"### {run['scenario']} (run {run['repeat'] + 1}"
            f"{', retry ' + str(run['attempt']) if run.get('attempt') else ''}"
            f"{', NOISY: event loop stalled' if run.get('noisy') else ''}): "
            f"{run['members']} members, "
            f"RTT {run['rtt_range_ms'][0]:.0f}-{run['rtt_range_ms'][1]:.0f} ms, "
            f"load {run['loadavg_start'][0]} -> {run['loadavg_end'][0]}"
        )
        lines.append("")
        lines.append(
            "| command | seq | request→when ms | latest arrival vs when ms | start spread ms | "
            "NTP-implied spread ms | timer error max ms | loop lag max ms | bound ms | met |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for c in run["commands"]:
            if c["command"] != "pause":
                ok = bool(
                    c["all_before_when"]
                    and c["spread_ms"] is not None
                    and c["spread_ms"] <= run["bound_ms"]
                )
                met = "yes" if ok else "NO"
            else:
                met = "n/a (when = now)"

            def f(v: Any) -> str:
                return "-" if v is None else f"{v:g}"

            lines.append(
                f"| {c['command']} | {c['command_seq']} | {f(c['request_to_when_ms'])} | "
                f"{f(c['arrival_late_max_ms'])} | {f(c['spread_ms'])} | "
                f"{f(c['ntp_spread_ms'])} | {f(c['timer_err_max_ms'])} | "
                f"{f(c['loop_lag_max_ms'])} | "
                f"{run['bound_ms'] if c['command'] != 'pause' else '-'} | {met} |"
            )
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 members, 1 round (smoke test)")
    ap.add_argument("--members", type=int, default=20)
    ap.add_argument("--rtt-min", type=float, default=20.0)
    ap.add_argument("--rtt-max", type=float, default=300.0)
    ap.add_argument("--skew", type=float, default=8000.0, help="clock skews drawn in +-SKEW ms")
    ap.add_argument(
        "--jitter",
        type=float,
        default=0.0,
        help="random extra delay per chunk on every link, uniform in 0..JITTER ms (order kept)",
    )
    ap.add_argument("--rounds", type=int, default=3, help="seek/pause/unpause rounds")
    ap.add_argument("--pings", type=int, default=8, help="extra NTP pings after connecting")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument(
        "--retry-noisy",
        type=int,
        default=2,
        help="re-run a scenario that missed the goal while its event loop stalled (times)",
    )
    ap.add_argument("--only", choices=("symmetric", "asymmetric"))
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--scenario-timeout", type=float, default=300.0)
    ap.add_argument("--json", type=Path, help="write the raw results here")
    ap.add_argument("--md", type=Path, help="write the markdown tables here")
    ap.add_argument("--silent", action="store_true")
    ap.add_argument("--proxy-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--max-lifetime", type=float, default=900.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.members = min(args.members, 4)
        args.rtt_max = min(args.rtt_max, 160.0)
        args.rounds = min(args.rounds, 1)
        args.pings = min(args.pings, 3)
        args.scenario_timeout = min(args.scenario_timeout, 60.0)
        args.retry_noisy = 0
    if not 2 <= args.members <= 60:
        ap.error("--members must be 2..60 (one FaultProxy link each)")
    if not 1 <= args.repeat <= 20 or not 0 <= args.rounds <= 20 or not 0 <= args.pings <= 50:
        ap.error("--repeat 1..20, --rounds 0..20, --pings 0..50")
    if not 0 <= args.retry_noisy <= 5:
        ap.error("--retry-noisy 0..5")
    if not 0 <= args.jitter <= 1000:
        ap.error("--jitter 0..1000 (ms)")
    return args


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM: unwind, so every finally stops its processes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    if args.proxy_worker:
        asyncio.run(proxy_worker(args.max_lifetime))
        return 0
    results = asyncio.run(run_bench(args))
    emit_results(results, render(results), silent=args.silent, json_path=args.json, md_path=args.md)
    ok = bool(results["runs"]) and all(r["all_before_when"] for r in results["runs"])
    return 0 if ok and not results["errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
