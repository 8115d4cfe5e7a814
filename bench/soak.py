"""Soak test: many connections with mixed traffic for a long time; does the hub leak?

    python -m bench.soak                      # 2,000 connections, 30 minutes
    python -m bench.soak --quick              # 1 minute
    python -m bench.soak --minutes 5 --connections 2000 --workers 4 --out soak.json

It starts a hub process (``python -m revenge_ws serve``, SQLite store in a temp dir,
loopback only) and spreads the clients over ``--workers`` processes. Every client:
subscribes to one of 20 library channels (5% also to ``activity``), then, after a random
think time (mean ``--think`` s), does one of: ``ping`` (55%), ``notification.list`` (15%),
subscribe + unsubscribe a random channel (10%), a malformed frame (5%), close and
reconnect (15%, which churns handshakes, presence and the per-user count). It acks every
notification it receives. Meanwhile the orchestrator publishes ``--pub-rate`` publications/s
on the library channels and ``--notify-rate`` notifications/s to random users.

Every ``--interval`` s it samples the hub process from /proc: RSS (VmRSS) and open file
descriptors, plus the hub's own connection count. At the end it fits a least-squares line
to the samples after the warm-up (the first 20% of the run, at least one minute when the
run is longer than 2 minutes) and reports the slopes: the run is "flat" when the fitted
growth over the measured span stays under max(2% of the mean, 4 MiB) for RSS and under
1% of the connections (+10) for descriptors.

Exit status: 0 flat, 1 not flat, 2 the run itself failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import HOST, free_port, raise_nofile

SECRET = "soak-secret-" + "x" * 40
API_KEY = "soak-api-key-0123456789"
LIBRARIES = 20


def mint(sub: str) -> str:
    from pydantic import SecretStr

    from revenge_ws.auth import mint_token
    from revenge_ws.config import JwtSettings

    return mint_token(JwtSettings(secret=SecretStr(SECRET)), sub, ttl=24 * 3600)


# -- /proc sampling ------------------------------------------------------------------------
def proc_sample(pid: int) -> tuple[int, int]:
    """(RSS KiB, open file descriptors) of a process."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
            break
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return rss, fds


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope (value per unit of the first coordinate)."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    var = sum((p[0] - mx) ** 2 for p in points)
    if var == 0:
        return 0.0
    return sum((p[0] - mx) * (p[1] - my) for p in points) / var


