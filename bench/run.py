"""The benchmark suite of revenge-ws: ``python -m bench`` (or ``python bench/run.py``).

One command runs, side by side on this machine, the hub and its baselines (bare aiohttp
encode-once broadcast, python-socketio room emit), each server in its own process pinned
to one core and the load generator pinned to the other:

1. ``fanout``: N subscribers × ~200-byte publications — server CPU µs per delivery and
   deliveries/s (closed-loop publisher), then publish-to-receive latency p50/p99 at
   rising fixed rates (20/s first) until the server saturates;
2. ``memory``: memory per idle connection at 10,000 connections (clients over several
   processes) and handshakes per second;
3. ``storm``: 10,000 users coming back after a node restart (memory broker, Redis) or
   the loss of one of two nodes behind a balancer, like real apps: resubscribing with
   ``since``, checking for gaps, acknowledging re-sent notifications (``bench/storm.py``);
4. ``devices``: remote-command round trip (100 devices × 10 commands/s, same node and
   across two nodes over Redis) and a ``playback.update`` storm (10,000 devices
   reporting every 10 s, without and with a backend receiver) (``bench/devices.py``).

Results go to ``docs/benchmarks.md`` (+ ``docs/benchmarks.png``) and
``bench/results/latest.json``. ``--quick`` is a small run, ``--progress`` shows a live
status line, ``--profile`` also records the hub with py-spy during a fan-out.
Every process started here is stopped (SIGTERM, then SIGKILL) whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # ``python bench/run.py``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"

import orjson

from bench.common import (
    KINDS,
    ROOT,
    cores,
    loadavg,
    pin,
    proc_cpu,
    proc_rss,
    python,
    python_env,
    raise_nofile,
)
from bench.servers import Server, start_server

RESULTS = ROOT / "bench" / "results"


# -- presets -------------------------------------------------------------------------
@dataclass
class Preset:
    subscribers: int = 1000
    warmup: float = 3.0
    window: float = 10.0
    credit: int = 4
    max_pubs: int = 10**9
    rates: list[float] = field(
        default_factory=lambda: [5, 10, 20, 40, 60, 80, 100, 125, 150, 200, 250, 300, 400, 500]
    )
    step: float = 3.0
    idle_connections: int = 10_000
    idle_procs: int = 4
    storm_clients: int = 10_000
    storm_procs: int = 4
    storm_timeout: float = 180.0
    storm_scenarios: tuple[str, ...] = ("a", "b", "c")
    fanout_servers: tuple[str, ...] = KINDS
    memory_servers: tuple[str, ...] = ("hub", "aiohttp-frame", "socketio")
    devices: int = 100
    devices_rate: float = 10.0
    devices_warmup: float = 3.0
    devices_window: float = 20.0
    playback_devices: int = 10_000
    playback_procs: int = 4
    playback_period: float = 10.0
    playback_rounds: int = 3
    playback_idle: float = 5.0


PRESETS = {
    "full": Preset(),
    "quick": Preset(
        subscribers=200,
        warmup=1.0,
        window=3.0,
        rates=[5, 20, 50, 100, 200, 400],
        step=1.5,
        idle_connections=1000,
        idle_procs=2,
        storm_clients=1000,
        storm_procs=2,
        storm_timeout=90.0,
        devices_window=5.0,
        playback_devices=1000,
        playback_procs=2,
        playback_rounds=2,
        playback_idle=3.0,
    ),
    "smoke": Preset(
        subscribers=20,
        warmup=0.0,
        window=2.0,
        max_pubs=20,
        rates=[20],
        step=1.0,
        idle_connections=50,
        idle_procs=1,
        storm_clients=20,
        storm_procs=1,
        storm_timeout=40.0,
        fanout_servers=("hub", "aiohttp-frame"),
        memory_servers=("hub",),
        devices=5,
        devices_warmup=0.5,
        devices_window=1.5,
        playback_devices=20,
        playback_procs=1,
        playback_period=2.0,
        playback_rounds=1,
        playback_idle=0.5,
    ),
}


class BenchError(RuntimeError):
    pass


# -- progress ------------------------------------------------------------------------
class Progress:
    """Phase headers always; with ``--progress`` a live status line (server and load
    CPU%, what the load generator reports), redrawn in place on a terminal."""

    def __init__(self, enabled: bool, stream: Any = None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.label = ""
        self.t0 = time.monotonic()
        self._last_draw = 0.0
        self._server_pid: int | None = None
        self._load_pids: list[int] = []
        self._cpu_last: tuple[float, float, float] | None = None
        self._dirty = False

    def say(self, text: str) -> None:
        self._clear()
        self.stream.write(f"[{time.monotonic() - self.t0:6.1f}s] {text}\n")
        self.stream.flush()

    def watch(self, label: str, server_pid: int | None, load_pids: list[int]) -> None:
        self.label = label
        self._server_pid = server_pid
        self._load_pids = load_pids
        self._cpu_last = None

    def _cpu(self) -> tuple[float, float] | None:
        now = time.monotonic()
        try:
            srv = sum(proc_cpu(self._server_pid)) if self._server_pid else 0.0
            load = sum(sum(proc_cpu(p)) for p in self._load_pids)
        except OSError:
            return None
        last, self._cpu_last = self._cpu_last, (now, srv, load)
        if last is None or now - last[0] <= 0:
            return None
        wall = now - last[0]
        return 100 * (srv - last[1]) / wall, 100 * (load - last[2]) / wall

    def update(self, info: dict[str, Any]) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last_draw < (0.25 if self.tty else 2.0):
            return
        self._last_draw = now
        parts = [self.label, str(info.get("phase", ""))]
        if "elapsed" in info:
            parts.append(f"{info['elapsed']}/{info.get('of', '?')}s")
        if "connected" in info:
            parts.append(f"{info['connected']}/{info['of']} connected")
        if "acked" in info:
            parts.append(f"{info['acked']}/{info['of']} resubscribed")
        if "deliveries" in info:
            parts.append(f"{info['deliveries']:,} deliveries")
        cpu = self._cpu()
        if cpu is not None:
            parts.append(f"server CPU {cpu[0]:3.0f}%  load CPU {cpu[1]:3.0f}%")
        line = "  ".join(p for p in parts if p)
        if self.tty:
            self.stream.write("\r\x1b[2K" + line[:200])
            self._dirty = True
        else:
            self.stream.write("  .. " + line + "\n")
        self.stream.flush()

    def _clear(self) -> None:
        if self._dirty:
            self.stream.write("\r\x1b[2K")
            self._dirty = False


# -- load processes --------------------------------------------------------------------
class LoadProc:
    """One ``python -m bench.load`` process: JSON config in, tagged lines out."""

    def __init__(
        self,
        cfg: dict[str, Any],
        progress: Progress,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.progress = progress
        self.on_progress = on_progress
        self.proc: asyncio.subprocess.Process | None = None
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        fd, name = tempfile.mkstemp(prefix="bench-load-", suffix=".log")
        os.close(fd)
        self.err_path = Path(name)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        with open(self.err_path, "wb") as err:  # noqa: ASYNC230 - a local temp file
            self.proc = await asyncio.create_subprocess_exec(
                python(),
                "-m",
                "bench.load",
                orjson.dumps(self.cfg).decode(),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                cwd=ROOT,
                env=python_env(),
                limit=16 * 1024 * 1024,
            )
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        while True:
            raw = await self.proc.stdout.readline()
            if not raw:
                await self.queue.put(("EOF", None))
                return
            tag, _, rest = raw.decode().strip().partition(" ")
            payload = orjson.loads(rest) if rest else None
            if tag == "P":
                self.progress.update(payload or {})
                if self.on_progress is not None:
                    self.on_progress(payload or {})
            else:
                await self.queue.put((tag, payload))

    def stderr_tail(self, n: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.err_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    async def expect(self, tag: str, timeout: float) -> Any:
        try:
            got, payload = await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            raise BenchError(f"load generator: no {tag} within {timeout:.0f}s") from None
        if got == tag:
            return payload
        detail = payload.get("error") if isinstance(payload, dict) else payload
        raise BenchError(
            f"load generator: expected {tag}, got {got} {detail or ''}\n{self.stderr_tail()}"
        )

    def send(self, line: str) -> None:
        if self.proc is not None and self.proc.stdin is not None and self.proc.returncode is None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                self.proc.stdin.write((line + "\n").encode())

    async def finish(self, timeout: float = 15.0) -> None:
        """Wait for a clean exit, else kill; always reap and clean up."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.proc.wait(), 5)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        with contextlib.suppress(OSError):
            self.err_path.unlink()

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await self.finish(5.0)


