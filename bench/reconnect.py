"""What one full reconnect costs the hub, next to a bare aiohttp handshake, in one run.

A *full reconnect* is what an app does after every (re)connect: the handshake with its
token, the ``welcome`` with the automatic channels, a ``subscribe`` of ``activity`` and two
library channels plus the two automatic ones with ``since`` (their last positions), the
re-send of unacknowledged notifications (every 10th user has 5), and the close. The bare
aiohttp baseline (``bench/baseline_aiohttp.py``) does its handshake and a one-line
``welcome``. Server CPU (``/proc``, user + system) is divided by the reconnects made;
each server runs alone, pinned to one core, the clients (aiohttp, on the other core) keep
``--concurrency`` reconnects in flight.

    python -m bench.reconnect [--users 500] [--passes 4] [--concurrency 32] [--profile]

Issue #14's goals: ≤ 1.0 ms hub CPU per full reconnect, ≤ 2× the bare handshake.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import (
    API_KEY,
    SECRET,
    cores,
    emit_results,
    loadavg,
    pin,
    proc_cpu,
    python,
)
from bench.servers import Server, start_server

LIBRARIES = ("library:l1", "library:l2")


def _tokens(n: int) -> list[str]:
    from revenge_ws.auth import mint_token
    from revenge_ws.config import JwtSettings

    settings = JwtSettings(secret=SECRET)  # type: ignore[arg-type]
    return [mint_token(settings, f"r{i}", ttl=3600) for i in range(n)]


async def _hub_reconnect(
    s: aiohttp.ClientSession, port: int, token: str, uid: str, pos: dict[str, Any]
) -> None:
    url = f"ws://127.0.0.1:{port}/api/v1/ws?token={token}"
    async with s.ws_connect(url, protocols=("revenge.v1",), timeout=30) as ws:
        welcome = await ws.receive_json(timeout=30)
        if welcome.get("type") != "welcome":
            raise RuntimeError(f"expected welcome, got {welcome}")
        for entry in welcome["data"]["subscriptions"]:
            pos.setdefault(entry["channel"], (entry["epoch"], entry["seq"]))
        channels: list[Any] = []
        for name in (f"notifications:{uid}", f"user:{uid}", "activity", *LIBRARIES):
            p = pos.get(name)
            channels.append({"name": name, "since": {"epoch": p[0], "seq": p[1]}} if p else name)
        await ws.send_json({"type": "subscribe", "id": "s", "data": {"channels": channels}})
        for _ in range(1000):  # bounded: re-sent notifications and presence may come first
            msg = await ws.receive_json(timeout=30)
            if msg.get("id") == "s":
                for entry in msg["data"]["subscriptions"]:
                    pos[entry["channel"]] = (entry["epoch"], entry["seq"])
                return
        raise RuntimeError("no subscribe ack")


async def _bare_handshake(s: aiohttp.ClientSession, port: int) -> None:
    async with s.ws_connect(f"ws://127.0.0.1:{port}/ws", timeout=30) as ws:
        await ws.receive(timeout=30)


def _start_spy(pid: int, path: Path) -> subprocess.Popen[bytes]:
    exe = Path(python()).with_name("py-spy")
    command = [str(exe) if exe.exists() else "py-spy", "record", "-f", "raw"]
    return subprocess.Popen(
        [*command, "-p", str(pid), "-o", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def _measure(
    server: Server, passes: int, n: int, concurrency: int, one: Any, spy_to: Path | None
) -> dict[str, Any]:
    sem = asyncio.Semaphore(concurrency)

    async def bounded(i: int) -> None:
        async with sem:
            await one(i)

    await asyncio.gather(*(bounded(i) for i in range(n)))  # warm-up (and positions)
    await asyncio.sleep(1.0)
    spy = _start_spy(server.pid, spy_to) if spy_to is not None else None
    if spy is not None:
        await asyncio.sleep(1.0)
    u0, s0 = proc_cpu(server.pid)
    t0 = time.monotonic()
    for _ in range(passes):
        await asyncio.gather(*(bounded(i) for i in range(n)))
    wall = time.monotonic() - t0
    u1, s1 = proc_cpu(server.pid)
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(30)
    done = passes * n
    return {
        "reconnects": done,
        "wall_s": round(wall, 2),
        "per_s": round(done / wall, 1),
        "server_us": round(1e6 * (u1 + s1 - u0 - s0) / done, 1),
        "server_user_us": round(1e6 * (u1 - u0) / done, 1),
        "server_sys_us": round(1e6 * (s1 - s0) / done, 1),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    server_core, load_core = cores()
    results: dict[str, Any] = {"load_before": loadavg(), "errors": []}
    hub = start_server("hub", min(server_core), env={"REVENGE_SERVER_ACCEPT_BURST": "100000"})
    pin(load_core)
    try:
        toks = _tokens(args.users)
        positions: list[dict[str, Any]] = [{} for _ in range(args.users)]
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as s:
            base = f"http://127.0.0.1:{hub.port}"
            for i in range(0, args.users, 10):  # every 10th user: 5 unacknowledged notes
                for k in range(5):
                    async with s.post(
                        f"{base}/api/v1/realtime/notify",
                        headers={"Authorization": f"Bearer {API_KEY}"},
                        json={"user_id": f"r{i}", "notification_type": f"t{k}", "title": "x"},
                    ) as r:
                        r.raise_for_status()
            results["hub"] = await _measure(
                hub,
                args.passes,
                args.users,
                args.concurrency,
                lambda i: _hub_reconnect(s, hub.port, toks[i], f"r{i}", positions[i]),
                Path(args.profile) if args.profile else None,
            )
    finally:
        hub.stop()
    bare = start_server("aiohttp-frame", min(server_core))
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            results["bare"] = await _measure(
                bare,
                args.passes,
                args.users,
                args.concurrency,
                lambda i: _bare_handshake(s, bare.port),
                None,
            )
    finally:
        bare.stop()
    bare_us = results["bare"]["server_us"]
    # None when the bare run saw no CPU tick (a smoke-sized run): no ratio to give.
    results["ratio"] = round(results["hub"]["server_us"] / bare_us, 2) if bare_us else None
    results["load_after"] = loadavg()
    return results


def markdown(r: dict[str, Any]) -> str:
    hub, bare = r["hub"], r["bare"]
    lines = [
        "| server | reconnects | per second | server CPU µs each (user / sys) |",
        "|---|---|---|---|",
        f"| hub, full reconnect | {hub['reconnects']:,} | {hub['per_s']:,} | "
        f"**{hub['server_us']}** ({hub['server_user_us']} / {hub['server_sys_us']}) |",
        f"| bare aiohttp, handshake | {bare['reconnects']:,} | {bare['per_s']:,} | "
        f"**{bare['server_us']}** ({bare['server_user_us']} / {bare['server_sys_us']}) |",
        "",
        f"Hub / bare: **{r['ratio']}×** (goal ≤ 2×; ≤ 1,000 µs per full reconnect). "
        f"Load average {r['load_before'][0]:.2f} → {r['load_after'][0]:.2f}.",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=500)
    ap.add_argument("--passes", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--profile", help="record the hub with py-spy (raw) to this file")
    ap.add_argument("--out-json", type=Path)
    ap.add_argument("--out-md", type=Path)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    results = asyncio.run(asyncio.wait_for(run(args), 600))
    emit_results(
        results,
        markdown(results),
        silent=args.quiet,
        json_path=args.out_json,
        md_path=args.out_md,
    )


if __name__ == "__main__":
    main()