def verdict(samples: list[dict[str, float]], connections: int, warmup: float) -> dict[str, Any]:
    measured = [s for s in samples if s["t"] >= warmup]
    if len(measured) < 3:
        measured = samples[len(samples) // 2 :]
    span_min = (measured[-1]["t"] - measured[0]["t"]) / 60 if len(measured) > 1 else 0.0
    rss = [(s["t"] / 60, s["rss_kib"]) for s in measured]
    fds = [(s["t"] / 60, s["fds"]) for s in measured]
    rss_slope, fd_slope = slope(rss), slope(fds)
    rss_mean = sum(v for _, v in rss) / len(rss)
    rss_growth = rss_slope * span_min
    fd_growth = fd_slope * span_min
    rss_budget = max(0.02 * rss_mean, 4096.0)
    fd_budget = 0.01 * connections + 10
    return {
        "measured_samples": len(measured),
        "measured_minutes": round(span_min, 2),
        "rss_kib_first": measured[0]["rss_kib"],
        "rss_kib_last": measured[-1]["rss_kib"],
        "rss_kib_min": min(v for _, v in rss),
        "rss_kib_max": max(v for _, v in rss),
        "rss_slope_kib_per_min": round(rss_slope, 1),
        "rss_fitted_growth_kib": round(rss_growth, 1),
        "rss_budget_kib": round(rss_budget, 1),
        "fds_first": measured[0]["fds"],
        "fds_last": measured[-1]["fds"],
        "fds_min": min(v for _, v in fds),
        "fds_max": max(v for _, v in fds),
        "fd_slope_per_min": round(fd_slope, 2),
        "fd_fitted_growth": round(fd_growth, 1),
        "fd_budget": round(fd_budget, 1),
        "rss_flat": abs(rss_growth) <= rss_budget,
        "fds_flat": abs(fd_growth) <= fd_budget,
    }


# -- client workers ---------------------------------------------------------------------------
async def client(
    n: int, port: int, deadline: float, think: float, stats: dict[str, int], session: Any
) -> None:
    import aiohttp
    import orjson

    rng = random.Random(n)
    url = f"ws://{HOST}:{port}/api/v1/ws?token={mint(f'soak{n}')}"
    library = f"library:soak{n % LIBRARIES}"
    channels = [library, "activity"] if n % 20 == 0 else [library]

    def bump(key: str, by: int = 1) -> None:
        stats[key] = stats.get(key, 0) + by

    while time.monotonic() < deadline:
        try:
            ws = await session.ws_connect(url, protocols=["revenge.v1"], heartbeat=None)
        except aiohttp.WSServerHandshakeError as exc:
            bump(f"handshake_{exc.status}")
            await asyncio.sleep(1 + rng.random() * 2)
            continue
        except (aiohttp.ClientError, OSError, TimeoutError):
            bump("connect_error")
            await asyncio.sleep(1 + rng.random() * 2)
            continue
        bump("connects")
        seq = 0

        async def send(mtype: str, data: dict[str, Any], ws: Any = ws) -> None:
            nonlocal seq
            seq += 1
            await ws.send_str(orjson.dumps({"type": mtype, "id": f"c{seq}", "data": data}).decode())

        async def reader(ws: Any = ws) -> None:
            async for msg in ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    break
                data = orjson.loads(msg.data)
                kind = data.get("type")
                if kind == "error":
                    bump(f"error_{data['data'].get('code')}")
                elif kind == "notification":
                    bump("notifications")
                    with contextlib.suppress(Exception):
                        await send("notification.ack", {"ids": [data["data"]["id"]]})
                elif "seq" in data and "channel" in data:
                    bump("publications")
                else:
                    bump(f"msg_{kind}")
            bump(f"closed_{ws.close_code}")

        read_task = asyncio.create_task(reader())
        try:
            await send("subscribe", {"channels": channels})
            while time.monotonic() < deadline and not ws.closed:
                await asyncio.sleep(min(rng.expovariate(1 / think), think * 5))
                r = rng.random()
                if r < 0.55:
                    await send("ping", {"t0": time.time() * 1000})
                elif r < 0.70:
                    await send("notification.list", {"limit": 10})
                elif r < 0.80:
                    extra = f"library:churn{rng.randrange(1000)}"
                    await send("subscribe", {"channels": [extra]})
                    await send("unsubscribe", {"channels": [extra]})
                elif r < 0.85:
                    await ws.send_str("{not json")
                else:
                    bump("reconnects")
                    break
        except (ConnectionError, RuntimeError, aiohttp.ClientError):
            bump("send_error")
        finally:
            with contextlib.suppress(Exception):
                await ws.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(read_task, 5)
            read_task.cancel()


def worker_main(first: int, count: int, port: int, seconds: float, think: float, out: Any) -> None:
    raise_nofile()
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()

    async def main() -> dict[str, int]:
        import aiohttp

        stats: dict[str, int] = {}
        deadline = time.monotonic() + seconds
        conn = aiohttp.TCPConnector(limit=0, limit_per_host=0)
        async with aiohttp.ClientSession(connector=conn) as session:
            tasks = []
            for n in range(first, first + count):
                tasks.append(asyncio.create_task(client(n, port, deadline, think, stats, session)))
                await asyncio.sleep(0.002)  # ramp up: ~500 connections/s per worker
            await asyncio.gather(*tasks, return_exceptions=True)
        return stats

    out.put(asyncio.run(main()))


# -- orchestrator -----------------------------------------------------------------------------
async def publisher(
    port: int, deadline: float, pub_rate: float, notify_rate: float, users: int
) -> dict[str, int]:
    import aiohttp

    stats: dict[str, int] = {}
    rng = random.Random(7)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    base = f"http://{HOST}:{port}"
    next_pub = next_note = time.monotonic()
    async with aiohttp.ClientSession(headers=headers) as s:
        while time.monotonic() < deadline:
            now = time.monotonic()
            try:
                if pub_rate > 0 and now >= next_pub:
                    next_pub += 1 / pub_rate
                    body = {
                        "channel": f"library:soak{rng.randrange(LIBRARIES)}",
                        "type": "soak.tick",
                        "data": {"pad": "x" * 150, "t": time.time()},
                    }
                    async with s.post(f"{base}/api/v1/realtime/publish", json=body) as r:
                        stats[f"publish_{r.status}"] = stats.get(f"publish_{r.status}", 0) + 1
                if notify_rate > 0 and now >= next_note:
                    next_note += 1 / notify_rate
                    body = {
                        "user_id": f"soak{rng.randrange(users)}",
                        "notification_type": "soak.note",
                        "title": "soak",
                    }
                    async with s.post(f"{base}/api/v1/realtime/notify", json=body) as r:
                        stats[f"notify_{r.status}"] = stats.get(f"notify_{r.status}", 0) + 1
            except (aiohttp.ClientError, OSError) as exc:
                key = f"http_error_{type(exc).__name__}"
                stats[key] = stats.get(key, 0) + 1
            await asyncio.sleep(max(0.0, min(next_pub, next_note) - time.monotonic()))
    return stats


async def hub_connections(port: int) -> int:
    import aiohttp

    with contextlib.suppress(Exception):
        async with (
            aiohttp.ClientSession() as s,
            s.get(
                f"http://{HOST}:{port}/api/v1/realtime/info",
                headers={"Authorization": f"Bearer {API_KEY}"},
                timeout=aiohttp.ClientTimeout(total=5),
            ) as r,
        ):
            return int((await r.json())["connections"])
    return -1


async def sampler(
    pid: int, port: int, started: float, deadline: float, interval: float, samples: list[Any]
) -> None:
    while True:
        rss, fds = proc_sample(pid)
        sample = {
            "t": round(time.monotonic() - started, 1),
            "rss_kib": rss,
            "fds": fds,
            "connections": await hub_connections(port),
        }
        samples.append(sample)
        print(json.dumps(sample), flush=True)
        if time.monotonic() >= deadline:
            return
        await asyncio.sleep(min(interval, max(0.1, deadline - time.monotonic())))


def history_config(workdir: Path, ttl: float) -> list[str]:
    """``--config`` arguments that cap every history family's TTL at ``ttl`` seconds.

    With the default TTLs (notifications keep an hour) the retained history grows for the
    first hour by design, which a 30-minute soak cannot tell from a leak; with every TTL
    below the warm-up, the retention windows are full before the measurement starts.
    """
    if ttl <= 0:
        return []
    from revenge_ws.config import HistorySettings

    families = {
        name: {"size": fam.size, "ttl": min(fam.ttl, ttl)}
        for name, fam in HistorySettings().families.items()
    }
    path = workdir / "soak.yaml"
    path.write_text(json.dumps({"history": {"families": families}}))  # JSON is YAML
    return ["--config", str(path)]


def start_hub(port: int, workdir: Path, history_ttl: float = 0.0) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REVENGE_")}
    env.update(
        {
            "REVENGE_JWT_SECRET": SECRET,
            "REVENGE_API_KEYS": API_KEY,
            "REVENGE_SERVER_HOST": HOST,
            "REVENGE_SERVER_PORT": str(port),
            "REVENGE_STORE_URL": f"sqlite:///{workdir / 'soak.db'}",
            "REVENGE_NODE_ID": "soak",
            "REVENGE_LOGGING_LEVEL": "WARNING",
            "REVENGE_LOGGING_ACCESS_LOG": "false",
            "REVENGE_SERVER_ACCEPT_RATE": "5000",
            "REVENGE_SERVER_ACCEPT_BURST": "5000",
        }
    )
    log = open(workdir / "hub.log", "wb")  # noqa: SIM115 - closed by the caller's cleanup
    proc = subprocess.Popen(
        [sys.executable, "-m", "revenge_ws", *history_config(workdir, history_ttl), "serve"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((workdir / "hub.log").read_text(errors="replace")[-2000:])
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.2):
            return proc
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the hub did not start in 20 s")


def run(args: argparse.Namespace) -> int:
    nofile = raise_nofile()
    if nofile < args.connections + 200:
        print(f"open-files limit {nofile} is too low for {args.connections} connections")
        return 2
    seconds = args.minutes * 60
    warmup = max(0.2 * seconds, 60.0) if seconds > 120 else 0.3 * seconds
    workdir = Path(tempfile.mkdtemp(prefix="revenge-soak-"))
    port = free_port()
    hub = start_hub(port, workdir, args.history_ttl)
    ctx = mp.get_context("spawn")
    out: Any = ctx.Queue()
    per = -(-args.connections // args.workers)
    procs = []
    started = time.monotonic()
    samples: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    try:
        for w in range(args.workers):
            first = w * per
            count = min(per, args.connections - first)
            if count <= 0:
                break
            p = ctx.Process(target=worker_main, args=(first, count, port, seconds, args.think, out))
            p.start()
            procs.append(p)

        async def orchestrate() -> dict[str, int]:
            deadline = started + seconds
            pub = asyncio.create_task(
                publisher(port, deadline, args.pub_rate, args.notify_rate, args.connections)
            )
            await sampler(hub.pid, port, started, deadline, args.interval, samples)
            return await pub

        pub_stats = asyncio.run(orchestrate())
        clients: dict[str, int] = {}
        for _ in procs:
            with contextlib.suppress(Exception):
                for k, v in out.get(timeout=60).items():
                    clients[k] = clients.get(k, 0) + v
        for p in procs:
            p.join(30)
        alive = hub.poll() is None
        result = {
            "connections": args.connections,
            "workers": args.workers,
            "minutes": args.minutes,
            "think_s": args.think,
            "pub_rate": args.pub_rate,
            "notify_rate": args.notify_rate,
            "warmup_s": round(warmup, 1),
            "cores": os.cpu_count(),
            "hub_alive": alive,
            "clients": dict(sorted(clients.items())),
            "publisher": dict(sorted(pub_stats.items())),
            "verdict": verdict(samples, args.connections, warmup),
            "samples": samples,
        }
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
        if hub.poll() is None:
            hub.send_signal(signal.SIGTERM)
            try:
                hub.wait(20)
            except subprocess.TimeoutExpired:
                hub.kill()
                hub.wait(5)
        result["hub_exit"] = hub.returncode
        shutil.rmtree(workdir, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    v = result.get("verdict", {})
    summary = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(summary, indent=1))
    if not result.get("hub_alive"):
        return 2
    return 0 if v.get("rss_flat") and v.get("fds_flat") else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=4, help="client processes")
    ap.add_argument("--interval", type=float, default=10.0, help="sampling period (s)")
    ap.add_argument("--think", type=float, default=5.0, help="mean think time per client (s)")
    ap.add_argument("--pub-rate", type=float, default=20.0, help="publications/s")
    ap.add_argument("--notify-rate", type=float, default=2.0, help="notifications/s")
    ap.add_argument("--quick", action="store_true", help="a 1-minute run, 5 s samples")
    ap.add_argument("--out", help="write the full result (with samples) as JSON")
    ap.add_argument(
        "--history-ttl",
        type=float,
        default=0.0,
        help="cap every history family's TTL at this many seconds (0: the hub's defaults)",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.minutes, args.interval = 1.0, 5.0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