class Cleanup:
    """Everything started, stopped in reverse order whatever happens."""

    def __init__(self) -> None:
        self.servers: list[Server] = []
        self.loads: list[LoadProc] = []
        self.others: list[subprocess.Popen[bytes]] = []

    async def close(self) -> None:
        for load in reversed(self.loads):
            await load.kill()
        self.loads.clear()
        for p in self.others:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)
        self.others.clear()
        for s in reversed(self.servers):
            await asyncio.to_thread(s.cleanup)
        self.servers.clear()


# -- phases --------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace, preset: Preset, progress: Progress) -> None:
        self.args = args
        self.p = preset
        self.progress = progress
        self.server_cores, self.load_cores = cores()
        self.server_core = min(self.server_cores)
        self.cleanup = Cleanup()
        self.loadavg_samples: list[tuple[float, float, float]] = []

    async def start_server(
        self, kind: str, env: dict[str, str] | None = None, port: int | None = None
    ) -> Server:
        if kind == "hub" and self.args.hub_src:
            env = {**(env or {}), "BENCH_HUB_SRC": self.args.hub_src}
        server = await asyncio.to_thread(start_server, kind, self.server_core, env=env, port=port)
        self.cleanup.servers.append(server)
        return server

    async def stop_server(self, server: Server) -> None:
        await asyncio.to_thread(server.cleanup)
        if server in self.cleanup.servers:
            self.cleanup.servers.remove(server)

    async def load(
        self, cfg: dict[str, Any], on_progress: Callable[[dict[str, Any]], None] | None = None
    ) -> LoadProc:
        cfg = {"cores": sorted(self.load_cores), "progress": self.progress.enabled, **cfg}
        lp = LoadProc(cfg, self.progress, on_progress)
        self.cleanup.loads.append(lp)
        await lp.start()
        return lp

    async def done(self, lp: LoadProc) -> None:
        await lp.finish()
        if lp in self.cleanup.loads:
            self.cleanup.loads.remove(lp)

    async def stop_loads(self, procs: list[LoadProc]) -> None:
        """Ask every load process to stop, then wait for each."""
        for lp in procs:
            lp.send("stop")
        for lp in procs:
            await self.done(lp)

    async def kill_loads(self, procs: list[LoadProc]) -> None:
        """Kill what is still running (after a failure) and forget it."""
        for lp in procs:
            await lp.kill()
            if lp in self.cleanup.loads:
                self.cleanup.loads.remove(lp)

    async def send_floor(self) -> dict[str, Any]:
        """``bench/send_floor.py`` on the same cores: one plain ``send()`` per subscriber,
        3 s at 20 passes/s — the ground under every server's p99 on this machine."""
        p = self.p
        rounds = 60 if p.subscribers >= 1000 else 20
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(Path(__file__).with_name("send_floor.py")),
            "--subscribers",
            str(p.subscribers),
            "--rounds",
            str(rounds),
            "--rate",
            "20",
            "--server-core",
            str(self.server_core),
            "--load-core",
            str(min(self.load_cores)),
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 120)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise BenchError("send floor: no result within 120 s") from None
        if proc.returncode != 0:
            raise BenchError(f"send floor exited with {proc.returncode}")
        result: dict[str, Any] = orjson.loads(out)
        return result

    # -- fan-out and latency -------------------------------------------------------------
    async def fanout(
        self, kind: str, profile: bool = False, latency: bool = True
    ) -> dict[str, Any]:
        p = self.p
        self.loadavg_samples.append(loadavg())
        server = await self.start_server(kind)
        spy: dict[str, Any] = {}
        try:
            rss0 = proc_rss(server.pid)
            cfg = {
                "mode": "fanout",
                "kind": kind,
                "port": server.port,
                "n": p.subscribers,
                "server_pid": server.pid,
                "server_cores": sorted(self.server_cores),
                "warmup": p.warmup,
                "window": p.window,
                "credit": p.credit,
                "max_pubs": p.max_pubs,
                "rates": p.rates if latency else [],
                "step": p.step,
                "drain": 10 if p.subscribers >= 1000 else 5,
                "deadline": 900,
                "progress": True,  # the profiler starts on the progress lines
            }

            def hook(info: dict[str, Any]) -> None:
                if (
                    profile
                    and not spy
                    and info.get("phase") == "throughput"
                    and float(info.get("elapsed", 0)) >= p.warmup
                ):
                    spy.update(self.start_pyspy(server.pid, "hub-fanout", p.window - 1))

            lp = await self.load(cfg, hook)
            self.progress.watch(f"fanout {kind}", server.pid, [lp.pid])
            res: dict[str, Any] = await lp.expect("R", 900)
            await self.done(lp)
            res["server_rss_mib"] = round(proc_rss(server.pid) / 2**20, 1)
            res["server_rss_start_mib"] = round(rss0 / 2**20, 1)
            if res.get("error"):
                raise BenchError(f"{kind}: {res['error']}")
            if spy:
                res["profile"] = await self.finish_pyspy(spy)
            return res
        finally:
            if spy:
                await self.finish_pyspy(spy)
            await self.stop_server(server)

    def start_pyspy(self, pid: int, name: str, duration: float) -> dict[str, Any]:
        exe = Path(python()).with_name("py-spy")
        exe_s = str(exe) if exe.exists() else "py-spy"
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"profile-{name}.txt"
        cmd = [
            exe_s,
            "record",
            "--pid",
            str(pid),
            "--rate",
            "200",
            "--duration",
            str(max(1, int(duration))),
            "--nonblocking",
            "--format",
            "raw",
            "-o",
            str(out),
        ]
        if self.args.profile_native:
            cmd.append("--native")
        try:
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                preexec_fn=lambda: pin(self.load_cores),
            )
        except OSError as exc:
            self.progress.say(f"py-spy not started: {exc}")
            return {"error": str(exc)}
        self.cleanup.others.append(proc)
        self.progress.say(f"py-spy recording the hub (pid {pid}) for {duration:.0f}s")
        return {"proc": proc, "out": out, "duration": duration}

    async def finish_pyspy(self, spy: dict[str, Any]) -> dict[str, Any]:
        proc: subprocess.Popen[bytes] | None = spy.pop("proc", None)
        if proc is None:
            return {k: v for k, v in spy.items() if k != "out"}
        try:
            _, err = await asyncio.to_thread(proc.communicate, None, spy["duration"] + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        out: Path = spy["out"]
        if not out.exists():  # noqa: ASYNC240
            return {"error": err.decode(errors="replace")[-500:]}
        from bench.report import summarize_profile

        summary = summarize_profile(out)
        summary["file"] = str(out.relative_to(ROOT))
        return summary

    # -- memory per idle connection, handshakes -----------------------------------------
    async def memory(self, kind: str, profile: bool = False) -> dict[str, Any]:
        p = self.p
        n = p.idle_connections
        self.loadavg_samples.append(loadavg())
        env = None
        if kind == "hub":
            # Measure capacity, not the configured admission rate (default 1,000/s,
            # burst 2,000) nor the default cap of exactly 10,000 connections.
            env = {
                "REVENGE_SERVER_ACCEPT_RATE": "1000000",
                "REVENGE_SERVER_ACCEPT_BURST": "1000000",
                "REVENGE_SERVER_MAX_CONNECTIONS": str(max(12_000, n + 2000)),
            }
        server = await self.start_server(kind, env)
        procs: list[LoadProc] = []
        try:
            per = [
                n // p.idle_procs + (1 if i < n % p.idle_procs else 0) for i in range(p.idle_procs)
            ]
            offset = 0
            for count in per:
                cfg = {
                    "mode": "idle",
                    "kind": kind,
                    "port": server.port,
                    "n": count,
                    "offset": offset,
                    "concurrency": 64,
                    "deadline": 400,
                }
                offset += count
                procs.append(await self.load(cfg))
            self.progress.watch(f"memory {kind}", server.pid, [lp.pid for lp in procs])
            for lp in procs:
                await lp.expect("L", 120)
            await asyncio.sleep(1.0)
            rss0 = proc_rss(server.pid)
            u0, s0 = proc_cpu(server.pid)
            spy = self.start_pyspy(server.pid, "hub-handshakes", 300) if profile else {}
            t_go = time.monotonic()
            for lp in procs:
                lp.send("go")
            results = [await lp.expect("R", 300) for lp in procs]
            t_done = time.monotonic()
            u1, s1 = proc_cpu(server.pid)
            if spy.get("proc") is not None:
                spy["proc"].send_signal(signal.SIGINT)  # py-spy writes what it has
                spy["duration"] = 0
            await asyncio.sleep(3.0)
            rss1 = proc_rss(server.pid)
            connected = sum(r["connected"] for r in results)
            errors: dict[str, int] = {}
            for r in results:
                for k, v in r["errors"].items():
                    errors[k] = errors.get(k, 0) + v
            wall = t_done - t_go
            res = {
                "connections": connected,
                "wanted": n,
                "client_processes": p.idle_procs,
                "rss_before_mib": round(rss0 / 2**20, 1),
                "rss_after_mib": round(rss1 / 2**20, 1),
                "kib_per_connection": round((rss1 - rss0) / 1024 / max(1, connected), 2),
                "connect_wall_s": round(wall, 2),
                "handshakes_per_s": round(connected / wall, 1) if wall > 0 else 0,
                "server_us_per_handshake": round(1e6 * (u1 + s1 - u0 - s0) / max(1, connected), 1),
                "server_cpu_pct": round(100 * (u1 + s1 - u0 - s0) / wall, 1) if wall > 0 else 0,
                "client_cpu_pct": round(100 * sum(r["client_cpu_s"] for r in results) / wall, 1)
                if wall > 0
                else 0,
                "errors": errors,
            }
            if spy:
                res["profile"] = await self.finish_pyspy(spy)
            await self.stop_loads(procs)
            return res
        finally:
            await self.kill_loads(procs)
            await self.stop_server(server)


# -- metadata ------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    def ver(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": ver("aiohttp"),
        "uvloop": ver("uvloop"),
        "orjson": ver("orjson"),
        "python-socketio": ver("python-socketio"),
        "python-engineio": ver("python-engineio"),
        "revenge-ws": ver("revenge-ws"),
        "commit": commit,
        "nofile": raise_nofile(),
    }


