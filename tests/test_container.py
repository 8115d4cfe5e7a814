"""The container image (Containerfile) built with podman on a Debian base and run: health,
a WebSocket client on the host, a notification that survives a restart on the same volume,
``podman stop`` ending in 1012 and exit 0, a non-root hub. Images are built as described in
tests/container_fixtures.py (one image build per session, cached bases and wheels)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from revenge_ws.auth import mint_token

from .container_fixtures import (
    ROOT,
    RUN_FLAGS,
    HubImage,
    hub_image,
    podman,
    require_podman,
    service_images,
)
from .helpers import WS, free_port, make_settings

pytestmark = [pytest.mark.container, pytest.mark.slow, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def image() -> HubImage:
    require_podman()
    return hub_image()


@dataclass
class Secrets:
    """A random JWT secret and API key per test; never written to a log or a file."""

    jwt: str
    api_key: str

    def env(self) -> dict[str, str]:
        return {"REVENGE_JWT_SECRET": self.jwt, "REVENGE_API_KEYS": self.api_key}

    def token(self, sub: str) -> str:
        return mint_token(make_settings({"REVENGE_JWT_SECRET": self.jwt}).jwt, sub)


@pytest.fixture
def creds() -> Secrets:
    return Secrets(secrets.token_hex(32), secrets.token_urlsafe(24))


@pytest.fixture
def volume() -> Iterator[str]:
    name = f"revenge-ws-test-{secrets.token_hex(4)}"
    podman("volume", "create", name)
    try:
        yield name
    finally:
        podman("volume", "rm", "--force", name, check=False)


@dataclass
class Container:
    name: str
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        out = podman("logs", self.name, check=False)
        return out.stdout + out.stderr

    def state(self, field: str) -> str:
        fmt = "{{.State." + field + "}}"
        return podman("inspect", "--format", fmt, self.name).stdout.strip()

    def exec(self, *cmd: str) -> str:
        return podman("exec", self.name, *cmd).stdout

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Until GET /healthz answers 200 through the published port (bounded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state("Running") != "true":
                raise AssertionError(f"the container exited:\n{self.logs()[-3000:]}")
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as r,
            ):
                if r.status == 200:
                    return
            time.sleep(0.2)
        raise AssertionError(f"no 200 from /healthz in {timeout}s:\n{self.logs()[-3000:]}")


@contextlib.contextmanager
def hub_container(image: HubImage, creds: Secrets, volume: str) -> Iterator[Container]:
    """The hub image on 127.0.0.1:<free port> with ``volume`` at /data, removed at the end
    whatever happens. The secrets reach podman through its environment (``--env NAME``
    without a value), never its command line."""
    c = Container(f"revenge-ws-test-{secrets.token_hex(4)}", free_port())
    try:
        podman(
            "run",
            "--detach",
            "--name",
            c.name,
            *RUN_FLAGS,
            "--publish",
            f"127.0.0.1:{c.port}:8080",
            "--volume",
            f"{volume}:/data",
            *(flag for key in creds.env() for flag in ("--env", key)),
            "--env",
            "REVENGE_LOGGING_JSON_FORMAT=true",
            image.tag,
            env=creds.env(),
        )
        c.wait_healthy()
        yield c
    finally:
        podman("rm", "--force", "--volumes", "--time", "0", c.name, check=False)


async def connect(s: aiohttp.ClientSession, c: Container, token: str) -> WS:
    ws = WS(await s.ws_connect(f"ws://127.0.0.1:{c.port}/api/v1/ws?token={token}"))
    ws.welcome = await ws.recv(timeout=10)
    assert ws.welcome["type"] == "welcome"
    return ws


def test_image_metadata(image: HubImage) -> None:
    info: list[dict[str, Any]] = orjson.loads(podman("image", "inspect", image.tag).stdout)
    config = info[0]["Config"]
    labels = config["Labels"]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert labels["org.opencontainers.image.version"] == version
    assert labels["org.opencontainers.image.licenses"] == "MIT"
    assert labels["org.opencontainers.image.source"]
    assert config["User"] == "revenge:revenge"
    assert config["Entrypoint"] == ["revenge-ws"] and config["Cmd"] == ["serve"]
    assert "REVENGE_SERVER_HOST=0.0.0.0" in config["Env"]
    assert "/data" in config["Volumes"]
    assert "/healthz" in " ".join(info[0]["Healthcheck"]["Test"])
    # No compiler in the final image, no pip in the hub's venv; the hub imports its extras.
    out = podman(
        "run",
        "--rm",
        *RUN_FLAGS,
        "--network",
        "none",
        "--entrypoint",
        "sh",
        image.tag,
        "-c",
        "command -v gcc cc; ls /opt/revenge-ws/bin | grep pip;"
        " python3 -c 'import asyncpg, redis, uvloop, revenge_ws'",
        check=False,
    )
    assert out.returncode == 0 and out.stdout == "", out.stdout + out.stderr
    base = int(podman("image", "inspect", "--format", "{{.Size}}", image.base).stdout)
    print(f"\n{image.tag}: {image.size / 1e6:.1f} MB ({(image.size - base) / 1e6:.1f} MB above "
          f"the base {image.base}, {base / 1e6:.1f} MB)")  # fmt: skip


async def test_serve_restart_and_stop(image: HubImage, creds: Secrets, volume: str) -> None:
    headers = {"Authorization": f"Bearer {creds.api_key}"}
    async with aiohttp.ClientSession() as s:
        with hub_container(image, creds, volume) as c:
            # The hub is PID 1 (exec form, so SIGTERM reaches it) and not root.
            assert "revenge-ws\0serve" in c.exec("cat", "/proc/1/cmdline")
            uids = next(x for x in c.exec("cat", "/proc/1/status").splitlines() if x[:4] == "Uid:")
            assert uids.split()[1:] == ["10001"] * 4
            assert c.exec("id", "-un").strip() == "revenge"
            # The image's own HEALTHCHECK passes.
            assert podman("healthcheck", "run", c.name, check=False).returncode == 0
            alice = await connect(s, c, creds.token("alice"))
            async with s.post(
                f"{c.url}/api/v1/realtime/notify",
                headers=headers,
                json={"user_id": "bob", "notification_type": "test.durable", "title": "kept"},
            ) as r:
                assert r.status == 200, await r.text()
                (stored,) = (await r.json())["ids"]
            # podman stop: SIGTERM, the client gets 1012, the hub exits 0 within its budget.
            stop = asyncio.create_task(
                asyncio.to_thread(podman, "stop", "--time", "20", c.name, timeout=60)
            )
            assert await alice.closed(timeout=20) == 1012
            await stop
            assert c.state("ExitCode") == "0", c.logs()[-3000:]
            logs = c.logs()
            assert "Traceback" not in logs
            assert creds.jwt not in logs and creds.api_key not in logs
            events = [orjson.loads(x) for x in logs.splitlines() if x.startswith("{")]
            closes = [e["close_code"] for e in events if e.get("event") == "disconnect"]
            assert closes == [1012]
        # A new container on the same volume re-sends bob's stored notification.
        with hub_container(image, creds, volume) as c:
            bob = await connect(s, c, creds.token("bob"))
            note = await bob.recv_type("notification", timeout=10)
            assert note["data"]["id"] == stored and note["data"]["title"] == "kept"
            await bob.close()


# -- compose.yaml: two hubs, Redis, PostgreSQL and nginx ---------------------------------------
@contextlib.contextmanager
def compose_stack(image: HubImage, creds: Secrets, port: int) -> Iterator[dict[str, str]]:
    """``podman-compose up -d`` of the repository's compose.yaml under a private project
    name, with the stand-in images; everything of the project is removed at the end."""
    if shutil.which("podman-compose") is None:
        if os.environ.get("CI"):
            pytest.fail("podman-compose is not installed (CI must install it: see .ci/run)")
        pytest.skip("podman-compose is not installed (apt-get install podman-compose)")
    project = f"revenge-ws-test-{secrets.token_hex(4)}"
    with tempfile.TemporaryDirectory() as tmp:
        # podman-compose has no flags for the runtime and the limits: containers.conf does.
        conf = Path(tmp) / "containers.conf"
        ulimits = ", ".join(f'"{v}"' for v in RUN_FLAGS[3::2])
        conf.write_text(
            f'[containers]\ndefault_ulimits = [{ulimits}]\n[engine]\nruntime = "runc"\n'
        )
        env = {
            **os.environ,
            **service_images(),
            "CONTAINERS_CONF": str(conf),
            "REVENGE_IMAGE": image.tag,
            "REVENGE_PUBLISH": f"127.0.0.1:{port}",
            "REVENGE_JWT_SECRET": creds.jwt,
            "REVENGE_API_KEY": creds.api_key,
            "POSTGRES_PASSWORD": secrets.token_hex(16),
        }
        try:
            # Its output echoes the podman commands, secrets included: never shown.
            out = subprocess.run(
                ["podman-compose", "-p", project, "-f", str(ROOT / "compose.yaml"), "up", "-d"],
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
                cwd=tmp,
            )
            assert out.returncode == 0, f"podman-compose up failed ({out.returncode})"
            yield {"project": project, "containers_conf": str(conf)}
        finally:
            label = f"label=io.podman.compose.project={project}"
            ids = podman("ps", "--all", "--quiet", "--filter", label, check=False).stdout.split()
            if ids:
                podman("rm", "--force", "--volumes", "--time", "0", *ids, check=False)
            vols = podman("volume", "ls", "--quiet", "--filter", label, check=False).stdout
            if vols.split():
                podman("volume", "rm", "--force", *vols.split(), check=False)
            podman("network", "rm", "--force", f"{project}_default", check=False)


def wait_health(name: str, timeout: float = 120.0) -> None:
    """Until the container's own healthcheck (the one compose.yaml declares) passes; podman
    runs healthchecks through systemd timers, absent here, so the test runs them."""
    deadline = time.monotonic() + timeout
    while True:
        out = podman("healthcheck", "run", name, check=False)
        if out.returncode == 0:
            return
        if time.monotonic() > deadline:
            logs = podman("logs", name, check=False)
            raise AssertionError(f"{name} not healthy in {timeout}s: {out.stdout}{out.stderr}"
                                 f"\n{(logs.stdout + logs.stderr)[-2000:]}")  # fmt: skip
        time.sleep(1)


async def test_compose_stack(image: HubImage, creds: Secrets) -> None:
    port = free_port()
    with compose_stack(image, creds, port) as stack:
        project = stack["project"]
        for service in ("redis", "postgres", "hub1", "hub2"):
            wait_health(f"{project}_{service}_1")
        proxy = Container(f"{project}_proxy_1", port)
        proxy.wait_healthy()
        headers = {"Authorization": f"Bearer {creds.api_key}"}
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{proxy.url}/readyz") as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["checks"] == {"broker": "ok", "store": "ok"}
            # nginx alternates between the nodes: one client on each.
            clients: dict[str, WS] = {}
            for _ in range(10):
                ws = await connect(s, proxy, creds.token("alice"))
                node = ws.welcome["data"]["node_id"]
                if node in clients:
                    await ws.close()
                else:
                    clients[node] = ws
                if len(clients) == 2:
                    break
            assert set(clients) == {"hub1", "hub2"}
            # A publication through either node reaches both (Redis), a notification is
            # stored in PostgreSQL and pushed to the user on both nodes.
            async with s.post(
                f"{proxy.url}/api/v1/realtime/publish",
                headers=headers,
                json={"channel": "user:alice", "type": "test.item", "data": {"i": 1}},
            ) as r:
                assert r.status == 200, await r.text()
                seq = (await r.json())["seq"]
            for ws in clients.values():
                assert (await ws.recv_type("test.item", timeout=10))["seq"] == seq
            async with s.post(
                f"{proxy.url}/api/v1/realtime/notify",
                headers=headers,
                json={"user_id": "alice", "notification_type": "test.stack", "title": "hi"},
            ) as r:
                assert r.status == 200, await r.text()
                (nid,) = (await r.json())["ids"]
            for ws in clients.values():
                assert (await ws.recv_type("notification", timeout=10))["data"]["id"] == nid
            # A node stopped by the runtime closes its client with 1012 and exits 0.
            hub1 = Container(f"{project}_hub1_1", 0)
            stop = asyncio.create_task(
                asyncio.to_thread(podman, "stop", "--time", "20", hub1.name, timeout=60)
            )
            assert await clients["hub1"].closed(timeout=20) == 1012
            await stop
            assert hub1.state("ExitCode") == "0"
            for ws in clients.values():
                await ws.close()
        for service in ("hub1", "hub2"):
            logs = podman("logs", f"{project}_{service}_1", check=False)
            text = logs.stdout + logs.stderr
            assert "Traceback" not in text
            assert creds.jwt not in text and creds.api_key not in text
