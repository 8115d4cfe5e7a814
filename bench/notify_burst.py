"""Burst of notifications: N notifications to U connected users, stored and delivered.

    python bench/notify_burst.py [--users 1000] [--per-user 10] [--store sqlite|postgresql]

Starts a real hub process (SQLite file by default), connects every user over a real
WebSocket, fires the burst at the HTTP API (``POST /api/v1/realtime/notify``, one
notification per call, bounded concurrency), and waits until every client holds every
notification id. Prints one JSON line: time to store, time to deliver, rates, and lost
(must be 0). Every loop is bounded; the hub process is always stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib

from tests.helpers import API_KEY, make_settings, start_hub_process

from revenge_ws.auth import mint_token


async def run(
    users: int, per_user: int, store_url: str, concurrency: int, timeout: float, batch: int
) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, users * 2 + 512)), hard))
    hp = start_hub_process({"REVENGE_STORE_URL": store_url, "REVENGE_LOGGING_LEVEL": "WARNING"})
    settings = make_settings()
    received: dict[str, set[str]] = {f"u{i}": set() for i in range(users)}
    total = users * per_user
    done = asyncio.Event()
    got = 0
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def client(user: str) -> None:
                nonlocal got
                token = mint_token(settings.jwt, user, ttl=3600)
                async with session.ws_connect(f"{hp.ws_url}?token={token}", autoping=True) as ws:
                    async for msg in ws:
                        if msg.type is not aiohttp.WSMsgType.TEXT:
                            break
                        data = json.loads(msg.data)
                        if data["type"] == "notification":
                            nid = data["data"]["id"]
                            if nid not in received[user]:
                                received[user].add(nid)
                                got += 1
                                if got >= total:
                                    done.set()
                        elif data["type"] == "welcome":
                            connected.append(user)

            connected: list[str] = []
            tasks = [asyncio.create_task(client(u)) for u in received]
            t_conn = time.perf_counter()
            for _ in range(int(timeout * 20)):
                if len(connected) == users:
                    break
                await asyncio.sleep(0.05)
            connect_s = time.perf_counter() - t_conn
            if len(connected) != users:
                raise RuntimeError(f"only {len(connected)} of {users} connected")

            sem = asyncio.Semaphore(concurrency)
            failures = 0

            async def notify(targets: list[str], i: int) -> None:
                nonlocal failures
                async with (
                    sem,
                    session.post(
                        f"{hp.url}/api/v1/realtime/notify",
                        headers={"Authorization": f"Bearer {API_KEY}"},
                        json={
                            "user_ids": targets,
                            "notification_type": "content.new_episode",
                            "title": f"episode {i}",
                        },
                    ) as r,
                ):
                    if r.status != 200:
                        failures += 1
                    await r.read()

            names = list(received)
            calls = [
                (names[k : k + batch], i) for i in range(per_user) for k in range(0, users, batch)
            ]
            t0 = time.perf_counter()
            await asyncio.gather(*(notify(t, i) for t, i in calls))
            stored_s = time.perf_counter() - t0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), timeout)
            delivered_s = time.perf_counter() - t0
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        hp.stop()
    delivered = sum(len(s) for s in received.values())
    return {
        "bench": "notify_burst",
        "users": users,
        "users_per_call": batch,
        "notifications": total,
        "store": store_url.split(":", 1)[0],
        "connect_s": round(connect_s, 3),
        "stored_s": round(stored_s, 3),
        "stored_per_s": round(total / stored_s, 1),
        "delivered_s": round(delivered_s, 3),
        "delivered_per_s": round(delivered / delivered_s, 1),
        "delivered": delivered,
        "lost": total - delivered,
        "http_failures": failures,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--per-user", type=int, default=10)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--store", default="sqlite", help="sqlite, or a postgresql:// DSN")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--batch", type=int, default=1, help="users per notify call (user_ids)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{os.path.join(tmp, 'bench.db')}" if args.store == "sqlite" else args.store
        result = asyncio.run(
            run(args.users, args.per_user, url, args.concurrency, args.timeout, args.batch)
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
