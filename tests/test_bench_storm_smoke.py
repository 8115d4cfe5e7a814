"""The storm benchmark keeps working: ``python -m bench --smoke --phases storm`` with 20
users per scenario (a: restart with the memory broker; b: restart with Redis; c: two
nodes behind the bench's balancer, one SIGKILLed), about 25 s.

Asserts outcomes and structure, never timings: every user that lost its connection is
back, nobody gave up, no gap, the notifications were re-sent and acknowledged, and with
Redis every resubscribed channel came back ``recovered: true``. Without a redis-server
binary only scenario a runs (except under CI, where b and c must run)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from bench.run import main


@pytest.mark.timeout(240)
def test_storm_smoke(tmp_path: Path) -> None:
    scenarios = ["a", "b", "c"]
    if shutil.which("redis-server") is None and not os.environ.get("CI"):
        scenarios = ["a"]
    md = tmp_path / "benchmarks.md"
    md.write_text("# Benchmarks\n\n## Goals\n\nkept\n\n## Method\n\nkept too\n")
    raw = tmp_path / "results.json"
    affinity = os.sched_getaffinity(0)
    code = main(
        [
            "--smoke",
            "--phases",
            "storm",
            "--storm-scenarios",
            ",".join(scenarios),
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
    storm = results["storm"]
    assert sorted(storm["scenarios"]) == scenarios, storm["errors"]
    for name, r in storm["scenarios"].items():
        where = (name, {k: v for k, v in r.items() if k != "acks_s"})
        assert r["clients"] == 20, where
        assert r["movers"] == (20 if name in ("a", "b") else r["nodes_before"]["storm-1"]), where
        assert 0 < r["movers"] == r["back"] == len(r["acks_s"]) == r["closed"], where
        assert r["all_back"] and r["gave_up"] == 0 and r["never_closed"] == 0, where
        assert r["gaps"] == 0 and r["gap_kinds"] == {}, where
        assert r["behind_before_storm"] == 0, where
        assert 0 <= r["p50_s"] <= r["p99_s"] <= r["max_s"], where
        assert r["hub_cpu_s"] >= 0 and r["attempts"] >= r["back"], where
        assert r["publisher"]["ok"] > 0, where
        p = r["presence"]
        assert {"publications", "budget", "by_type", "within_budget"} <= set(p), where
        nt = r["notifications"]
        assert nt["users_with_all_resent"] == nt["users"], where
        assert nt["resent_distinct"] == nt["users"] * 5 == nt["acked"], where
        assert nt["unexpected"] == 0, where
        if name == "c":  # the balancer: processes sharing the port (SO_REUSEPORT)
            assert r["balancer_processes"] >= 2, where
        if name == "a":  # history lost with the node: every entry says so
            assert r["recovered_entries"] == 0, where
            assert sum(r["unrecovered"].values()) == 5 * r["movers"], where
        else:  # Redis kept history: every resubscribed channel recovered, completely
            assert r["recovered_entries"] == 5 * r["movers"], where
            assert r["unrecovered"] == {}, where
    assert storm["scenarios"]["a"]["notifications"]["users"] == 2

    text = md.read_text()
    assert "## Reconnect storm: 20 users come back" in text
    assert "kept\n" in text and "kept too" in text  # only the storm section was written
    assert text.index("## Goals") < text.index("## Reconnect storm") < text.index("## Method")
