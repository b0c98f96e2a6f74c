"""The layout's rules, checked by reading every module's imports: core/ never imports service/; the
request path in core/ never imports the offline rooms (core/history/, core/offline/) or a training
library; every room says in its __init__ what it holds and what it may import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

OFFLINE_ROOMS = ("core.history", "core.offline")
TRAINING_LIBRARIES = ("lightgbm", "pyarrow", "matplotlib", "tqdm")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in the file (inside functions too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = module_name(path).split(".")
                base = base[:len(base) - node.level + (path.name == "__init__.py")]
                names.add(".".join([*base, node.module] if node.module else base))
            elif node.module:
                names.add(node.module)
                names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def modules(package: str) -> list[Path]:
    return sorted((REPO / package.replace(".", "/")).rglob("*.py"))


REQUEST_PATH = [p for p in modules("core") if not within(module_name(p), OFFLINE_ROOMS)]


@pytest.mark.parametrize("path", modules("core"), ids=lambda p: module_name(p))
def test_core_never_imports_service(path: Path) -> None:
    assert not {name for name in imported(path) if within(name, ("service",))}


@pytest.mark.parametrize("path", REQUEST_PATH, ids=lambda p: module_name(p))
def test_the_request_path_in_core_never_imports_offline_rooms_or_training_libraries(path: Path) -> None:
    wrong = {name for name in imported(path) if within(name, OFFLINE_ROOMS + TRAINING_LIBRARIES)}
    assert not wrong, f"{module_name(path)} imports {sorted(wrong)}"


def test_the_checks_see_what_they_look_for(tmp_path: Path) -> None:
    # The reader finds imports inside functions and relative ones, so the rules above can fail.
    probe = REPO / "core" / "features" / "_layout_probe.py"
    probe.write_text("def f():\n    from core.offline import train\n    import service.runtime.app\n"
                     "from ..history import table\n")
    try:
        names = imported(probe)
    finally:
        probe.unlink()
    assert {"core.offline", "service.runtime.app", "core.history"} <= names
    assert within("core.history.table", OFFLINE_ROOMS) and not within("core.historyx", OFFLINE_ROOMS)


def test_serve_loads_no_offline_room_and_no_training_library() -> None:
    # What `fraudscore serve` imports, in a fresh interpreter.
    code = ("import sys, service.runtime.server, service.cli.main\n"
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {TRAINING_LIBRARIES!r} "
            f"or any(m == r or m.startswith(r + '.') for r in {OFFLINE_ROOMS!r}))\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("init", sorted({*(REPO / "core").rglob("__init__.py"), *(REPO / "service").rglob("__init__.py")}),
                         ids=lambda p: module_name(p))
def test_every_room_says_what_it_holds_and_may_import(init: Path) -> None:
    doc = ast.get_docstring(ast.parse(init.read_text()))
    assert doc, f"{module_name(init)} has no docstring"
    assert "import" in doc, f"{module_name(init)}'s docstring does not say what it may import"
