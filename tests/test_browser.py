"""The browser side, in headless Chromium against a real hub: the JavaScript client, the
demo page (watch party, notifications, who's online) and the dashboard.

Chromium is Debian's (``apt-get install chromium``), driven by Playwright for Python with
``executable_path`` (no browser download). Test media is made at test time with ffmpeg.
Without Chromium, Playwright or ffmpeg the tests skip, except in CI (``CI`` set), where
they fail. ``scripts/screenshots.py`` uses the same machinery for the docs' screenshots.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from revenge_ws.auth import mint_token
from revenge_ws.config import Settings

from .helpers import API_KEY, make_settings

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--autoplay-policy=no-user-gesture-required",
    "--mute-audio",
]


# -- finding the tools -----------------------------------------------------------------
def chromium_path() -> str | None:
    for candidate in (
        os.environ.get("REVENGE_CHROMIUM"),
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def missing_tools() -> list[str]:
    missing = []
    if chromium_path() is None:
        missing.append("chromium (apt-get install chromium)")
    if importlib.util.find_spec("playwright") is None:
        missing.append("playwright (pip install playwright)")
    if shutil.which("ffmpeg") is None:
        missing.append("ffmpeg (apt-get install ffmpeg)")
    return missing


def require_tools() -> None:
    missing = missing_tools()
    if not missing:
        return
    message = "browser tests need " + ", ".join(missing)
    if os.environ.get("CI"):
        pytest.fail(message + " (CI must install them)")
    pytest.skip(message)


def make_test_video(
    directory: Path | None = None,
    seconds: int = 30,
    size: str = "256x144",
    bitrate: str = "200k",
) -> Path:
    """A small VP8/WebM test pattern (15 fps, a keyframe every 0.4 s so seeks land
    precisely), made once and kept in the temp folder for later runs."""
    directory = directory or Path(tempfile.gettempdir()) / "revenge-ws-test-media"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"test-{seconds}s-{size}-{bitrate}-v1.webm"
    if path.exists() and path.stat().st_size > 0:
        return path
    ffmpeg = shutil.which("ffmpeg")
    assert ffmpeg is not None
    partial = path.with_suffix(f".{os.getpid()}.part.webm")
    subprocess.run(
        [
            ffmpeg,
            "-hide_banner",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            f"testsrc2=size={size}:rate=15:duration={seconds}",
            "-c:v",
            "libvpx",
            "-b:v",
            bitrate,
            "-g",
            "6",
            "-deadline",
            "realtime",
            "-cpu-used",
            "16",
            "-an",
            str(partial),
        ],
        check=True,
        timeout=120,
    )
    partial.replace(path)
    return path


# -- a hub that serves the pages -------------------------------------------------------
@dataclass
class PagesHub:
    settings: Settings
    app: web.Application
    port: int
    session: aiohttp.ClientSession
    sockets: list[aiohttp.ClientWebSocketResponse] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token(self, sub: str, **kw: Any) -> str:
        return mint_token(self.settings.jwt, sub, **kw)

    async def backend(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        async with self.session.request(
            method,
            self.url + path,
            json=body,
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as r:
            assert r.status < 300, (r.status, await r.text())
            return await r.json()

    async def notify(self, user_id: str, title: str, **kw: Any) -> str:
        res = await self.backend(
            "POST",
            "/api/v1/realtime/notify",
            {"user_id": user_id, "notification_type": "demo", "title": title, **kw},
        )
        return str(res["ids"][0])

    async def raw_connect(self, sub: str) -> aiohttp.ClientWebSocketResponse:
        ws = await self.session.ws_connect(
            f"{self.url}/api/v1/ws?token={self.token(sub)}", protocols=["revenge.v1"]
        )
        self.sockets.append(ws)
        return ws


def _has_pages(app: web.Application) -> bool:
    return any(getattr(r.resource, "canonical", None) == "/demo" for r in app.router.routes())


@contextlib.asynccontextmanager
async def pages_hub(
    settings: Settings | None = None, media: Path | None = None
) -> AsyncIterator[PagesHub]:
    """The real application (``build_app``) on a free port, with the pages installed
    (by ``build_app`` itself once app.py wires them, else here) and ``media`` under
    ``/media/``."""
    from revenge_ws.app import build_app
    from revenge_ws.server.pages import install

    settings = settings or make_settings()
    app = build_app(settings)
    if not _has_pages(app):
        install(app)
    if media is not None:
        app.router.add_static("/media/", media)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert server is not None
    port = int(server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    session = aiohttp.ClientSession()
    hub = PagesHub(settings, app, port, session)
    try:
        yield hub
    finally:
        for ws in hub.sockets:
            await ws.close()
        await session.close()
        await asyncio.wait_for(runner.cleanup(), 20)


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    """Debian's headless Chromium through Playwright. ``launch`` gives every browser a
    fresh temporary profile (``--user-data-dir``) and removes it afterwards."""
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            await browser.close()


async def open_demo(browser: Any, hub: PagesHub, user: str, query: str = "") -> tuple[Any, Any]:
    """A new context (its own storage) with the demo signed in as ``user``."""
    context = await browser.new_context(viewport={"width": 1280, "height": 860})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors
    await page.goto(f"{hub.url}/demo{query}")
    await page.fill("#token", hub.token(user, name=user.title()))
    await page.click("#connect")
    await page.wait_for_function("() => window.revengeDemo.client?.connected === true")
    return context, page


POSITION_JS = """() => {
  const d = window.revengeDemo;
  return {
    t: d.client.serverTime(),
    pos: d.video.currentTime,
    paused: d.video.paused,
    rate: d.video.playbackRate,
    target: d.party.target(),
  };
}"""


async def positions(a: Any, b: Any) -> tuple[float, dict[str, Any], dict[str, Any]]:
    """Both players' positions, extrapolated to the same server time: |a - b| in s."""
    pa, pb = await asyncio.gather(a.evaluate(POSITION_JS), b.evaluate(POSITION_JS))

    def at(p: dict[str, Any], t: float) -> float:
        pos = float(p["pos"])
        return pos if p["paused"] else pos + (t - float(p["t"])) / 1000.0 * float(p["rate"])

    t = max(float(pa["t"]), float(pb["t"]))
    return abs(at(pa, t) - at(pb, t)), pa, pb


