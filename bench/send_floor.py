"""The floor under any server's fan-out latency on this machine: one ``send()`` per
subscriber, nothing else.

This process (pinned to core 0, like the servers of ``python -m bench``) accepts N loopback
TCP connections from a reader process (pinned to core 1, reading everything with one
``epoll`` loop), then writes one ~200-byte WebSocket frame to every socket in a plain loop —
no event loop, no WebSocket library, no JSON — ``--rounds`` times at ``--rate`` per
second. It reports how long one pass over the N sockets takes (the last subscriber's
frame leaves one pass after the first one's) and the CPU per send, which includes the
kernel's loopback delivery to the reader's socket, done on the sender's core.

A server's publish→receive p99 at N subscribers cannot be below ~0.99 × this pass (plus
its own work per delivery): it is the ``p99 ≤ 10 ms`` goal's ground (docs/benchmarks.md).

    python bench/send_floor.py --subscribers 1000 --rounds 60 --rate 20
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import percentile  # noqa: E402

FRAME = b"\x81\x7e\x00\xc8" + b"x" * 200  # a 200-byte text frame, as the bench publishes


def reader(port: int, n: int, expect: int, timeout: float) -> None:
    """The subscribers: connect, then read until ``expect`` bytes arrived or ``timeout``."""
    sel = selectors.DefaultSelector()
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), 10)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        socks.append(s)
    print("connected", flush=True)
    got = 0
    deadline = time.monotonic() + timeout
    while got < expect and time.monotonic() < deadline:
        for key, _ in sel.select(0.5):
            try:
                data = key.fileobj.recv(65536)  # type: ignore[union-attr]
            except BlockingIOError:
                continue
            got += len(data)
    print(json.dumps({"received": got}), flush=True)
    for s in socks:
        s.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subscribers", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--rate", type=float, default=20.0, help="passes per second")
    ap.add_argument("--server-core", type=int, default=0, help="this process's core")
    ap.add_argument("--load-core", type=int, default=1, help="the reader's core")
    ap.add_argument("--reader", nargs=3, metavar=("PORT", "N", "EXPECT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.reader:
        port, n, expect = (int(x) for x in args.reader)
        reader(port, n, expect, timeout=60)
        return
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.server_core})
    n, rounds = args.subscribers, args.rounds
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4096)
    port = lsock.getsockname()[1]
    cmd = [sys.executable, __file__, "--reader", str(port), str(n), str(n * rounds * len(FRAME))]
    if os.path.exists("/usr/bin/taskset"):
        cmd = ["taskset", "-c", str(args.load_core), *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        lsock.settimeout(20)
        conns = [lsock.accept()[0] for _ in range(n)]
        for c in conns:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "connected"
        passes: list[float] = []
        t_start = os.times()
        start = time.perf_counter()
        for r in range(rounds):
            due = start + r / args.rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            t0 = time.perf_counter()
            for c in conns:
                c.send(FRAME)
            passes.append(time.perf_counter() - t0)
        t_end = os.times()
        user = t_end.user - t_start.user
        system = t_end.system - t_start.system
        cpu = user + system
        received = json.loads(proc.stdout.readline())["received"]
        out = {
            "subscribers": n,
            "rounds": rounds,
            "rate": args.rate,
            "pass_ms_p50": round(percentile(sorted(passes), 50) * 1000, 2),
            "pass_ms_p99": round(percentile(sorted(passes), 99) * 1000, 2),
            "pass_ms_max": round(max(passes) * 1000, 2),
            "cpu_us_per_send": round(cpu / (n * rounds) * 1e6, 2),
            "kernel_share": round(system / cpu, 3) if cpu else None,
            "delivered_bytes": received,
            "expected_bytes": n * rounds * len(FRAME),
            "loadavg": os.getloadavg(),
        }
        print(json.dumps(out, indent=2))
        for c in conns:
            c.close()
    finally:
        lsock.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


if __name__ == "__main__":
    main()
