"""The devices benchmark keeps working: ``python -m bench --smoke --phases devices`` —
remote commands with 5 devices at 10/s each for 1.5 s (same node; across two nodes when a
redis-server binary is there, always under CI) and the ``playback.update`` storm with 20
devices reporting every 2 s (without and with the backend receiver, and the floor), about
a minute.

Asserts outcomes and structure, never timings: every command answered ``ok``, every
update acked, the backend got every event once, and the devices section was spliced into
the Markdown file without touching the rest."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from bench.run import main


@pytest.mark.timeout(240)
def test_devices_smoke(tmp_path: Path) -> None:
    parts = ["same", "cross", "playback", "backend", "floor"]
    if shutil.which("redis-server") is None and not os.environ.get("CI"):
        parts.remove("cross")
    md = tmp_path / "benchmarks.md"
    md.write_text("# Benchmarks\n\n## Goals\n\nkept\n\n## Method\n\nkept too\n")
    raw = tmp_path / "results.json"
    affinity = os.sched_getaffinity(0)
    code = main(
        [
            "--smoke",
            "--phases",
            "devices",
            "--devices-parts",
            ",".join(parts),
            "--no-plot",
            "--out-md",
            str(md),
            "--out-json",
            str(raw),
        ]
    )
    results = json.loads(raw.read_text())
    assert code == 0, results["errors"]
    assert os.sched_getaffinity(0) == affinity
    dev = results["devices"]
    assert dev["errors"] == []
    assert sorted(dev["remote"]) == sorted(p for p in parts if p in ("same", "cross"))
    for name, r in dev["remote"].items():
        where = (name, r)
        assert r["devices"] == 5 and r["sent"] > 0, where
        assert r["ok"] == r["sent"] and r["errors"] == {} and r["unanswered"] == 0, where
        assert r["device_answered"] >= r["sent"] and r["device_errors"] == {}, where
        lat = r["latency"]
        assert 0 < lat["p50_ms"] <= lat["p99_ms"] <= lat["max_ms"], where
        assert len(r["hub_cpu_s"]) == (2 if name == "cross" else 1), where
    assert sorted(dev["playback"]) == ["backend", "floor", "playback"]
    for name, r in dev["playback"].items():
        where = (name, r)
        assert r["devices"] == 20 and r["sent"] == 20 * 2 == r["acked"], where
        assert r["errors"] == {} and r["unanswered"] == 0, where
        assert r["hub_us_per_update"] >= 0, where
        if name != "floor":  # every update's device.updated reached its device
            assert r["device_updated"] >= 20, where
    b = dev["playback"]["backend"]["backend"]
    assert b["events_total"] == 40 and b["duplicates"] == 0 and b["bad_auth"] == 0, b

    text = md.read_text()
    assert "## Devices and remote control" in text
    assert "### Remote command round trip: 5 devices" in text
    assert "### playback.update storm: 20 devices" in text
    assert "kept\n" in text and "kept too" in text  # only the devices section was written
    assert text.index("## Goals") < text.index("## Devices and remote") < text.index("## Method")
