"""The documentation keeps up with the code: every setting is in docs/configuration.md,
whose generated tables are current, and docs/asyncapi.yaml and docs/protocol.md describe
every message type the server handles."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from revenge_ws.app import build_app
from revenge_ws.config import env_names
from revenge_ws.features.web import NODE

from .helpers import make_settings

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
GENERATOR = ROOT / "scripts" / "gen_config_docs.py"
#: Handled by the node itself, outside ``Node.handlers``.
BUILT_IN_REQUESTS = {"ping"}
#: Server-to-client messages of the core that every deployment sends.
CORE_EVENTS = {"welcome", "ack", "error", "pong", "subscription.reset"}
#: What SyncPlay sends: publications on ``playback:{room_id}`` and direct messages.
SYNCPLAY_EVENTS = {
    "syncplay.state",
    "syncplay.command",
    "syncplay.member_joined",
    "syncplay.member_left",
    "syncplay.member_updated",
    "syncplay.room_updated",
    "syncplay.chat",
    "syncplay.wait_timeout",
    "syncplay.ended",
    "syncplay.sync",
    "syncplay.kicked",
    "syncplay.joined",
}


def _words(text: str) -> set[str]:
    """Every backquoted word of a Markdown text."""
    return set(re.findall(r"`([^`\s]+)`", text))


def test_every_setting_is_documented() -> None:
    words = _words((DOCS / "configuration.md").read_text(encoding="utf-8"))
    names = env_names()
    missing_env = sorted(env for env in names if env not in words)
    missing_key = sorted(key for key in names.values() if key not in words)
    assert not missing_env, f"docs/configuration.md lacks {missing_env}"
    assert not missing_key, f"docs/configuration.md lacks {missing_key}"
    # The YAML-only map too.
    assert "history.families" in (DOCS / "configuration.md").read_text(encoding="utf-8")


def test_configuration_tables_are_current() -> None:
    """``gen_config_docs.py --check`` passes: the generated tables match config.py."""
    run = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr or run.stdout


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_config_docs", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_check_notices_a_stale_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = _generator()
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    row = "| `server.port` | `REVENGE_SERVER_PORT` |"
    assert row in text
    stale = tmp_path / "configuration.md"
    stale.write_text(text.replace(row, "| `server.port` | `REVENGE_PORT` |"), encoding="utf-8")
    monkeypatch.setattr(gen, "DOC", stale)
    assert gen.main(["--check"]) == 1
    assert gen.main([]) == 0  # rewrites the tables...
    assert gen.main(["--check"]) == 0  # ...which are current again
    assert stale.read_text(encoding="utf-8") == text


@pytest.fixture(scope="module")
def asyncapi() -> dict[str, Any]:
    doc = yaml.safe_load((DOCS / "asyncapi.yaml").read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    assert str(doc.get("asyncapi", "")).startswith("3.")
    return doc


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _deref(doc: dict[str, Any], node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        node = _resolve(doc, node["$ref"])
    return node


def _message_types(doc: dict[str, Any], action: str) -> set[str]:
    """Wire ``type`` names of the messages of every operation with this ``action``."""
    types: set[str] = set()
    for name, op in doc["operations"].items():
        assert op["action"] in ("send", "receive"), name
        if op["action"] != action:
            continue
        channel = _deref(doc, op["channel"])
        assert "messages" in channel, name
        for ref in op.get("messages", []):
            msg = _deref(doc, ref)
            types.add(msg["name"])
            const = _deref(doc, msg["payload"])["properties"]["type"]
            if "const" in const:
                assert const["const"] == msg["name"], msg["name"]
    return types


def test_asyncapi_lists_every_handled_message(asyncapi: dict[str, Any]) -> None:
    app = build_app(make_settings())
    handled = set(app[NODE].handlers) | BUILT_IN_REQUESTS
    received = _message_types(asyncapi, "receive")
    missing = sorted(handled - received)
    assert not missing, f"docs/asyncapi.yaml does not describe {missing}"


def test_asyncapi_lists_core_server_messages(asyncapi: dict[str, Any]) -> None:
    sent = _message_types(asyncapi, "send")
    missing = sorted(CORE_EVENTS - sent)
    assert not missing, f"docs/asyncapi.yaml does not describe {missing}"


def test_asyncapi_lists_syncplay_server_messages(asyncapi: dict[str, Any]) -> None:
    sent = _message_types(asyncapi, "send")
    missing = sorted(SYNCPLAY_EVENTS - sent)
    assert not missing, f"docs/asyncapi.yaml does not describe {missing}"


def test_protocol_md_names_every_message() -> None:
    app = build_app(make_settings())
    names = set(app[NODE].handlers) | BUILT_IN_REQUESTS | CORE_EVENTS | SYNCPLAY_EVENTS
    words = _words((DOCS / "protocol.md").read_text(encoding="utf-8"))
    missing = sorted(names - words)
    assert not missing, f"docs/protocol.md does not mention {missing}"


def test_asyncapi_has_the_three_endpoints(asyncapi: dict[str, Any]) -> None:
    addresses = {ch.get("address") for ch in asyncapi["channels"].values()}
    assert {
        "/api/v1/ws",
        "/api/v1/ws/playback/{room_id}",
        "/api/v1/ws/transcode/{job_id}",
    } <= addresses


def test_asyncapi_references_resolve(asyncapi: dict[str, Any]) -> None:
    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                _resolve(asyncapi, node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(asyncapi)
