"""The public API: each public module's ``__all__`` is exactly the set documented in
``docs/client.md`` ("Public API"), and every name in it imports."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "client.md"

PUBLIC = {
    "revenge_ws.client": {
        "Client",
        "ClientConfig",
        "ClientStats",
        "ClockSample",
        "ClockSync",
        "OnlineUsers",
        "PresenceData",
        "PresenceUser",
        "ReconnectPolicy",
        "SubscribeError",
        "advised_window",
        "backoff_delay",
        "parse_presence",
        "reconnect_delay",
        "restart_delay",
    },
    "revenge_ws.client.syncplay": {
        "Action",
        "Player",
        "SyncConfig",
        "SyncController",
        "SyncPlayDriver",
        "Timeline",
    },
    "revenge_ws.publisher": {"Publisher"},
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_all_is_the_public_set_and_every_name_imports(module: str) -> None:
    mod = importlib.import_module(module)
    assert set(mod.__all__) == PUBLIC[module]
    assert len(mod.__all__) == len(set(mod.__all__))
    for name in mod.__all__:
        assert getattr(mod, name) is not None, name
    star: dict[str, object] = {}
    exec(f"from {module} import *", star)
    assert set(star) - {"__builtins__"} == PUBLIC[module]


def test_the_public_set_is_the_documented_one() -> None:
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("## Public API") :]
    rows = dict(re.findall(r"^\| `(revenge_ws[\w.]*)` \| (.+) \|$", section, re.M))
    documented = {m: set(re.findall(r"`(\w+)`", names)) for m, names in rows.items()}
    assert documented == PUBLIC


def test_public_names_belong_to_the_public_module_or_are_reexported_on_purpose() -> None:
    """A public class or function reports a public module as its home (its ``__module__``
    is the package, or one of the package's private modules), so a private module's
    name never leaks into ``__all__`` by accident from elsewhere in the project."""
    for module, names in PUBLIC.items():
        mod = importlib.import_module(module)
        for name in names:
            home = getattr(getattr(mod, name), "__module__", module)
            assert (
                home == module
                or home.startswith(f"{module}._")
                or home.startswith(f"{module.rsplit('.', 1)[0]}._")
            ), (module, name, home)
