"""Helpers shared by the orchestrator, the load generator and the bench servers.

Everything here is standard library (plus uvloop when present), so the baseline servers
and the load generator start fast and the smoke test needs no bench-only dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import resource
import socket
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
#: Credentials of the bench hub (test values, loopback only).
SECRET = "bench-secret-" + "x" * 40
API_KEY = "bench-api-key-0123456789"
#: The fan-out channel: any user may subscribe to a library whose token lists none.
CHANNEL = "library:bench"
MTYPE = "bench.tick"
#: Target size of one publication's JSON (the hub's envelope; baselines build the same).
PAYLOAD_BYTES = 200
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

#: Server kinds: how clients reach them and how they publish.
KINDS = ("hub", "aiohttp-frame", "aiohttp-str", "socketio")


@functools.cache
def cores() -> tuple[set[int], set[int]]:
    """(server cores, load cores): one core each when there are two or more (decided
    once, before the orchestrator pins itself)."""
    avail = sorted(os.sched_getaffinity(0))
    if len(avail) >= 2:
        return {avail[0]}, {avail[1]}
    return set(avail), set(avail)


def pin(core_set: set[int] | None) -> None:
    if core_set:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, core_set)


def raise_nofile(want: int = 0) -> int:
    """Raise the open-files soft limit to the hard limit (to ``want`` when the hard limit
    is unlimited); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, want)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft


def proc_cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, all threads, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        raw = fh.read()
    fields = raw[raw.rindex(b")") + 2 :].split()
    # fields[0] is field 3 (state); utime is field 14, stime field 15.
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def proc_rss(pid: int) -> int:
    """Resident set size in bytes (VmRSS)."""
    with open(f"/proc/{pid}/statm", "rb") as fh:
        return int(fh.read().split()[1]) * PAGE


def sched_wait(pid: int | str = "self") -> float:
    """Seconds the process' threads spent runnable but waiting for a CPU
    (``/proc/PID/task/*/schedstat``, field 2): high means the machine was saturated."""
    total = 0
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            path = f"/proc/{pid}/task/{task}/schedstat"
            with contextlib.suppress(OSError, ValueError, IndexError), open(path, "rb") as fh:
                total += int(fh.read().split()[1])
    return total / 1e9


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def loadavg() -> tuple[float, float, float]:
    a, b, c = os.getloadavg()
    return round(a, 2), round(b, 2), round(c, 2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float, alive: Callable[[], bool] | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            return False
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.2):
            return True
        time.sleep(0.05)
    return False


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when available (every server and client of the bench)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is in the bench requirements
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def emit_results(
    results: dict[str, Any],
    md: str,
    *,
    silent: bool,
    json_path: Path | None,
    md_path: Path | None,
) -> None:
    """Print a standalone bench's Markdown table and errors, and write its files."""
    import json

    if not silent:
        print()
        print(md)
        for err in results["errors"]:
            print("ERROR:", err)
    if json_path:
        json_path.write_text(json.dumps(results, indent=1))
    if md_path:
        md_path.write_text(md + "\n")


def hub_envelope(body: dict[str, Any], seq: int, epoch: str) -> dict[str, Any]:
    """The envelope the hub builds for a publish body ``{channel, type, data}``: the
    baselines send the same bytes per message as the hub."""
    from datetime import UTC, datetime

    stamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {
        "type": body["type"],
        "channel": body["channel"],
        "seq": seq,
        "epoch": epoch,
        "timestamp": stamp,
        "data": body.get("data", {}),
    }


async def serve_until_signalled(build_app: Callable[[], Any], port: int) -> None:
    """Serve the aiohttp app ``build_app()`` makes on 127.0.0.1:``port`` until SIGTERM
    or SIGINT (the baseline servers)."""
    import signal

    from aiohttp import web

    runner = web.AppRunner(build_app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, HOST, port, backlog=4096, reuse_address=True)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(runner.cleanup(), 5)


def serve_baseline(
    doc: str,
    build_app: Callable[[Any], Any],
    add_args: Callable[[Any], None] | None = None,
) -> None:
    """The command line of a baseline server (``bench/baseline_*.py``): ``--port``,
    ``--core`` (pin the process to this CPU) and the script's own options (``add_args``
    adds them to the parser); serves ``build_app(args)`` until SIGTERM or SIGINT."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--core", type=int, default=None, help="pin the process to this CPU")
    if add_args is not None:
        add_args(ap)
    args = ap.parse_args()
    pin({args.core} if args.core is not None else None)
    raise_nofile()
    run_loop(serve_until_signalled(lambda: build_app(args), args.port))


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (0 when empty)."""
    if not sorted_values:
        return 0.0
    k = max(0, min(len(sorted_values) - 1, round(q / 100.0 * len(sorted_values) + 0.5) - 1))
    return float(sorted_values[k])


def python_env() -> dict[str, str]:
    """The environment for bench child processes: the repository root importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    )
    env.pop("COVERAGE_PROCESS_START", None)
    return env


def python() -> str:
    return sys.executable
