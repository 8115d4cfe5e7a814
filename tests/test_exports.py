"""The public API: each public module's ``__all__`` is exactly the set documented in
``docs/client.md`` ("Public API"), and every name in it imports."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "client.md"


def documented() -> dict[str, set[str]]:
    """``module -> names`` from the table of the "Public API" section."""
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("## Public API") :]
    rows = re.findall(r"^\| `(revenge_ws[\w.]*)` \| (.+) \|$", section, re.M)
    return {module: set(re.findall(r"`(\w+)`", names)) for module, names in rows}


def test_the_public_modules_are_documented() -> None:
    assert set(documented()) == {
        "revenge_ws.client",
        "revenge_ws.client.syncplay",
        "revenge_ws.publisher",
    }


@pytest.mark.parametrize("module", sorted(documented()))
def test_all_is_the_documented_set_and_every_name_imports(module: str) -> None:
    names = documented()[module]
    mod = importlib.import_module(module)
    assert sorted(mod.__all__) == sorted(names)  # no repeats, nothing missing or extra
    for name in mod.__all__:
        assert getattr(mod, name) is not None, name
    star: dict[str, object] = {}
    exec(f"from {module} import *", star)
    assert set(star) - {"__builtins__"} == names


@pytest.mark.parametrize("module", sorted(documented()))
def test_public_names_are_defined_in_the_public_package(module: str) -> None:
    """Every public class or function lives in the module or one of its package's
    private modules: nothing of the rest of the project leaks into ``__all__``."""
    package = module if module == "revenge_ws.client" else module.rsplit(".", 1)[0]
    mod = importlib.import_module(module)
    for name in mod.__all__:
        home = getattr(getattr(mod, name), "__module__", module)
        assert home == module or home.startswith(f"{package}._"), (module, name, home)
