"""Starting and stopping the servers under test, each in its own pinned process.

- ``hub``: the real thing, ``revenge-ws serve`` (``revenge_ws.cli.main``) with its
  default settings except the ones a benchmark names (documented per phase), the
  in-process broker, SQLite in memory, default logging to a file. ``python -m
  bench.servers hub --core 0`` pins itself and raises its open-files limit first.
- ``aiohttp-frame`` / ``aiohttp-str``: ``bench/baseline_aiohttp.py``.
- ``socketio``: ``bench/baseline_socketio.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .common import (
    API_KEY,
    HOST,
    ROOT,
    SECRET,
    free_port,
    pin,
    python,
    python_env,
    raise_nofile,
    wait_port,
)

__all__ = ["Server", "start_server"]


@dataclass
class Server:
    kind: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5)
        return self.proc.returncode

    def cleanup(self) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            self.log_path.unlink()


def hub_env(port: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in python_env().items() if not k.startswith("REVENGE_")}
    env.update(
        {
            "REVENGE_JWT_SECRET": SECRET,
            "REVENGE_API_KEYS": API_KEY,
            "REVENGE_SERVER_HOST": HOST,
            "REVENGE_SERVER_PORT": str(port),
            "REVENGE_STORE_URL": "sqlite:///:memory:",
            "REVENGE_NODE_ID": "bench",
        }
    )
    env.update(extra or {})
    return env


def command(kind: str, port: int, core: int | None) -> list[str]:
    pin_args = ["--core", str(core)] if core is not None else []
    if kind == "hub":
        return [python(), "-m", "bench.servers", "hub", *pin_args]
    if kind in ("aiohttp-frame", "aiohttp-str"):
        mode = kind.split("-", 1)[1]
        script = str(ROOT / "bench" / "baseline_aiohttp.py")
        return [python(), script, "--port", str(port), "--mode", mode, *pin_args]
    if kind == "socketio":
        script = str(ROOT / "bench" / "baseline_socketio.py")
        return [python(), script, "--port", str(port), *pin_args]
    raise ValueError(f"unknown server kind {kind}")


def start_server(
    kind: str,
    core: int | None,
    *,
    port: int | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Server:
    """Start a server process and wait until its port accepts connections."""
    port = port or free_port()
    fd, name = tempfile.mkstemp(prefix=f"bench-{kind}-", suffix=".log")
    full_env = hub_env(port, env) if kind == "hub" else python_env()
    with os.fdopen(fd, "wb") as log:
        proc = subprocess.Popen(
            command(kind, port, core),
            env=full_env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Server(kind, port, proc, Path(name))
    if not wait_port(port, timeout, server.alive):
        tail = server.log_tail()
        server.cleanup()
        raise RuntimeError(f"{kind} did not start on port {port}:\n{tail}")
    time.sleep(0.2)
    return server


def _hub_main(core: int | None) -> int:
    if core is not None:
        pin({core})
    raise_nofile()
    # A/B runs: the hub from another source tree (e.g. a scratch copy with a change).
    src = os.environ.get("BENCH_HUB_SRC")
    if src:
        sys.path.insert(0, src)
    from revenge_ws.cli import main

    return main(["serve"])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="run a bench server (hub) pinned to a core")
    ap.add_argument("kind", choices=("hub",))
    ap.add_argument("--core", type=int, default=None)
    args = ap.parse_args()
    raise SystemExit(_hub_main(args.core))
