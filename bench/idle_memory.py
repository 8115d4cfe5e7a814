"""Where an idle connection's memory goes: ``tracemalloc`` of an in-process hub holding N
idle WebSocket connections, grouped by the innermost frame of the hub or of a library.

The connections come from one ``bench.load`` process (mode ``idle``, the memory phase's
load generator); the hub runs in this process on the chosen engine, so its allocations are
the only ones traced. The snapshot is taken after the last connection's set-up (welcome,
notification re-send) has settled, and compared with one taken before the first.

    python -m bench.idle_memory --connections 2000 --engine direct
    python -m bench.idle_memory --connections 2000 --engine aiohttp
"""

from __future__ import annotations

import argparse
import asyncio
import tracemalloc
from collections import Counter

from tests.helpers import make_settings, running_hub

from bench.common import SECRET, raise_nofile
from bench.run import LoadProc, Progress

#: Path fragments that name who allocated, innermost first wins.
OWNERS = ("revenge_ws/", "websockets/", "aiohttp/", "yarl/", "multidict/", "asyncio/", "uvloop/")


def owner(tb: tracemalloc.Traceback) -> str:
    for frame in reversed(tb):  # innermost last in tracemalloc's order: walk from it
        for key in OWNERS:
            i = frame.filename.find(key)
            if i >= 0:
                return f"{frame.filename[i:]}:{frame.lineno}"
    return "other"


async def measure(n: int, engine: str, settle: float) -> None:
    settings = make_settings(
        {
            "REVENGE_JWT_SECRET": SECRET,
            "REVENGE_SERVER_WS_ENGINE": engine,
            "REVENGE_SERVER_ACCEPT_RATE": "1000000",
            "REVENGE_SERVER_ACCEPT_BURST": "1000000",
            "REVENGE_SERVER_MAX_CONNECTIONS": str(n + 1000),
            "REVENGE_LOGGING_LEVEL": "WARNING",
        }
    )
    async with running_hub(settings) as hub:
        cfg = {"mode": "idle", "kind": "hub", "port": hub.port, "n": n, "concurrency": 32}
        lp = LoadProc(cfg, Progress(False))
        await lp.start()
        try:
            await lp.expect("L", 120)
            tracemalloc.start(25)
            before = tracemalloc.take_snapshot()
            lp.send("go")
            result = await lp.expect("R", 300)
            await asyncio.sleep(settle)
            after = tracemalloc.take_snapshot()
            tracemalloc.stop()
            lp.send("stop")
            await lp.finish()
        except BaseException:
            await lp.kill()
            raise
    connected = result["connected"]
    groups: Counter[str] = Counter()
    for stat in after.compare_to(before, "traceback"):
        groups[owner(stat.traceback)] += stat.size_diff
    total = sum(groups.values())
    print(f"engine {engine}: {connected} idle connections, traced {total / connected:,.0f} B each")
    print("| bytes / connection | allocated at (innermost hub or library frame) |")
    print("|---|---|")
    for where, size in groups.most_common(25):
        if abs(size) / connected >= 20:
            print(f"| {size / connected:,.0f} | `{where}` |")
    per_pkg: Counter[str] = Counter()
    for where, size in groups.items():
        per_pkg[where.split("/")[0]] += size
    print(
        "\nby package: "
        + ", ".join(f"{k} {v / connected:,.0f} B" for k, v in per_pkg.most_common())
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--engine", choices=("direct", "aiohttp"), default="direct")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds before the snapshot")
    args = ap.parse_args()
    raise_nofile()
    asyncio.run(measure(args.connections, args.engine, args.settle))


if __name__ == "__main__":
    main()