async def assert_together(a: Any, b: Any, seconds: float = 2.0, limit: float = 0.1) -> float:
    """Both pages stay within ``limit`` seconds of each other (and of the room) for a while."""
    worst = 0.0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        diff, pa, pb = await positions(a, b)
        worst = max(worst, diff)
        assert diff < limit, f"players {diff * 1000:.0f} ms apart: {pa} {pb}"
        for p in (pa, pb):
            if p["target"] is not None:
                off = abs(float(p["pos"]) - float(p["target"]))
                assert off < limit + 0.05, f"player {off * 1000:.0f} ms off the room: {p}"
        await asyncio.sleep(0.2)
    return worst


# -- fixtures --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder served at /media/ holding ``test.webm``."""
    require_tools()
    directory = tmp_path_factory.mktemp("media")
    shutil.copyfile(make_test_video(), directory / "test.webm")
    return directory


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    require_tools()
    async with chromium() as b:
        yield b


# -- the tests -------------------------------------------------------------------------
async def test_watch_party_stays_in_sync(browser: Any, media_dir: Path) -> None:
    """Two pages in one room stay within 100 ms of each other after play, pause and seek."""
    async with pages_hub(media=media_dir) as hub:
        ctx_a, alice = await open_demo(browser, hub, "alice", "?media=/media/test.webm")
        await alice.click("#create")
        await alice.wait_for_function("() => !!window.revengeDemo.party.roomId")
        room_id = await alice.evaluate("() => window.revengeDemo.party.roomId")
        ctx_b, bob = await open_demo(browser, hub, "bob", f"?room={room_id}")
        await bob.click("#join")
        await bob.wait_for_function("() => window.revengeDemo.party.roomId !== null")
        ready = """() => {
          const m = [...window.revengeDemo.party.members.values()];
          return m.length === 2 && m.every((x) => x.is_ready);
        }"""
        await alice.wait_for_function(ready, timeout=15_000)
        assert await bob.locator("#room-id").text_content() == room_id

        # Play: both start at the scheduled server time.
        await alice.click("#play")
        playing = (
            "() => !window.revengeDemo.video.paused && window.revengeDemo.video.currentTime > 0.8"
        )
        await asyncio.gather(alice.wait_for_function(playing), bob.wait_for_function(playing))
        await assert_together(alice, bob)

        # Pause (by the other member: shared control): both stop at the same frame.
        await bob.click("#pause")
        paused = (
            "() => window.revengeDemo.video.paused"
            " && window.revengeDemo.party.state?.state === 'paused'"
        )
        await asyncio.gather(alice.wait_for_function(paused), bob.wait_for_function(paused))
        await asyncio.sleep(0.3)
        await assert_together(alice, bob, seconds=0.6)

        # Seek while paused, then play again, then seek while playing.
        await alice.evaluate("() => window.revengeDemo.party.seek(20)")
        at20 = "() => Math.abs(window.revengeDemo.video.currentTime - 20) < 0.05"
        await asyncio.gather(alice.wait_for_function(at20), bob.wait_for_function(at20))
        await bob.click("#play")
        after = (
            "() => !window.revengeDemo.video.paused && window.revengeDemo.video.currentTime > 20.5"
        )
        await asyncio.gather(alice.wait_for_function(after), bob.wait_for_function(after))
        await assert_together(alice, bob, seconds=1.5)
        await bob.evaluate("() => window.revengeDemo.party.seek(5)")
        back = """() => {
          const v = window.revengeDemo.video;
          return !v.paused && v.currentTime > 5.5 && v.currentTime < 12;
        }"""
        await asyncio.gather(alice.wait_for_function(back), bob.wait_for_function(back))
        worst = await assert_together(alice, bob, seconds=2.0)
        print(f"worst difference after the seek: {worst * 1000:.1f} ms")

        # A member whose connection drops comes back, re-joins and follows the next command.
        await bob.evaluate("() => window.revengeDemo.client.dropConnection('test')")
        await bob.wait_for_function(
            "() => window.revengeDemo.client.connected"
            " && window.revengeDemo.client.stats.connects >= 2"
        )
        await alice.click("#pause")
        await asyncio.gather(alice.wait_for_function(paused), bob.wait_for_function(paused))
        await asyncio.sleep(0.3)
        await assert_together(alice, bob, seconds=0.6)

        # The rate controls were not needed to get there: no seek loops, few rate changes.
        stats = await alice.evaluate(
            "() => ({seeks: window.revengeDemo.party.controller.seeks,"
            " flips: window.revengeDemo.party.controller.directionChanges})"
        )
        assert stats["flips"] <= 2, stats
        assert alice.errors == [] and bob.errors == []
        await ctx_a.close()
        await ctx_b.close()


