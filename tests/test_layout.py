"""The package's layering: studies are clients of the core, through the core's public names only."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_moe"
STUDIES = PACKAGE / "studies"


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """``(module, names, line)`` of every absolute import of ``lightning_moe`` in a file, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("lightning_moe"):
            found.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("lightning_moe")]
    return found


def _core_files() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if STUDIES not in p.parents]


def _study_files() -> list[Path]:
    return sorted(STUDIES.rglob("*.py"))


def test_the_scan_sees_both_sides():
    """Guards the two tests below against passing on an empty file list."""
    assert len(_core_files()) > 30 and len(_study_files()) > 10


def test_no_core_module_imports_from_the_studies():
    offending = [
        f"{p.relative_to(PACKAGE.parent)}:{line} imports {module}"
        for p in _core_files() for module, _, line in _imports(p)
        if module == "lightning_moe.studies" or module.startswith("lightning_moe.studies.")
    ]
    assert offending == []


def _public(module: str, name: str) -> bool:
    """A name is public when a package (or top-level module) of the core lists it in ``__all__``."""
    if module.count(".") > 1 and not module.startswith("lightning_moe.studies"):
        return False  # a private submodule path such as lightning_moe.callbacks.coupling
    return name in getattr(importlib.import_module(module), "__all__", ())


def test_study_code_uses_only_the_core_public_names():
    offending = []
    for p in _study_files():
        for module, names, line in _imports(p):
            if module.startswith("lightning_moe.studies"):
                continue
            where = f"{p.relative_to(PACKAGE.parent)}:{line}"
            if not names:
                offending.append(f"{where}: import {module}")
            offending += [f"{where}: {module}.{n}" for n in names if not _public(module, n)]
    assert offending == []


@pytest.mark.parametrize("package", ["lightning_moe", "lightning_moe.modules", "lightning_moe.data",
                                     "lightning_moe.parallel",
                                     "lightning_moe.gating", "lightning_moe.callbacks", "lightning_moe.metrics"])
def test_core_packages_export_no_study_names(package):
    """What a user finds in ``lightning_moe.modules`` or ``.data`` is meant for them, not for one study."""
    module = importlib.import_module(package)
    leaked = [n for n in module.__all__ if getattr(getattr(module, n), "__module__", "").startswith("lightning_moe.studies")]
    assert leaked == []
