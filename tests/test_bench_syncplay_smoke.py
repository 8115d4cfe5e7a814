"""The SyncPlay benchmarks keep working: ``bench/syncplay_skew.py --quick`` (4 members behind
fault proxies with skewed clocks, symmetric and asymmetric links) and
``bench/syncplay_rooms.py --quick`` (4 rooms x 5 members in 2 worker processes), run side by
side as subprocesses.

No timing is asserted — only that both complete, produce numbers, and that every member had
every ``play``/``seek``/``unpause`` command before its ``when`` (in both benches)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _spawn(script: str, out: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REVENGE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("COVERAGE_PROCESS_START", None)
    return subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / script), "--quick", "--silent", "--json", str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _finish(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, str]:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        output = _stop(proc)
        text = output.decode(errors="replace")
        raise AssertionError(f"{proc.args!r} did not finish:\n{text}") from None
    return proc.returncode, output.decode(errors="replace")


def _stop(proc: subprocess.Popen[bytes]) -> bytes:
    """SIGTERM first: the benches then stop their hub, workers and proxies."""
    proc.terminate()
    try:
        output, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate(timeout=10)
    return output or b""


@pytest.mark.timeout(150)
def test_syncplay_benches_quick(tmp_path: Path) -> None:
    skew_json, rooms_json = tmp_path / "skew.json", tmp_path / "rooms.json"
    procs = [_spawn("syncplay_skew.py", skew_json), _spawn("syncplay_rooms.py", rooms_json)]
    try:
        (skew_code, skew_out), (rooms_code, rooms_out) = (_finish(p, 120) for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                _stop(p)

    # -- start skew: both scenarios ran, every member got every command before `when`.
    skew = json.loads(skew_json.read_text())
    assert skew_code == 0, (skew["errors"], skew_out[-3000:])
    assert skew["errors"] == []
    runs = {r["scenario"]: r for r in skew["runs"]}
    assert set(runs) == {"symmetric", "asymmetric"}
    for name, run in runs.items():
        assert run["members"] == 4, name
        timed = [c for c in run["commands"] if c["command"] != "pause"]
        assert [c["command"] for c in timed] == ["play", "seek", "unpause"], name
        for c in timed:
            assert c["complete"] and c["received"] == c["started"] == 4, (name, c)
            assert c["all_before_when"] and c["arrival_late_max_ms"] < 0, (name, c)
            assert c["spread_ms"] is not None and c["spread_ms"] >= 0, (name, c)
        assert run["all_before_when"], name
        assert len(run["per_member"]) == 4 and run["bound_ms"] >= 20, name
    assert runs["symmetric"]["ntp_floor_ms"] == 0
    assert runs["asymmetric"]["ntp_floor_ms"] > 0

    # -- rooms: every command reached every member; numbers are there.
    rooms = json.loads(rooms_json.read_text())
    assert rooms_code == 0, (rooms["errors"], rooms_out[-3000:])
    assert rooms["errors"] == []
    assert rooms["setup"]["connected"] == rooms["setup"]["joined"] == 20
    (phase,) = rooms["phases"]
    lat = phase["latency"]
    assert lat["commands"] > 0 and lat["incomplete"] == 0, lat
    # every play/seek reached every member before its `when`
    assert lat["scheduled"] > 0 and lat["after_when"] == 0, lat
    assert 0 < lat["last_p50_ms"] <= lat["last_p99_ms"] <= lat["last_max_ms"], lat
    assert phase["hub"]["cpu_percent"] > 0 and len(phase["workers"]) == 2
    assert all(w["disconnected"] == 0 for w in phase["workers"]), phase["workers"]