async def test_offline_page_recovers_missed_notifications(browser: Any) -> None:
    """A page that goes offline and comes back shows each notification it missed once,
    and acknowledges them (the hub stops re-sending)."""
    from revenge_ws.app import STORE

    async with pages_hub() as hub:
        ctx, page = await open_demo(browser, hub, "carol")
        first = await hub.notify("carol", "Welcome back", body="before going offline")
        await page.wait_for_function(
            "(id) => window.revengeDemo.acked.has(id)", arg=first, timeout=10_000
        )
        assert await page.locator(f'.toast[data-id="{first}"]').count() == 1

        await ctx.set_offline(True)
        await page.wait_for_function("() => !window.revengeDemo.client.connected")
        missed = [
            await hub.notify("carol", "New episode", body="S02E04 is ready", priority="high"),
            await hub.notify("carol", "Transcode done", body="Movie (1080p)"),
        ]
        await asyncio.sleep(0.5)
        assert await page.evaluate("() => window.revengeDemo.shown.length") == 1

        await ctx.set_offline(False)
        await page.wait_for_function(
            "(ids) => ids.every((id) => window.revengeDemo.acked.has(id))",
            arg=missed,
            timeout=15_000,
        )
        shown = await page.evaluate("() => window.revengeDemo.shown")
        assert shown == [first, *missed]
        assert await page.locator("#inbox li[data-id]").count() == 3
        stats = await page.evaluate("() => window.revengeDemo.client.stats")
        assert stats["connects"] >= 2
        # Redelivered directly and replayed by the recovery: the duplicate was dropped.
        assert stats["duplicates"] >= 1, stats
        assert await hub.app[STORE].pending("carol", 10) == []
        assert page.errors == []
        await ctx.close()


