"""The benchmark suite keeps working: a tiny fan-out + latency run of the hub and the
bare aiohttp baseline (20 subscribers, 20 publications, short windows).

No timing is asserted — only that every step completes and produces numbers (about
10 s; 20 s under coverage). Needs neither matplotlib nor python-socketio (the smoke
preset skips both)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from bench.run import main


def run_bench(tmp_path: Path, *phases: str) -> tuple[dict[str, Any], Path]:
    """``python -m bench --smoke --phases ...`` into ``tmp_path``: the results (the run
    must succeed and leave the caller's CPU affinity as it was) and the Markdown file."""
    affinity = os.sched_getaffinity(0)
    md, raw = tmp_path / "benchmarks.md", tmp_path / "results.json"
    out = ["--no-plot", "--out-md", str(md), "--out-json", str(raw)]
    code = main(["--smoke", "--phases", *phases, *out])
    results: dict[str, Any] = json.loads(raw.read_text())
    assert code == 0, results["errors"]
    assert os.sched_getaffinity(0) == affinity  # the caller's CPU affinity is restored
    return results, md


@pytest.mark.timeout(60)
def test_fanout_and_latency_smoke(tmp_path: Path) -> None:
    results, md = run_bench(tmp_path, "fanout")

    assert set(results["fanout"]) == {"hub", "aiohttp-frame"}
    for kind, res in results["fanout"].items():
        assert res["subscribers"] == 20, kind
        tp = res["throughput"]
        assert tp["publications"] == 20, kind
        # CPU comes from /proc in 10 ms ticks: a smoke-sized run may see none.
        assert tp["deliveries"] > 0 and tp["server_us_per_delivery"] >= 0, (kind, tp)
        assert tp["lost"] == 0 and tp["drained"], (kind, tp)
        (step,) = res["latency"]
        assert step["rate"] == 20 and step["publications"] == 20, (kind, step)
        assert step["samples"] == step["expected"] == 20 * 20, (kind, step)
        assert 0 < step["p50_ms"] <= step["p99_ms"] <= step["max_ms"], (kind, step)
        assert res["closed_by_server"] == 0, (kind, res)
    meta = results["meta"]
    assert meta["nproc"] and meta["python"] and meta["aiohttp"]
    assert len(meta["loadavg_start"]) == 3

    floor = results["floor"]  # the plain send() loop ran over the same 20 sockets
    assert floor["subscribers"] == 20 and floor["delivered_bytes"] == floor["expected_bytes"]

    text = md.read_text()
    assert "## Fan-out: 20 subscribers" in text
    assert "## Goals" in text and "publish-to-receive p99" in text
    assert "python -m bench --smoke" in text


@pytest.mark.timeout(60)
def test_idle_memory_breakdown_smoke() -> None:
    """``bench/idle_memory.py`` keeps working: 20 idle connections, a table per frame."""
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-m", "bench.idle_memory", "--connections", "20", "--settle", "0.5"],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "engine direct: 20 idle connections" in run.stdout
    assert "| bytes / connection |" in run.stdout and "by package: " in run.stdout


@pytest.mark.timeout(120)
def test_reconnect_cost_smoke(tmp_path: Path) -> None:
    """``bench/reconnect.py`` keeps working: a few full reconnects against the hub and
    bare handshakes against aiohttp, one JSON result (numbers not judged)."""
    import json
    import subprocess
    import sys

    out = tmp_path / "reconnect.json"
    small = ["--users", "20", "--passes", "1", "--concurrency", "4"]
    run = subprocess.run(
        [sys.executable, "-m", "bench.reconnect", *small, "--quiet", "--out-json", str(out)],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["errors"] == []
    assert result["hub"]["reconnects"] == 20 and result["bare"]["reconnects"] == 20
    # CPU comes from /proc in 10 ms ticks: a smoke-sized run may see none (ratio None).
    assert result["hub"]["server_us"] >= 0 and result["bare"]["server_us"] >= 0
    assert result["ratio"] is None or result["ratio"] >= 0
