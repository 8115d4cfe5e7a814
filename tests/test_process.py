"""Real hub processes: startup refusals, the CLI, and graceful shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import aiohttp
import orjson

from .helpers import API_KEY, SECRET, start_hub_process


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("REVENGE_")}
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "revenge_ws", *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_serve_refuses_without_secret() -> None:
    out = cli("serve")
    assert out.returncode == 2
    assert "REVENGE_JWT_SECRET" in out.stderr and "secrets.token_hex(32)" in out.stderr
    out = cli("serve", env={"REVENGE_JWT_SECRET": "short"})
    assert out.returncode == 2 and "at least 32 bytes" in out.stderr
    out = cli("serve", env={"REVENGE_JWT_SECRET": SECRET, "REVENGE_SERVER_PORT": "x"})
    assert out.returncode == 2 and "REVENGE_SERVER_PORT" in out.stderr
    out = cli("serve", env={"REVENGE_JWT_SECRET": SECRET, "REVENGE_BROKER_URL": "kafka://x"})
    assert out.returncode == 2 and "REVENGE_BROKER_URL" in out.stderr
    assert SECRET not in out.stderr


def test_token_command() -> None:
    out = cli(
        "token",
        "--sub",
        "alice",
        "--role",
        "admin",
        "--ttl",
        "15m",
        env={"REVENGE_JWT_SECRET": SECRET},
    )
    assert out.returncode == 0, out.stderr
    import jwt

    claims = jwt.decode(out.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["role"] == "admin"
    assert claims["exp"] - claims["iat"] == 900
    bad = cli("token", "--sub", "a", "--ttl", "soon", env={"REVENGE_JWT_SECRET": SECRET})
    assert bad.returncode == 2 and "not a duration" in bad.stderr


async def test_sigterm_closes_1012_and_exits_0() -> None:
    hp = start_hub_process({"REVENGE_LOGGING_JSON_FORMAT": "true"})
    try:
        token = cli("token", "--sub", "alice", env={"REVENGE_JWT_SECRET": SECRET}).stdout.strip()
        async with aiohttp.ClientSession() as s:
            sockets = [await s.ws_connect(f"{hp.ws_url}?token={token}") for _ in range(5)]
            for ws in sockets:
                assert (await ws.receive_json(timeout=5))["type"] == "welcome"
            started = time.monotonic()
            hp.proc.send_signal(signal.SIGTERM)
            codes = []
            for ws in sockets:
                msg = await ws.receive(timeout=15)
                assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
                codes.append(ws.close_code)
            assert codes == [1012] * 5
        rc = await asyncio.to_thread(hp.proc.wait, 15)
        assert rc == 0
        assert time.monotonic() - started < 15
        log = hp.log()
        lines = [orjson.loads(line) for line in log.splitlines() if line.startswith("{")]
        disconnects = [x for x in lines if x.get("event") == "disconnect"]
        assert len(disconnects) == 5 and {d["close_code"] for d in disconnects} == {1012}
        assert all(d["user_id"] == "alice" and "duration" in d for d in disconnects)
        assert token not in log
        assert "Traceback" not in log
    finally:
        hp.stop()


async def test_new_handshakes_get_503_while_draining() -> None:
    hp = start_hub_process({"REVENGE_SERVER_SHUTDOWN_TIMEOUT": "6"})
    try:
        token = cli("token", "--sub", "bob", env={"REVENGE_JWT_SECRET": SECRET}).stdout.strip()
        async with aiohttp.ClientSession() as s:
            # A socket that never answers the close handshake keeps the hub draining.
            stuck = await s.ws_connect(f"{hp.ws_url}?token={token}", autoclose=False)
            await stuck.receive_json(timeout=5)
            hp.proc.send_signal(signal.SIGTERM)
            msg = await stuck.receive(timeout=5)
            assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1012
            async with s.get(f"{hp.url}/api/v1/ws?token={token}") as r:
                assert r.status == 503
                assert (await r.json())["error"]["code"] == "UNAVAILABLE"
            async with s.get(f"{hp.url}/readyz") as r:
                assert r.status == 503
        assert await asyncio.to_thread(hp.proc.wait, 15) == 0
    finally:
        hp.stop()


def test_publish_command_against_a_process() -> None:
    hp = start_hub_process()
    try:
        env = {"REVENGE_JWT_SECRET": SECRET, "REVENGE_SERVER_PORT": str(hp.port)}
        out = cli(
            "publish",
            "activity",
            "demo.hello",
            "--data",
            '{"x": 1}',
            env={**env, "REVENGE_API_KEY": API_KEY},
        )
        assert out.returncode == 0, out.stderr
        assert orjson.loads(out.stdout)["seq"] == 1
        # Without an API key it signs an admin token with the configured secret.
        out = cli("publish", "activity", "demo.hello", env=env)
        assert out.returncode == 0 and orjson.loads(out.stdout)["seq"] == 2
        out = cli("publish", "nope:1", "x", env={**env, "REVENGE_API_KEY": API_KEY})
        assert out.returncode == 1 and "NOT_FOUND" in out.stderr
        out = cli("publish", "activity", "x", "--data", "{bad", env=env)
        assert out.returncode == 2 and "--data" in out.stderr
        out = cli(
            "publish",
            "activity",
            "x",
            "--url",
            "http://127.0.0.1:1",
            env={**env, "REVENGE_API_KEY": API_KEY},
        )
        assert out.returncode == 1 and "UNAVAILABLE" in out.stderr
    finally:
        assert hp.stop() == 0