async def test_demo_shows_who_is_online(browser: Any) -> None:
    """The demo's "Who's online" panel lists a user who connects elsewhere (here with the
    Python client) from ``activity.presence``, and drops them once their last connection
    has been closed for the offline grace."""
    from revenge_ws.client import Client

    env = {"REVENGE_ACTIVITY_OFFLINE_GRACE": "1", "REVENGE_ACTIVITY_PRESENCE_WINDOW": "0.2"}
    async with pages_hub(make_settings(env)) as hub:
        ctx, page = await open_demo(browser, hub, "alice")
        # The page subscribes `activity` once connected; presence starts from there.
        await page.wait_for_function("() => 'activity' in window.revengeDemo.client.positions()")
        bob_online = '#online li[data-user="bob"]'
        async with Client(
            f"ws://127.0.0.1:{hub.port}/api/v1/ws", token=hub.token("bob", name="Bob")
        ) as bob:
            await bob.wait_connected(10)
            await page.wait_for_selector(bob_online, timeout=10_000)
        assert await page.locator(bob_online).text_content() == "Bob"
        assert "Bob came online" in (await page.locator("#presence-feed").text_content() or "")
        await page.wait_for_selector(bob_online, state="detached", timeout=15_000)
        assert "Bob went offline" in (await page.locator("#presence-feed").text_content() or "")
        count = await page.evaluate("() => window.revengeDemo.online.size")
        assert await page.locator("#online-count").text_content() == str(count)
        assert page.errors == []
        await ctx.close()


async def test_dashboard_shows_a_new_connection(browser: Any) -> None:
    async with pages_hub() as hub:
        context = await browser.new_context(viewport={"width": 1280, "height": 900})
        page = await context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(f"{hub.url}/dashboard?interval=300")
        await page.fill("#token", hub.token("ops", role="admin"))
        await page.click("button[type=submit]")
        number = "() => /^\\d+$/.test(document.getElementById('connections').textContent)"
        await page.wait_for_function(number)
        # The dashboard's own event stream is a connection too: wait until it is counted.
        await page.wait_for_function(
            "() => window.revengeDashboard.info?.connections >= 1"
            " && window.revengeDashboard.client?.connected"
            " && 'activity' in window.revengeDashboard.client.positions()"
        )
        await asyncio.sleep(0.5)
        before = int(await page.locator("#connections").text_content() or "0")
        ws = await hub.raw_connect("dave")
        await page.wait_for_function(
            "(n) => Number(document.getElementById('connections').textContent) === n",
            arg=before + 1,
            timeout=10_000,
        )
        # The online users card lists dave (activity.presence, within a presence window).
        await page.wait_for_selector('#online-users li[data-user="dave"]', timeout=10_000)
        assert await page.locator("#health-text").text_content() == "ready"
        assert await page.locator("#chart polyline").count() == 3
        # A room appears in the rooms table.
        await ws.receive_json(timeout=5)
        await ws.send_json(
            {
                "type": "syncplay.create",
                "id": "c1",
                "data": {"name": "Friday movie", "content": {"type": "movie", "id": "m1"}},
            }
        )
        await page.wait_for_function(
            "() => document.getElementById('rooms').textContent.includes('Friday movie')",
            timeout=10_000,
        )
        await ws.close()
        await page.wait_for_function(
            "(n) => Number(document.getElementById('connections').textContent) === n",
            arg=before,
            timeout=10_000,
        )
        assert errors == []
        await context.close()


