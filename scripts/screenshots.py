"""Take the screenshots of docs/js-client.md: docs/demo.png and docs/dashboard.png.

    python scripts/screenshots.py [--out docs]

Uses the machinery of tests/test_browser.py: a real hub (in this process) serving the
pages, Debian's headless Chromium through Playwright, and a test video made by ffmpeg.
Needs: apt-get install chromium ffmpeg; pip install playwright (no browser download).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers import make_settings  # noqa: E402
from tests.test_browser import (  # noqa: E402
    PagesHub,
    chromium,
    make_test_video,
    missing_tools,
    open_demo,
    pages_hub,
)

#: A short offline grace, so that a user who leaves shows in the "Who's online" feed.
SETTINGS_ENV = {"REVENGE_ACTIVITY_OFFLINE_GRACE": "2", "REVENGE_ACTIVITY_PRESENCE_WINDOW": "0.5"}


async def connect_as(hub: PagesHub, sub: str, name: str) -> object:
    """A bare WebSocket connection of ``sub`` (closed with the hub), named ``name``."""
    ws = await hub.session.ws_connect(
        f"{hub.url}/api/v1/ws?token={hub.token(sub, name=name)}", protocols=["revenge.v1"]
    )
    hub.sockets.append(ws)
    return ws


async def traffic(hub: object, stop: asyncio.Event) -> None:
    """Viewers that come and go, publications they receive and server events, so the
    dashboard's chart and event log move."""
    n = 0
    sockets: list[object] = []
    while not stop.is_set():
        n += 1
        await hub.backend(  # type: ignore[attr-defined]
            "POST",
            "/api/v1/realtime/publish",
            {"channel": "activity", "type": "activity.user_watching", "data": {"n": n}},
        )
        if n % 3 == 0 and len(sockets) < 8:
            ws = await hub.raw_connect(f"viewer{n}")  # type: ignore[attr-defined]
            await ws.send_json({"type": "subscribe", "id": "s", "data": {"channels": ["activity"]}})
            sockets.append(ws)
        if n % 11 == 0 and len(sockets) > 4:
            await sockets.pop(0).close()  # type: ignore[attr-defined]
        for ws in sockets:
            await ws.send_json({"type": "ping", "data": {"t0": 0}})  # type: ignore[attr-defined]
        if n % 20 == 0:
            await hub.backend(  # type: ignore[attr-defined]
                "POST",
                "/api/v1/realtime/publish",
                {
                    "channel": "server",
                    "type": "library.scan.progress",
                    "data": {"library_id": "movies", "progress": min(100, n)},
                },
            )
        await asyncio.sleep(0.2)


async def main(out: Path) -> None:
    media = Path(tempfile.mkdtemp(prefix="revenge-media-"))
    shutil.copyfile(make_test_video(size="640x360", bitrate="900k"), media / "movie.webm")
    settings = make_settings(SETTINGS_ENV)
    async with pages_hub(settings, media=media) as hub, chromium() as browser:
        # -- the demo: a watch party with two members, notifications, transcoding
        ctx_a, alice = await open_demo(browser, hub, "alice", "?media=/media/movie.webm")
        await alice.fill("#room-name", "Friday movie night")
        await alice.click("#create")
        await alice.wait_for_function("() => !!window.revengeDemo.party.roomId")
        room_id = await alice.evaluate("() => window.revengeDemo.party.roomId")
        ctx_b, bob = await open_demo(browser, hub, "bob", f"?room={room_id}")
        await bob.click("#join")
        await alice.wait_for_function(
            "() => [...window.revengeDemo.party.members.values()].filter(m => m.is_ready)"
            ".length === 2",
            timeout=15_000,
        )
        # My devices / Now playing: alice's TV (a bare connection) plays an episode.
        tv = await connect_as(hub, "alice", "Alice")
        for msg in (
            {
                "type": "device.hello",
                "id": "h",
                "data": {
                    "device_id": "living-room-tv",
                    "name": "Living room TV",
                    "client": "Revenge TV",
                    "version": "2.4.1",
                    "capabilities": {
                        "remote_control": True,
                        "commands": ["pause", "unpause", "seek", "set_volume"],
                    },
                },
            },
            {
                "type": "playback.update",
                "id": "p",
                "data": {
                    "item_id": "ep-204",
                    "item_type": "episode",
                    "title": "The Heist · S02E04",
                    "state": "playing",
                    "position": 1312.5,
                    "duration": 2710,
                    "play_method": "transcode",
                    "transcode_job_id": "ep-204",
                },
            },
        ):
            await tv.send_json(msg)  # type: ignore[attr-defined]
        # Who's online: two more users come online, one of them leaves again.
        await connect_as(hub, "carol", "Carol")
        dave = await connect_as(hub, "dave", "Dave")
        await asyncio.sleep(1.0)
        await dave.close()  # type: ignore[attr-defined]
        await alice.click("#invite")
        await bob.fill("#chat-input", "Popcorn is ready, starting in 3...")
        await bob.click("#chat-form button")
        await alice.click("#play")
        for job, progress, status in (("movie-1080p", 42.5, "encoding"), ("ep-204", 87, "muxing")):
            await hub.backend(
                "POST",
                f"/api/v1/realtime/transcode/{job}",
                {
                    "user_id": "alice",
                    "type": "transcode.progress",
                    "data": {"progress": progress, "status": status, "eta_seconds": 95},
                },
            )
        await asyncio.sleep(3.5)
        await hub.notify("alice", "New episode available", body="S02E04 · The Heist")
        await hub.notify(
            "alice", "Transcode finished", body="Arrival (2016) · 1080p", priority="high"
        )
        await asyncio.sleep(1.2)
        await alice.evaluate("() => window.scrollTo(0, 0)")
        await alice.screenshot(path=str(out / "demo.png"), full_page=True)
        print("wrote", out / "demo.png")

        # -- the dashboard, after a few seconds of traffic
        ctx_d = await browser.new_context(viewport={"width": 1280, "height": 900})
        dash = await ctx_d.new_page()
        await dash.goto(f"{hub.url}/dashboard?interval=500")
        await dash.fill("#token", hub.token("ops", role="admin"))
        await dash.click("button[type=submit]")
        stop = asyncio.Event()
        task = asyncio.create_task(traffic(hub, stop))
        await asyncio.sleep(25)
        await dash.screenshot(path=str(out / "dashboard.png"), full_page=True)
        print("wrote", out / "dashboard.png")
        stop.set()
        await task
        for ctx in (ctx_a, ctx_b, ctx_d):
            await ctx.close()
    shutil.rmtree(media, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    missing = missing_tools()
    if missing:
        sys.exit("missing: " + ", ".join(missing))
    args.out.mkdir(parents=True, exist_ok=True)
    asyncio.run(main(args.out))
