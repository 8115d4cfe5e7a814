"""The JavaScript client (clients/js) and the pages the hub serves.

- Node's own test runner runs the client's unit tests (fake WebSocket, virtual clock) and,
  against a real hub started here, its integration tests;
- the copy the hub serves is identical to the canonical one in clients/js;
- the JS and Python clients share their numbers (backoff, close codes, sync hysteresis);
- ``revenge_ws.server.pages`` serves the client, the demo and the dashboard correctly.

Without ``node`` the Node tests skip, except in CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from revenge_ws.client import ClientConfig, ReconnectPolicy
from revenge_ws.client.syncplay import SyncConfig
from revenge_ws.codes import should_reconnect
from revenge_ws.server.pages import PAGES, StaticFiles, install

from .helpers import API_KEY, SECRET, make_settings, running_hub

ROOT = Path(__file__).resolve().parent.parent
JS = ROOT / "clients" / "js"
STATIC = ROOT / "src" / "revenge_ws" / "static"


def node_binary() -> str:
    node = shutil.which("node")
    if node is None:
        if os.environ.get("CI"):
            pytest.fail("node is not installed (CI must install nodejs >= 20)")
        pytest.skip("node is not installed")
    return node


def node_flags(node: str) -> list[str]:
    """Node 20/21 need a flag for the global WebSocket (on by default from 22)."""
    out = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    major = int(out.stdout.strip().lstrip("v").split(".")[0])
    if major < 20:
        pytest.fail(f"the JavaScript client needs Node 20 or later, found {out.stdout.strip()}")
    return ["--experimental-websocket"] if major < 22 else []


def _summary(output: str) -> dict[str, int]:
    return {
        k: int(v) for k, v in re.findall(r"^# (pass|fail|skipped|cancelled) (\d+)$", output, re.M)
    }


async def run_node_tests(files: list[str], env: dict[str, str] | None = None) -> dict[str, int]:
    node = node_binary()
    proc = await asyncio.create_subprocess_exec(
        node,
        *node_flags(node),
        "--test",
        *files,
        cwd=JS,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    text = out.decode(errors="replace")
    counts = _summary(text)
    assert proc.returncode == 0 and counts.get("fail", 1) == 0, text[-6000:]
    return counts


# -- the Node test suites ---------------------------------------------------------------
async def test_unit_tests_pass_in_node() -> None:
    files = sorted(str(p.relative_to(JS)) for p in (JS / "test").glob("*.test.js"))
    files.remove("test/hub.test.js")
    counts = await run_node_tests(files)
    assert counts["pass"] >= 50, counts


async def test_client_against_a_real_hub() -> None:
    node_binary()
    async with running_hub(make_settings()) as hub:
        counts = await run_node_tests(
            ["test/hub.test.js"],
            {
                "REVENGE_TEST_HUB": hub.url,
                "REVENGE_TEST_SECRET": SECRET,
                "REVENGE_TEST_API_KEY": API_KEY,
            },
        )
    assert counts.get("skipped", 0) == 0, counts
    assert counts["pass"] >= 6, counts


async def test_the_devices_example_of_the_docs_runs(tmp_path: Path) -> None:
    """docs/js-client.md "Devices and remote control": the TV + phone example, as printed,
    against a real hub."""
    node = node_binary()
    text = (ROOT / "docs" / "js-client.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```js\n(// A TV that obeys.*?)```", text, re.S)
    assert len(blocks) == 1, "the example is a ```js block starting with '// A TV that obeys'"
    (tmp_path / "devices.mjs").write_text(blocks[0], encoding="utf-8")
    shutil.copyfile(JS / "revenge-ws.js", tmp_path / "revenge-ws.js")
    async with running_hub(make_settings()) as hub:
        proc = await asyncio.create_subprocess_exec(
            node,
            *node_flags(node),
            "devices.mjs",
            cwd=tmp_path,
            env={
                **os.environ,
                "HUB": hub.ws_url,
                "TOKEN": hub.token("alice"),
            },
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "device: Living room TV playing" in text and "device: Phone idle" in text, text
    assert "tv: seek from phone-1 { position: 600 }" in text, text
    assert re.search(
        r"pause: \{\s*ok: true,\s*state: \{ state: 'paused', position: 600 \}", text
    ), text
    assert "set_volume: REJECTED" in text, text


# -- one client, two places ------------------------------------------------------------
@pytest.mark.parametrize("name", ["revenge-ws.js", "revenge-ws.d.ts"])
def test_the_served_copy_is_the_canonical_file(name: str) -> None:
    assert (JS / name).read_bytes() == (STATIC / name).read_bytes(), (
        f"src/revenge_ws/static/{name} differs from clients/js/{name}: "
        "run `npm run sync` in clients/js (clients/js is the canonical copy)"
    )


def test_package_json() -> None:
    pkg = json.loads((JS / "package.json").read_text())
    assert pkg["name"] == "@revenge/ws-client"
    assert pkg["type"] == "module"
    assert pkg["exports"]["."]["default"] == "./revenge-ws.js"
    assert pkg["exports"]["."]["types"] == "./revenge-ws.d.ts"
    assert pkg["scripts"]["test"].startswith("node --test")
    for f in pkg["files"]:
        assert (JS / f).exists(), f


def test_the_js_client_shares_the_python_clients_numbers() -> None:
    node = node_binary()
    script = """
      import * as m from "./revenge-ws.js";
      const codes = [];
      for (let c = 1000; c <= 1015; c++) codes.push([c, m.shouldReconnect(c)]);
      for (let c = 3000; c <= 4999; c += 1) codes.push([c, m.shouldReconnect(c)]);
      console.log(JSON.stringify({policy: m.DEFAULT_POLICY, sync: m.DEFAULT_SYNC_CONFIG,
        codes, none: m.shouldReconnect(null), options: m.DEFAULT_OPTIONS}));
    """
    out = subprocess.run(
        [node, "--input-type=module", "-e", script],
        cwd=JS,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    got = json.loads(out.stdout)
    policy = ReconnectPolicy()
    camel = {
        "backoffMin": policy.backoff_min,
        "backoffMax": policy.backoff_max,
        "restartWindow": policy.restart_window,
        "rateLimitWait": policy.rate_limit_wait,
        "maxWindow": policy.max_window,
        "rateLimitSpread": policy.rate_limit_spread,
    }
    assert got["policy"] == camel
    sync = SyncConfig()
    for f in fields(SyncConfig):
        parts = f.name.split("_")
        key = parts[0] + "".join(p.title() for p in parts[1:])
        assert got["sync"][key] == getattr(sync, f.name), f.name
    for code, js in got["codes"]:
        assert js == should_reconnect(code), code
    assert got["none"] is True
    opts = got["options"]
    assert (opts["requestTimeout"], opts["connectTimeout"], opts["stableAfter"]) == (5, 10, 5)
    assert (opts["refreshMargin"], opts["initialPings"], opts["clockSamples"]) == (60, 3, 8)
    # rtt is the min-delay estimate over this window in both clients.
    assert opts["clockSamples"] == ClientConfig().clock_samples
    assert opts["rateLimitWait"] == policy.rate_limit_wait
    assert opts["rateLimitSpread"] == policy.rate_limit_spread


# -- the pages -------------------------------------------------------------------------
@pytest.fixture
async def pages() -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    app = web.Application()
    install(app)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert server is not None
    port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    async with aiohttp.ClientSession() as s:
        yield s, f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def _get(s: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, Any, bytes]:
    async with s.get(url, allow_redirects=False, **kw) as r:
        return r.status, r.headers, await r.read()


async def test_the_client_is_served(pages: tuple[aiohttp.ClientSession, str]) -> None:
    s, base = pages
    status, headers, body = await _get(s, f"{base}/client/revenge-ws.js")
    assert status == 200
    assert headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert headers["Cache-Control"] == "no-cache"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert body == (JS / "revenge-ws.js").read_bytes()
    etag = headers["ETag"]
    status, headers, body = await _get(
        s, f"{base}/client/revenge-ws.js", headers={"If-None-Match": etag}
    )
    assert (status, body) == (304, b"")
    status, headers, _ = await _get(s, f"{base}/client/revenge-ws.d.ts")
    assert status == 200
    assert headers["Content-Type"].startswith("application/typescript")
    async with s.head(f"{base}/client/revenge-ws.js") as r:
        assert r.status == 200


async def test_pages_and_their_assets(pages: tuple[aiohttp.ClientSession, str]) -> None:
    s, base = pages
    for path in ("/demo", "/dashboard"):
        status, headers, body = await _get(s, base + path)
        assert status == 200, path
        assert headers["Content-Type"] == "text/html; charset=utf-8"
        csp = headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "connect-src 'self'" in csp
        assert "unsafe-inline" not in csp
        assert headers["X-Frame-Options"] == "DENY"
        html = body.decode()
        assert "style=" not in html, "inline styles are blocked by the CSP"
        assert "<script>" not in html, "inline scripts are blocked by the CSP"
        refs = re.findall(r'(?:src|href)="(/(?:assets|client)/[^"]+)"', html)
        assert refs, path
        for ref in refs:
            st, _, _ = await _get(s, base + ref)
            assert st == 200, ref
        # Module imports of the page scripts resolve too.
        for ref in refs:
            if ref.endswith(".js"):
                _, _, js = await _get(s, base + ref)
                for imp in re.findall(r'from "(/[^"]+)"', js.decode()):
                    st, _, _ = await _get(s, base + imp)
                    assert st == 200, imp
    status, headers, _ = await _get(s, f"{base}/demo/")
    assert status == 308 and headers["Location"] == "/demo"
    status, headers, _ = await _get(s, f"{base}/assets/pages.css")
    assert (status, headers["Content-Type"]) == (200, "text/css; charset=utf-8")


@pytest.mark.parametrize(
    "path",
    [
        "/assets/nope.js",
        "/assets/..%2Fpages.py",
        "/assets/%2e%2e%2fserver%2fpages.py",
        "/assets/.hidden.js",
        "/assets/static",
        "/client/other.js",
    ],
)
async def test_nothing_else_is_served(pages: tuple[aiohttp.ClientSession, str], path: str) -> None:
    s, base = pages
    status, _, _ = await _get(s, base + path)
    assert status == 404


def test_static_files_lookup(tmp_path: Path) -> None:
    (tmp_path / "a.js").write_text("export const a = 1;\n")
    files = StaticFiles(tmp_path, cache=False)  # type: ignore[arg-type]
    f = files.get("a.js")
    assert f is not None and f.content_type == "text/javascript" and f.charset == "utf-8"
    (tmp_path / "a.js").write_text("export const a = 2;\n")
    g = files.get("a.js")
    assert g is not None and g.etag != f.etag, "cache=False re-reads"
    for bad in ("../a.js", "a", ".a.js", "sub/a.js", "a.js/"):
        assert files.get(bad) is None, bad
    assert files.get("missing.js") is None
    assert set(PAGES.values()) <= {p.name for p in STATIC.iterdir()}


async def test_pages_on_the_real_app() -> None:
    """With the real application (SyncPlay and all): the routes do not collide."""
    from revenge_ws.app import build_app

    app = build_app(make_settings())
    if not any(getattr(r.resource, "canonical", None) == "/demo" for r in app.router.routes()):
        install(app)
    canon = {getattr(r.resource, "canonical", None) for r in app.router.routes()}
    assert set(PAGES) <= canon