async def test_remote_control_between_two_pages_of_one_user(browser: Any, media_dir: Path) -> None:
    """Contract §13 in the browser: two demo pages of one user are two devices. Page A
    pauses page B's video from "My devices" (B's video is paused within 1 s), plays it
    again, then continues it on A ("Play here"); the dashboard's "Now playing" table (admin)
    lists both devices."""
    async with pages_hub(media=media_dir) as hub:
        ctx_a, a = await open_demo(browser, hub, "erin", "?device=Laptop")
        ctx_b, b = await open_demo(browser, hub, "erin", "?device=TV&media=/media/test.webm")
        active = "() => window.revengeDemo.client.deviceActive"
        await asyncio.gather(a.wait_for_function(active), b.wait_for_function(active))
        device_id = "() => window.revengeDemo.client.deviceConfig.device_id"
        a_id, b_id = await asyncio.gather(a.evaluate(device_id), b.evaluate(device_id))
        assert a_id != b_id

        # B plays a video on its own; A sees it in "My devices" (device.updated).
        await b.click("#local-play")
        await b.wait_for_function(
            "() => !window.revengeDemo.video.paused && window.revengeDemo.video.currentTime > 0.5",
            timeout=10_000,
        )
        row = f'#devices li[data-device="{b_id}"]'
        await a.wait_for_selector(f'{row}[data-state="playing"]', timeout=10_000)
        assert "test.webm" in (await a.locator(f"{row} .what").text_content() or "")
        assert await a.locator(f'#devices li[data-device="{a_id}"].self').count() == 1

        # Pause by remote command: B's video stops within the contract's second.
        await a.click(f'{row} button[data-cmd="pause"]')
        await b.wait_for_function(
            "() => window.revengeDemo.video.paused", timeout=1_000, polling=20
        )
        await a.wait_for_function(
            "() => window.revengeDemo.lastCommand?.result?.ok === true", timeout=5_000
        )
        assert await a.evaluate("() => window.revengeDemo.lastCommand.result.state.state") == (
            "paused"
        )
        log = await b.evaluate("() => window.revengeDemo.remoteLog")
        assert [e["command"] for e in log] == ["pause"]
        assert log[0]["from"] == {"user_id": "erin", "device_id": a_id}
        await a.wait_for_selector(f'{row}[data-state="paused"]', timeout=5_000)

        # Play again, then continue it on A: A plays the item, B is paused.
        await a.click(f'{row} button[data-cmd="unpause"]')
        await b.wait_for_function("() => !window.revengeDemo.video.paused", timeout=5_000)
        await a.wait_for_selector(f'{row}[data-state="playing"]', timeout=5_000)
        await a.click(f'{row} button[data-cmd="here"]')
        await a.wait_for_function(
            "() => !window.revengeDemo.video.paused"
            " && window.revengeDemo.video.getAttribute('src') === '/media/test.webm'"
            " && window.revengeDemo.video.currentTime > 1",
            timeout=10_000,
        )
        await b.wait_for_function("() => window.revengeDemo.video.paused", timeout=5_000)

        # The dashboard (admin) lists both devices of erin in "Now playing".
        ctx_d = await browser.new_context(viewport={"width": 1280, "height": 900})
        dash = await ctx_d.new_page()
        dash_errors: list[str] = []
        dash.on("pageerror", lambda exc: dash_errors.append(str(exc)))
        await dash.goto(f"{hub.url}/dashboard?interval=1000")
        await dash.fill("#token", hub.token("ops", role="admin"))
        await dash.click("button[type=submit]")
        for dev in (a_id, b_id):
            await dash.wait_for_selector(
                f'#now-playing tr[data-device="erin/{dev}"]', timeout=10_000
            )
        await dash.wait_for_selector(
            f'#now-playing tr[data-device="erin/{a_id}"][data-state="playing"]', timeout=10_000
        )
        text = await dash.locator(f'#now-playing tr[data-device="erin/{a_id}"]').text_content()
        assert "Laptop" in (text or "") and "direct" in (text or "")
        assert a.errors == [] and b.errors == [] and dash_errors == []
        for ctx in (ctx_a, ctx_b, ctx_d):
            await ctx.close()
