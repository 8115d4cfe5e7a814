"""What ``broker.min_replicas`` (Redis ``WAIT``) costs per publish.

Starts a master with two replicas (private redis-server processes on free ports) and
publishes N times in sequence through the Redis broker with min_replicas 0, 1 and 2;
prints the median and p99 publish latency of each. Run: ``python -m bench.redis_wait``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from tests.redis_fixtures import Recorder, SentinelCluster

from revenge_ws.broker.redis import RedisBroker
from revenge_ws.config import HistoryFamily


async def measure(url: str, min_replicas: int, n: int) -> list[float]:
    broker = RedisBroker(url, node_id=f"bench{min_replicas}", min_replicas=min_replicas)
    await broker.start(Recorder())
    fam = HistoryFamily()
    try:
        for i in range(50):  # warm up: connections, script cache
            await broker.publish("bench:w", "t", {"i": i}, fam)
        out = []
        for i in range(n):
            t0 = time.perf_counter()
            await broker.publish(f"bench:{min_replicas}", "t", {"i": i}, fam)
            out.append((time.perf_counter() - t0) * 1000)
        return out
    finally:
        await broker.close()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=3000)
    args = ap.parse_args()
    cluster = SentinelCluster()
    try:
        cluster.start()
        print(f"{'min_replicas':>12} {'median ms':>10} {'p99 ms':>8} {'publishes/s':>12}")
        for k in (0, 1, 2):
            ms = await measure(cluster.url, k, args.n)
            p99 = sorted(ms)[int(len(ms) * 0.99)]
            rate = 1000 / statistics.mean(ms)
            print(f"{k:>12} {statistics.median(ms):>10.3f} {p99:>8.3f} {rate:>12.0f}")
    finally:
        cluster.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
