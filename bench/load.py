"""The load generator: one process, pinned to the load core, driven by the orchestrator.

``python -m bench.load '<json config>'``. It talks back on stdout, one line each:
``P {json}`` progress, ``L`` loaded (tokens minted, waiting for ``go``), ``READY {json}``,
``ARMED``, ``R {json}`` the result, ``E message`` a fatal error. Commands come on stdin
(``go``, ``arm K``, ``stop``). Every wait is bounded; the process exits by itself when
its ``deadline`` passes, whatever the orchestrator does.

Modes:

- ``fanout``: N subscribers + a publisher in this process. Throughput phase: a
  closed-loop publisher keeps ``credit`` publications in flight end to end (a new one
  leaves when an older one has reached every subscriber), so neither side can run
  away from the other; server CPU is read from /proc/PID/stat over the window.
  Latency phase: an open-loop publisher at fixed rates (steps), each publication stamped
  with its send time (``"t"``); receivers compute publish-to-receive latency.
- ``idle``: open N connections (memory per idle connection, handshakes/s).
- ``storm``: users that reconnect after a node restart or loss like real apps and check
  what they receive (``bench/storm_clients.py``).
- ``devices``: remote-controllable devices, their controllers, or devices reporting
  ``playback.update`` (``bench/devices_clients.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import sys
import time
from typing import Any

import orjson

from .common import (
    API_KEY,
    CHANNEL,
    CLK_TCK,
    HOST,
    MTYPE,
    PAYLOAD_BYTES,
    SECRET,
    percentile,
    pin,
    proc_cpu,
    raise_nofile,
    run_loop,
    self_cpu,
)
from .wsclient import HandshakeRefused, Stats, WSClient, open_ws, subscribe_message

#: Pad so that the hub's envelope of a publication is ~PAYLOAD_BYTES bytes.
_ENVELOPE_OVERHEAD = len(
    orjson.dumps(
        {
            "type": MTYPE,
            "channel": CHANNEL,
            "seq": 12345,
            "epoch": "0a1b2c3d",
            "timestamp": "2026-11-27T11:28:56.369Z",
            "data": {"t": 1795000000.123456, "i": 12345, "pad": ""},
        }
    )
)
PAD = "x" * max(0, PAYLOAD_BYTES - _ENVELOPE_OVERHEAD)


def core_busy(core_ids: list[int]) -> dict[str, float]:
    """Seconds the given CPUs spent running processes (user + nice + system) and in
    interrupts (irq + softirq: loopback packet processing lands there), /proc/stat."""
    if not core_ids:
        return {}
    wanted = {f"cpu{c}".encode() for c in core_ids}
    busy = irq = 0
    with open("/proc/stat", "rb") as fh:
        for line in fh:
            parts = line.split()
            if parts and parts[0] in wanted:
                vals = [int(x) for x in parts[1:8]]
                busy += vals[0] + vals[1] + vals[2]
                irq += vals[5] + vals[6]
    return {"busy": busy / CLK_TCK, "irq": irq / CLK_TCK}


def out(tag: str, obj: Any = None) -> None:
    line = tag if obj is None else f"{tag} {orjson.dumps(obj).decode()}"
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def tokens(kind: str, n: int, offset: int) -> list[str | None]:
    if kind != "hub":
        return [None] * n
    from revenge_ws.auth import mint_token
    from revenge_ws.config import JwtSettings

    settings = JwtSettings(secret=SECRET)  # type: ignore[arg-type]
    return [mint_token(settings, f"b{offset + i}", ttl=7200) for i in range(n)]


async def connect_all(
    kind: str,
    port: int,
    toks: list[str | None],
    stats: Stats,
    *,
    concurrency: int,
    subscribe: bool,
    track: bool = False,
    deadline: float,
    progress: bool = False,
) -> tuple[list[WSClient], dict[str, int]]:
    """Open every connection (retrying 503/429 and refused sockets until ``deadline``)."""
    sem = asyncio.Semaphore(concurrency)
    errors: dict[str, int] = {}
    done = [0]
    sub = subscribe_message(CHANNEL) if subscribe and kind == "hub" else None

    async def one(tok: str | None) -> WSClient | None:
        async with sem:
            while time.monotonic() < deadline:
                try:
                    c = await open_ws(kind, port, stats, token=tok, subscribe=sub, track=track)
                    done[0] += 1
                    return c
                except HandshakeRefused as exc:
                    key = f"http {exc.status}"
                    errors[key] = errors.get(key, 0) + 1
                    if exc.status not in (429, 503):
                        return None
                    await asyncio.sleep(min(exc.retry_after or 0.2, 1.0) * random.random())
                except (OSError, TimeoutError) as exc:
                    key = type(exc).__name__
                    errors[key] = errors.get(key, 0) + 1
                    await asyncio.sleep(0.05 + 0.2 * random.random())
            return None

    async def report() -> None:
        while True:
            await asyncio.sleep(0.5)
            out("P", {"phase": "connect", "connected": done[0], "of": len(toks)})

    reporter = asyncio.create_task(report()) if progress else None
    try:
        results = await asyncio.gather(*(one(t) for t in toks))
    finally:
        if reporter is not None:
            reporter.cancel()
    return [c for c in results if c is not None], errors


async def close_all(clients: list[WSClient], timeout: float = 5.0) -> None:
    for c in clients:
        c.close()
    pending = [c.closed_fut for c in clients if not c.closed_fut.done()]
    if pending:
        await asyncio.wait(pending, timeout=timeout)
    for c in clients:
        if c.transport is not None and not c.closed_fut.done():
            c.transport.abort()


class StdinCommands:
    """Lines from the orchestrator, readable with a timeout."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self._transport: asyncio.BaseTransport | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        self._transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
        )
        self._task = asyncio.create_task(self._pump(reader))

    async def _pump(self, reader: asyncio.StreamReader) -> None:
        while True:
            line = await reader.readline()
            if not line:
                await self.queue.put("eof")
                return
            await self.queue.put(line.decode().strip())

    async def expect(self, word: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {word!r} from the orchestrator")
            line = await asyncio.wait_for(self.queue.get(), left)
            if line == "eof":
                raise EOFError("orchestrator went away")
            if line.split(" ", 1)[0] == word:
                return line

    def close(self) -> None:
        self._task.cancel()
        if self._transport is not None:
            self._transport.close()


# -- publishing ------------------------------------------------------------------------
class Publisher:
    """POSTs publications to the server's publish endpoint over keep-alive connections."""

    def __init__(self, kind: str, port: int) -> None:
        import aiohttp

        self.kind = kind
        if kind == "hub":
            self.url = f"http://{HOST}:{port}/api/v1/realtime/publish"
        else:
            self.url = f"http://{HOST}:{port}/publish"
        self.headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, force_close=False),
            timeout=aiohttp.ClientTimeout(total=30),
        )
        self.sent = 0
        self.ok = 0
        self.failed = 0
        self.inflight = 0
        self.errors: dict[str, int] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self._i = 0

    def body(self) -> bytes:
        self._i += 1
        return orjson.dumps(
            {
                "channel": CHANNEL,
                "type": MTYPE,
                "data": {"t": time.time(), "i": self._i, "pad": PAD},
            }
        )

    async def _post(self) -> None:
        self.inflight += 1
        try:
            async with self.session.post(self.url, data=self.body(), headers=self.headers) as r:
                await r.read()
                if r.status == 200:
                    self.ok += 1
                else:
                    self.failed += 1
                    key = f"http {r.status}"
                    self.errors[key] = self.errors.get(key, 0) + 1
        except Exception as exc:
            self.failed += 1
            key = type(exc).__name__
            self.errors[key] = self.errors.get(key, 0) + 1
        finally:
            self.inflight -= 1

    def fire(self) -> None:
        self.sent += 1
        task = asyncio.create_task(self._post())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def settle(self, timeout: float) -> None:
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=timeout)

    async def close(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        await self.settle(2.0)
        await self.session.close()


async def wait_frames(stats: Stats, target: int, timeout: float) -> bool:
    """Until ``stats.frames`` reaches ``target`` (True) or ``timeout`` passes (False)."""
    if stats.frames >= target:
        return True
    fut = asyncio.get_running_loop().create_future()
    stats.wake_at = target
    stats.waiter = fut
    try:
        await asyncio.wait_for(fut, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        stats.waiter = None


class Probe:
    """Snapshots of the server's CPU, this process' CPU and the delivery count."""

    def __init__(self, server_pid: int, stats: Stats, server_cores: list[int]) -> None:
        self.pid = server_pid
        self.stats = stats
        self.server_cores = server_cores

    def snap(self) -> dict[str, float]:
        u, s = proc_cpu(self.pid)
        snap = {
            "t": time.monotonic(),
            "su": u,
            "ss": s,
            "cpu": self_cpu(),
            "frames": self.stats.frames,
            "reads": self.stats.reads,
            "bytes": self.stats.nbytes,
        }
        snap.update(core_busy(self.server_cores))
        return snap

    @staticmethod
    def delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        wall = max(1e-9, b["t"] - a["t"])
        frames = b["frames"] - a["frames"]
        su = b["su"] - a["su"]
        ss = b["ss"] - a["ss"]
        per = 1e6 / frames if frames else 0.0
        busy = b.get("busy", 0.0) - a.get("busy", 0.0)
        foreign = max(0.0, busy - (su + ss)) / wall
        irq = (b.get("irq", 0.0) - a.get("irq", 0.0)) / wall
        return {
            "wall_s": round(wall, 3),
            "deliveries": int(frames),
            "deliveries_per_s": round(frames / wall, 1),
            "server_cpu_pct": round(100 * (su + ss) / wall, 1),
            "server_us_per_delivery": round((su + ss) * per, 2),
            "server_user_us_per_delivery": round(su * per, 2),
            "server_sys_us_per_delivery": round(ss * per, 2),
            "client_cpu_pct": round(100 * (b["cpu"] - a["cpu"]) / wall, 1),
            "bytes_per_message": round((b["bytes"] - a["bytes"]) / frames, 1) if frames else 0,
            # Publications per client socket read: > 1 when frames were coalesced.
            "frames_per_read": round(frames / max(1, b["reads"] - a["reads"]), 2),
            # Process time on the server's core not spent by the server (other
            # processes): how noisy the window was. Interrupt time shown apart.
            "server_core_other_pct": round(100 * foreign, 1),
            "server_core_irq_pct": round(100 * irq, 1),
        }


# -- modes -------------------------------------------------------------------------------
async def fanout(cfg: dict[str, Any]) -> dict[str, Any]:
    kind, port, n = cfg["kind"], cfg["port"], cfg["n"]
    stats = Stats()
    show = cfg.get("progress", False)
    t_connect = time.monotonic()
    clients, errors = await connect_all(
        kind,
        port,
        tokens(kind, n, 0),
        stats,
        concurrency=cfg.get("concurrency", 100),
        subscribe=True,
        deadline=time.monotonic() + cfg.get("connect_timeout", 60),
        progress=show,
    )
    result: dict[str, Any] = {
        "subscribers": len(clients),
        "connect_s": round(time.monotonic() - t_connect, 2),
        "connect_errors": errors,
        "payload_bytes_target": PAYLOAD_BYTES,
    }
    if len(clients) < n:
        result["error"] = f"only {len(clients)} of {n} subscribers connected"
        await close_all(clients)
        return result
    probe = Probe(cfg["server_pid"], stats, cfg.get("server_cores") or [])
    pub = Publisher(kind, port)
    try:
        result["throughput"] = await throughput(cfg, stats, pub, probe, n, show)
        result["latency"] = await latency_curve(cfg, stats, pub, probe, n, show)
    finally:
        await pub.close()
        result["closed_by_server"] = stats.closed
        result["close_codes"] = {str(k): v for k, v in stats.close_codes.items()}
        await close_all(clients)
    return result


async def throughput(
    cfg: dict[str, Any], stats: Stats, pub: Publisher, probe: Probe, n: int, show: bool
) -> dict[str, Any]:
    credit = cfg.get("credit", 4)
    max_pubs = cfg.get("max_pubs", 10**9)
    warmup, window = cfg["warmup"], cfg["window"]
    base_frames = stats.frames
    base_sent = pub.sent
    t0 = time.monotonic()
    start = probe.snap()
    t_window = t0 + warmup
    t_end = t_window + window
    first: dict[str, float] | None = None
    stalled = False
    last_show = t0
    slices: list[dict[str, float]] = []
    while True:
        now = time.monotonic()
        if first is None and now >= t_window:
            first = probe.snap()
            slices.append(first)
        elif first is not None and now - slices[-1]["t"] >= 1.0:
            slices.append(probe.snap())
        if now >= t_end or pub.sent - base_sent >= max_pubs:
            break
        alive = max(1, n - stats.closed)
        done_pubs = (stats.frames - base_frames) / alive
        if (pub.sent - base_sent) - done_pubs >= credit:
            # Wake when the oldest publication in flight has reached everyone.
            target = base_frames + int((pub.sent - base_sent - credit + 1) * alive)
            ok = await wait_frames(stats, target, min(5.0, max(0.01, t_end - now + 1)))
            if not ok and time.monotonic() < t_end:
                stalled = True
                break
            continue
        pub.fire()
        if show and now - last_show >= 0.5:
            last_show = now
            out(
                "P",
                {
                    "phase": "throughput",
                    "elapsed": round(now - t0, 1),
                    "of": warmup + window,
                    "deliveries": stats.frames - base_frames,
                },
            )
        await asyncio.sleep(0)
    last = probe.snap()
    if first is None:  # a count-bounded (smoke) run ended inside the warm-up
        first = start
    res = Probe.delta(first, last)
    # One-second slices: the median is robust to a burst of other work on the machine.
    per = sorted(
        d["server_us_per_delivery"]
        for d in (Probe.delta(x, y) for x, y in itertools.pairwise(slices))
        if d["deliveries"]
    )
    res["slices"] = len(per)
    res["median_slice_us_per_delivery"] = per[len(per) // 2] if per else None
    await pub.settle(10.0)
    alive = max(1, n - stats.closed)
    drained = await wait_frames(
        stats, base_frames + (pub.sent - base_sent) * alive, cfg.get("drain", 10)
    )
    res.update(
        {
            "credit": credit,
            "publications": pub.sent - base_sent,
            "publish_failed": pub.failed,
            "publish_errors": dict(pub.errors),
            "drained": drained,
            "stalled": stalled,
            "lost": max(0, base_frames + (pub.sent - base_sent) * alive - stats.frames),
        }
    )
    return res


async def latency_curve(
    cfg: dict[str, Any], stats: Stats, pub: Publisher, probe: Probe, n: int, show: bool
) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = []
    for rate in cfg["rates"]:
        step = await rate_step(cfg, stats, pub, probe, n, rate, show)
        steps.append(step)
        if step["saturated"]:
            break
        await asyncio.sleep(cfg.get("pause", 0.5))
    return steps


async def rate_step(
    cfg: dict[str, Any],
    stats: Stats,
    pub: Publisher,
    probe: Probe,
    n: int,
    rate: float,
    show: bool,
) -> dict[str, Any]:
    duration = cfg["step"]
    count = min(int(rate * duration), cfg.get("max_pubs", 10**9))
    stats.lat = []
    stats.collect = True
    base_frames = stats.frames
    base_ok = pub.ok
    base_sent = pub.sent
    start = probe.snap()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    late = 0
    overload = False
    last_show = t0
    for i in range(count):
        delay = t0 + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -1.0 / rate:
            late += 1
        if pub.inflight > 256:
            overload = True  # the server does not answer publishes fast enough
            break
        pub.fire()
        if show and loop.time() - last_show >= 0.5:
            last_show = loop.time()
            out(
                "P",
                {
                    "phase": f"latency {rate:g}/s",
                    "elapsed": round(loop.time() - t0, 1),
                    "of": duration,
                    "deliveries": stats.frames - base_frames,
                },
            )
    publish_s = loop.time() - t0
    await pub.settle(cfg.get("drain", 10))
    alive = max(1, n - stats.closed)
    expected = (pub.ok - base_ok) * alive
    drained = await wait_frames(stats, base_frames + expected, cfg.get("drain", 10))
    end = probe.snap()
    stats.collect = False
    lat = sorted(stats.lat)
    stats.lat = []
    d = Probe.delta(start, end)
    delivered = stats.frames - base_frames
    p99 = percentile(lat, 99) * 1000
    reasons = []
    if not drained or delivered < 0.99 * expected:
        reasons.append("not all delivered")
    if overload:
        reasons.append("publishes backed up")
    if late > 0.1 * max(1, count):
        reasons.append("publisher late")
    if p99 > cfg.get("saturation_p99_ms", 250):
        reasons.append("p99 over limit")
    if d["server_cpu_pct"] >= cfg.get("saturation_cpu_pct", 95):
        reasons.append("server CPU saturated")
    return {
        "rate": rate,
        "publications": pub.sent - base_sent,
        "achieved_rate": round((pub.sent - base_sent) / max(publish_s, 1e-9), 1),
        "expected": expected,
        "delivered": delivered,
        "samples": len(lat),
        "p50_ms": round(percentile(lat, 50) * 1000, 2),
        "p90_ms": round(percentile(lat, 90) * 1000, 2),
        "p99_ms": round(p99, 2),
        "max_ms": round((lat[-1] if lat else 0) * 1000, 2),
        "server_cpu_pct": d["server_cpu_pct"],
        "server_us_per_delivery": d["server_us_per_delivery"],
        "client_cpu_pct": d["client_cpu_pct"],
        "server_core_other_pct": d["server_core_other_pct"],
        "late": late,
        "saturated": bool(reasons),
        "reasons": reasons,
    }


async def idle(cfg: dict[str, Any]) -> None:
    kind, port, n, offset = cfg["kind"], cfg["port"], cfg["n"], cfg.get("offset", 0)
    cmds = StdinCommands()
    await cmds.start()
    stats = Stats()
    clients: list[WSClient] = []
    try:
        toks = tokens(kind, n, offset)
        out("L")
        await cmds.expect("go", cfg.get("go_timeout", 120))
        t0 = time.time()
        c0 = self_cpu()
        clients, errors = await connect_all(
            kind,
            port,
            toks,
            stats,
            concurrency=cfg.get("concurrency", 64),
            subscribe=False,
            deadline=time.monotonic() + cfg.get("connect_timeout", 120),
            progress=cfg.get("progress", False),
        )
        out(
            "R",
            {
                "connected": len(clients),
                "errors": errors,
                "t0": t0,
                "t1": time.time(),
                "client_cpu_s": round(self_cpu() - c0, 3),
            },
        )
        await cmds.expect("stop", cfg.get("hold", 120))
    finally:
        await close_all(clients)
        cmds.close()


async def main_async(cfg: dict[str, Any]) -> None:
    mode = cfg["mode"]
    budget = cfg.get("deadline", 600)
    if mode == "fanout":
        res = await asyncio.wait_for(fanout(cfg), budget)
        out("R", res)
    elif mode == "idle":
        await asyncio.wait_for(idle(cfg), budget)
    elif mode == "storm":
        from .storm_clients import run as storm

        await asyncio.wait_for(storm(cfg), budget)
    elif mode == "devices":
        from .devices_clients import run as devices

        await asyncio.wait_for(devices(cfg), budget)
    else:
        raise ValueError(f"unknown mode {mode}")


def main() -> None:
    cfg = orjson.loads(sys.argv[1])
    pin(set(cfg["cores"]) if cfg.get("cores") else None)
    raise_nofile()
    try:
        run_loop(main_async(cfg))
    except BaseException as exc:
        with contextlib.suppress(Exception):
            out("E", {"error": f"{type(exc).__name__}: {exc}"})
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