async def run_bench(args: argparse.Namespace, preset: Preset, progress: Progress) -> dict[str, Any]:
    bench = Bench(args, preset, progress)
    phases = args.phases
    fan_servers = args.servers or list(preset.fanout_servers)
    mem_servers = args.servers or list(preset.memory_servers)
    results: dict[str, Any] = {
        "meta": {
            **machine_info(),
            "preset": args.preset_name,
            "command": "python -m bench " + shlex.join(args.argv),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "loadavg_start": loadavg(),
            "server_cores": sorted(bench.server_cores),
            "load_cores": sorted(bench.load_cores),
            "subscribers": preset.subscribers,
            "credit": preset.credit,
            "repeat": args.repeat,
            "hub_src": args.hub_src or "installed revenge_ws",
            "rates": preset.rates,
            "step_s": preset.step,
            "window_s": preset.window,
            "warmup_s": preset.warmup,
            "idle_procs": preset.idle_procs,
            "storm_procs": preset.storm_procs,
        },
        "fanout": {},
        "memory": {},
        "storm": None,
        "devices": None,
        "errors": [],
    }
    t0 = time.monotonic()
    try:
        if "fanout" in phases:
            for kind in fan_servers:
                if kind == "socketio" and not _have("socketio"):
                    progress.say("fanout socketio: skipped (pip install python-socketio)")
                    continue
                progress.say(f"fanout: {kind}, {preset.subscribers} subscribers")
                try:
                    res = await bench.fanout(kind)
                except BenchError as exc:
                    results["errors"].append(f"fanout {kind}: {exc}")
                    progress.say(f"fanout {kind} FAILED: {exc}")
                    continue
                res["rounds"] = [res["throughput"]]
                results["fanout"][kind] = res
                progress.say(summary_fanout(kind, res))
            for round_no in range(2, args.repeat + 1):
                for kind in list(results["fanout"]):
                    progress.say(f"fanout round {round_no}/{args.repeat}: {kind} (throughput)")
                    try:
                        res = await bench.fanout(kind, latency=False)
                    except BenchError as exc:
                        results["errors"].append(f"fanout {kind} round {round_no}: {exc}")
                        continue
                    results["fanout"][kind]["rounds"].append(res["throughput"])
            for res in results["fanout"].values():
                # The headline is the round with the median CPU per delivery.
                rounds = sorted(res["rounds"], key=lambda r: r["server_us_per_delivery"])
                res["throughput"] = rounds[(len(rounds) - 1) // 2]
            if results["fanout"]:
                progress.say("floor: one plain send() per subscriber, no server")
                try:
                    results["floor"] = await bench.send_floor()
                    progress.say(
                        f"  floor: one pass {results['floor']['pass_ms_p50']} ms (p50), "
                        f"{results['floor']['cpu_us_per_send']} µs CPU per send"
                    )
                except BenchError as exc:
                    results["errors"].append(str(exc))
            if args.profile and "hub" in fan_servers:
                progress.say("profile: hub fan-out under py-spy (numbers of this run discarded)")
                try:
                    res = await bench.fanout("hub", profile=True)
                    results["profile"] = res.get("profile")
                    results["profile_run"] = res.get("throughput")
                except BenchError as exc:
                    results["errors"].append(f"profile: {exc}")
        if "memory" in phases:
            for kind in mem_servers:
                if kind == "aiohttp-str":
                    continue  # same connection path as aiohttp-frame
                if kind == "socketio" and not _have("socketio"):
                    progress.say("memory socketio: skipped (pip install python-socketio)")
                    continue
                progress.say(f"memory: {kind}, {preset.idle_connections} idle connections")
                try:
                    res = await bench.memory(kind)
                except BenchError as exc:
                    results["errors"].append(f"memory {kind}: {exc}")
                    progress.say(f"memory {kind} FAILED: {exc}")
                    continue
                results["memory"][kind] = res
                if args.profile and kind == "hub":
                    progress.say("profile: hub handshakes under py-spy (numbers discarded)")
                    try:
                        prof = await bench.memory("hub", profile=True)
                        results["profile_handshakes"] = prof.get("profile")
                        results["profile_handshakes_run"] = {
                            k: v for k, v in prof.items() if k != "profile"
                        }
                    except BenchError as exc:
                        results["errors"].append(f"profile handshakes: {exc}")
                progress.say(
                    f"  {kind}: {res['kib_per_connection']} KiB/connection, "
                    f"{res['handshakes_per_s']:,.0f} handshakes/s, "
                    f"{res['server_us_per_handshake']} µs server CPU/handshake"
                )
        if "storm" in phases:
            from bench.storm import StormSettings, run_storm

            settings = StormSettings(
                clients=preset.storm_clients,
                procs=preset.storm_procs,
                timeout=preset.storm_timeout,
                scenarios=list(preset.storm_scenarios),
                profile=args.profile,
            )
            storm = await run_storm(bench, settings)
            for res in [storm, *storm["scenarios"].values()]:
                res["command"] = results["meta"]["command"]
                res["commit"] = results["meta"]["commit"]
                res["hub_src"] = results["meta"]["hub_src"]
            results["storm"] = storm
            results["errors"].extend(storm["errors"])
        if "devices" in phases:
            from bench.devices import DevicesSettings, run_devices

            dev_settings = DevicesSettings(
                devices=preset.devices,
                rate=preset.devices_rate,
                warmup=preset.devices_warmup,
                window=preset.devices_window,
                storm_devices=preset.playback_devices,
                storm_procs=preset.playback_procs,
                period=preset.playback_period,
                rounds=preset.playback_rounds,
                idle=preset.playback_idle,
                parts=tuple(args.devices_parts) or DevicesSettings().parts,
                profile=args.profile,
            )
            dev = await run_devices(bench, dev_settings)
            for res in [dev, *dev["remote"].values(), *dev["playback"].values()]:
                res["command"] = results["meta"]["command"]
                res["commit"] = results["meta"]["commit"]
                res["hub_src"] = results["meta"]["hub_src"]
            results["devices"] = dev
            results["errors"].extend(dev["errors"])
    finally:
        await bench.cleanup.close()
    results["meta"]["loadavg_end"] = loadavg()
    results["meta"]["loadavg_samples"] = bench.loadavg_samples
    results["meta"]["duration_s"] = round(time.monotonic() - t0, 1)
    return results


def summary_fanout(kind: str, res: dict[str, Any]) -> str:
    tp = res.get("throughput", {})
    lat = res.get("latency") or [{}]
    first = lat[0]
    sat = [s for s in lat if not s.get("saturated")]
    top = sat[-1]["rate"] if sat else 0
    return (
        f"  {kind}: {tp.get('server_us_per_delivery')} µs/delivery, "
        f"{tp.get('deliveries_per_s', 0):,.0f} deliveries/s (server {tp.get('server_cpu_pct')}%,"
        f" load {tp.get('client_cpu_pct')}%); at {first.get('rate')}/s p50 "
        f"{first.get('p50_ms')} ms p99 {first.get('p99_ms')} ms; highest unsaturated rate "
        f"{top}/s"
    )


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    ap.add_argument("--quick", action="store_true", help="a small run (a minute or two)")
    ap.add_argument("--smoke", action="store_true", help="a tiny run (the smoke test)")
    ap.add_argument("--progress", action="store_true", help="show a live status line")
    ap.add_argument(
        "--phases",
        default="fanout,memory,storm,devices",
        help="comma-separated subset of fanout,memory,storm,devices (default: all)",
    )
    ap.add_argument("--servers", default="", help=f"comma-separated subset of {','.join(KINDS)}")
    ap.add_argument("--subscribers", type=int, help="fan-out subscribers (default 1000)")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="throughput rounds per server, in rotation; the median round is reported",
    )
    ap.add_argument("--window", type=float, help="fan-out measurement window, s")
    ap.add_argument("--rates", help="latency steps, publications/s, comma-separated")
    ap.add_argument("--idle-connections", type=int, help="memory phase connections")
    ap.add_argument("--storm-clients", type=int, help="storm users (default 10,000)")
    ap.add_argument(
        "--storm-scenarios",
        default="",
        help="storm scenarios, comma-separated subset of a,b,c (a: restart, memory broker; "
        "b: restart, Redis; c: two nodes behind a balancer, one SIGKILLed)",
    )
    ap.add_argument("--storm-procs", type=int, help="storm client processes")
    ap.add_argument("--storm-timeout", type=float, help="storm: seconds until a client gives up")
    ap.add_argument(
        "--devices-parts",
        default="",
        help="devices scenarios, comma-separated subset of same,cross,playback,backend,floor "
        "(same/cross: remote commands on one node/across two over Redis, cross@5: at 5 "
        "commands/s per device; playback/backend: the playback.update storm without/with a "
        "backend receiver; floor: the same schedule with the cheapest request instead)",
    )
    ap.add_argument("--devices", type=int, help="devices: remote-controlled devices (100)")
    ap.add_argument("--devices-rate", type=float, help="devices: commands/s per device (10)")
    ap.add_argument("--devices-window", type=float, help="devices: command window, s")
    ap.add_argument("--playback-devices", type=int, help="devices reporting (10,000)")
    ap.add_argument("--playback-procs", type=int, help="client processes of the reports")
    ap.add_argument("--playback-rounds", type=int, help="progress rounds measured (3)")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also run the hub fan-out under py-spy; in the storm, record the live node",
    )
    ap.add_argument("--profile-native", action="store_true", help="py-spy --native")
    ap.add_argument(
        "--hub-src",
        default="",
        help="run the hub from this source tree (its src/ dir) for A/B comparisons",
    )
    ap.add_argument("--out-md", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--out-png", default=str(ROOT / "docs" / "benchmarks.png"))
    ap.add_argument("--out-storm-png", default=str(ROOT / "docs" / "benchmarks-storm.png"))
    ap.add_argument("--out-json", default=str(RESULTS / "latest.json"))
    ap.add_argument("--no-write", action="store_true", help="print the JSON, write no file")
    ap.add_argument("--no-plot", action="store_true", help="skip the matplotlib plot")
    ap.add_argument("--render", metavar="JSON", help="only re-render the docs from a results JSON")
    args = ap.parse_args(argv)
    args.argv = argv
    args.phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    bad = set(args.phases) - {"fanout", "memory", "storm", "devices"}
    if bad:
        ap.error(f"unknown phase(s): {', '.join(sorted(bad))}")
    args.storm_scenarios = [x.strip() for x in args.storm_scenarios.split(",") if x.strip()]
    bad = set(args.storm_scenarios) - {"a", "b", "c"}
    if bad:
        ap.error(f"unknown storm scenario(s): {', '.join(sorted(bad))}")
    args.devices_parts = [x.strip() for x in args.devices_parts.split(",") if x.strip()]
    bad = {
        x
        for x in args.devices_parts
        if x not in ("same", "cross", "playback", "backend", "floor") and not _is_rate_part(x)
    }
    if bad:
        ap.error(f"unknown devices part(s): {', '.join(sorted(bad))}")
    args.servers = [x.strip() for x in args.servers.split(",") if x.strip()]
    bad = set(args.servers) - set(KINDS)
    if bad:
        ap.error(f"unknown server(s): {', '.join(sorted(bad))}")
    return args


def _is_rate_part(part: str) -> bool:
    """``same@5`` / ``cross@2.5``: a remote-command scenario at another rate per device."""
    base, _, rate = part.partition("@")
    try:
        return base in ("same", "cross") and float(rate) > 0
    except ValueError:
        return False


#: Preset fields that a command-line option of the same name replaces as given.
PLAIN_OVERRIDES = (
    "subscribers",
    "window",
    "idle_connections",
    "storm_clients",
    "storm_procs",
    "storm_timeout",
    "devices",
    "devices_rate",
    "devices_window",
    "playback_devices",
    "playback_procs",
    "playback_rounds",
)


def preset_for(args: argparse.Namespace) -> Preset:
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    args.preset_name = name
    p = Preset(**vars(PRESETS[name]))
    for key in PLAIN_OVERRIDES:  # an option given on the command line wins
        value = getattr(args, key)
        if value:
            setattr(p, key, value)
    if args.rates:
        p.rates = [float(x) for x in args.rates.split(",") if x.strip()]
    if args.storm_scenarios:
        p.storm_scenarios = tuple(args.storm_scenarios)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.render:
        from bench.report import write_report

        results = orjson.loads(Path(args.render).read_bytes())
        plots = not args.no_plot
        write_report(
            results,
            Path(args.out_md),
            Path(args.out_png) if plots else None,
            Path(args.out_storm_png) if plots and results.get("storm") else None,
        )
        return 0
    preset = preset_for(args)
    progress = Progress(args.progress)
    _server_cores, load_cores = cores()
    affinity = os.sched_getaffinity(0)
    pin(load_cores)  # the orchestrator stays off the server's core
    raise_nofile()
    try:
        return _run(args, preset, progress)
    finally:
        os.sched_setaffinity(0, affinity)


def _run(args: argparse.Namespace, preset: Preset, progress: Progress) -> int:
    server_cores, load_cores = cores()
    progress.say(
        f"revenge-ws bench ({args.preset_name}): servers on CPU {sorted(server_cores)}, "
        f"load on CPU {sorted(load_cores)}, load average {loadavg()}"
    )
    # SIGTERM/SIGINT cancel the run; every started process is stopped on the way out.
    try:
        results = asyncio.run(_main_guarded(args, preset, progress))
    except (asyncio.CancelledError, KeyboardInterrupt):
        progress.say("interrupted; every process started was stopped")
        return 130
    if args.no_write:
        print(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode())
    elif set(args.phases) <= {"storm", "devices"}:
        if "storm" in args.phases:
            _write_storm_only(args, results, progress)
        if "devices" in args.phases:
            _write_devices_only(args, results, progress)
    else:
        out_json = Path(args.out_json)
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2) + b"\n")
        from bench.report import write_report

        plots = not args.no_plot and _have("matplotlib")
        png = Path(args.out_png) if plots else None
        storm_png = Path(args.out_storm_png) if plots and results.get("storm") else None
        write_report(results, Path(args.out_md), png, storm_png)
        progress.say(f"wrote {args.out_md}" + (f", {png}" if png else "") + f", {out_json}")
    for err in results["errors"]:
        progress.say(f"error: {err}")
    return 1 if results["errors"] else 0


