"""Cross-node publish-to-receive latency through Redis, against a single node.

    python bench/cross_node.py [--subscribers 100] [--rate 20] [--seconds 10]

Three scenarios, each with real hub processes on 127.0.0.1: (1) one node, memory broker;
(2) one node, Redis broker; (3) subscribers on node A, publisher calling node B, Redis.
A publisher posts ``--rate`` publications/s to ``POST /api/v1/realtime/publish``, each
stamped with its send time; every subscriber records ``receive - send``. Prints one JSON
line per scenario with p50/p99/max in ms. Every process (hubs, redis-server) is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers import API_KEY, HubProcess, make_settings, start_hub_process
from tests.redis_fixtures import RedisProcess

from revenge_ws.auth import mint_token


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def scenario(
    name: str, sub_node: HubProcess, pub_node: HubProcess, subs: int, rate: float, seconds: float
) -> dict[str, Any]:
    settings = make_settings()
    lat: list[float] = []
    total = int(rate * seconds)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        sockets = []
        for i in range(subs):
            tok = mint_token(settings.jwt, f"u{i}")
            ws = await s.ws_connect(f"{sub_node.ws_url}?token={tok}")
            await ws.receive_json(timeout=10)
            await ws.send_json(
                {"type": "subscribe", "id": "s", "data": {"channels": ["library:bench"]}}
            )
            sockets.append(ws)
        for ws in sockets:
            for _ in range(10):
                if (await ws.receive_json(timeout=10)).get("id") == "s":
                    break

        async def reader(ws: aiohttp.ClientWebSocketResponse) -> None:
            got = 0
            while got < total:
                msg = await ws.receive(timeout=seconds + 30)
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    return
                data = json.loads(msg.data)
                if data.get("type") == "bench.tick":
                    lat.append(time.time() * 1000 - data["data"]["t"])
                    got += 1

        readers = [asyncio.create_task(reader(ws)) for ws in sockets]
        interval = 1.0 / rate
        start = time.perf_counter()
        for i in range(total):
            delay = start + i * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            async with s.post(
                f"{pub_node.url}/api/v1/realtime/publish",
                headers={"Authorization": f"Bearer {API_KEY}"},
                json={
                    "channel": "library:bench",
                    "type": "bench.tick",
                    "data": {"t": time.time() * 1000, "i": i},
                },
            ) as r:
                await r.read()
        await asyncio.wait(readers, timeout=30)
        for t in readers:
            t.cancel()
        for ws in sockets:
            await ws.close()
    return {
        "bench": "cross_node",
        "scenario": name,
        "subscribers": subs,
        "rate": rate,
        "deliveries": len(lat),
        "expected": total * subs,
        "p50_ms": round(pct(lat, 0.5), 2),
        "p99_ms": round(pct(lat, 0.99), 2),
        "max_ms": round(max(lat), 2) if lat else None,
        "mean_ms": round(statistics.fmean(lat), 2) if lat else None,
    }


async def main(subs: int, rate: float, seconds: float) -> list[dict[str, Any]]:
    results = []
    quiet = {"REVENGE_LOGGING_LEVEL": "WARNING"}
    one = start_hub_process(quiet)
    try:
        results.append(await scenario("single node, memory broker", one, one, subs, rate, seconds))
    finally:
        one.stop()
    redis = RedisProcess()
    redis.start()
    nodes: list[HubProcess] = []
    try:
        env = {**quiet, "REVENGE_BROKER_URL": redis.url}
        nodes = [start_hub_process({**env, "REVENGE_NODE_ID": f"n{i}"}) for i in range(2)]
        results.append(
            await scenario("single node, redis broker", nodes[0], nodes[0], subs, rate, seconds)
        )
        results.append(
            await scenario(
                "cross node (sub on A, publish on B), redis",
                nodes[0],
                nodes[1],
                subs,
                rate,
                seconds,
            )
        )
    finally:
        for n in nodes:
            n.stop()
        redis.cleanup()
    return results


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subscribers", type=int, default=100)
    p.add_argument("--rate", type=float, default=20.0)
    p.add_argument("--seconds", type=float, default=10.0)
    a = p.parse_args()
    for row in asyncio.run(main(a.subscribers, a.rate, a.seconds)):
        print(json.dumps(row))