def _write_storm_only(
    args: argparse.Namespace, results: dict[str, Any], progress: Progress
) -> None:
    """A storm-only run replaces the storm of the results JSON (keeping the scenarios it
    did not run) and the storm section of the Markdown file, keeping the rest (the other
    phases' numbers of an earlier run)."""
    from bench.report import write_storm_section

    out_json = Path(args.out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    merged = results
    storm = results["storm"]
    if out_json.exists():
        with contextlib.suppress(ValueError, OSError, KeyError, TypeError):
            merged = orjson.loads(out_json.read_bytes())
            # Scenarios not run this time stay, with their own command, commit and date.
            kept = {
                k: v
                for k, v in ((merged.get("storm") or {}).get("scenarios") or {}).items()
                if k not in storm["scenarios"] and "command" in v
            }
            storm["scenarios"] = dict(sorted({**kept, **storm["scenarios"]}.items()))
            merged["storm"] = storm
            merged["errors"] = [
                e for e in merged.get("errors", []) if not e.startswith("storm")
            ] + [e for e in results["errors"] if e.startswith("storm")]
    out_json.write_bytes(orjson.dumps(merged, option=orjson.OPT_INDENT_2) + b"\n")
    png = None if args.no_plot or not _have("matplotlib") else Path(args.out_storm_png)
    write_storm_section(storm, Path(args.out_md), png)
    progress.say(
        f"wrote the storm of {args.out_md}" + (f", {png}" if png else "") + f", {out_json}"
    )


def _write_devices_only(
    args: argparse.Namespace, results: dict[str, Any], progress: Progress
) -> None:
    """A devices-only run (or storm and devices) replaces the devices of the results JSON
    (keeping the scenarios it did not run, each with its own command and commit) and the
    devices section of the Markdown file, keeping the rest."""
    from bench.report import write_devices_section

    out_json = Path(args.out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    dev = results["devices"]
    merged = results
    if out_json.exists():
        with contextlib.suppress(ValueError, OSError, KeyError, TypeError):
            merged = orjson.loads(out_json.read_bytes())
            old = merged.get("devices") or {}
            for part in ("remote", "playback"):
                kept = {
                    k: v
                    for k, v in (old.get(part) or {}).items()
                    if k not in dev[part] and "command" in v
                }
                dev[part] = {**kept, **dev[part]}
            merged["devices"] = dev
            merged["errors"] = [
                e for e in merged.get("errors", []) if not e.startswith("devices")
            ] + [e for e in results["errors"] if e.startswith("devices")]
    out_json.write_bytes(orjson.dumps(merged, option=orjson.OPT_INDENT_2) + b"\n")
    write_devices_section(dev, Path(args.out_md))
    progress.say(f"wrote the devices section of {args.out_md}, {out_json}")


async def _main_guarded(
    args: argparse.Namespace, preset: Preset, progress: Progress
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, task.cancel)
    try:
        return await run_bench(args, preset, progress)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)


if __name__ == "__main__":
    raise SystemExit(main())
