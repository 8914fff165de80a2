"""The import contracts of the package, read from the source (every import, function-level ones included):

    tuneline.flows -> tuneline.tasks -> tuneline.core      tuneline.serving -> tuneline.core

core and serving import no PyTorch, Prefect, DVC or Optuna (the serving image has none of them); tasks never import
the flow or the server; nothing imports the old top-level names (tasks, flows, serving, core); and no module imports
another module's `_private` names. Imports under `if TYPE_CHECKING:` never run and are not held to the layering.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.module_copies import PACKAGE_FOLDERS, REPO

pytestmark = pytest.mark.fast

TRAINING_STACK = ("torch", "torchvision", "prefect", "dvc", "optuna")
# package -> the first-party packages and third-party roots it must never import
FORBIDDEN = {
    "tuneline.core": ("tuneline.tasks", "tuneline.flows", "tuneline.serving", *TRAINING_STACK),
    "tuneline.serving": ("tuneline.tasks", "tuneline.flows", *TRAINING_STACK),
    "tuneline.tasks": ("tuneline.flows", "tuneline.serving"),
}
OLD_TOP_LEVEL = ("tasks", "flows", "serving", "core")


def module_name(path: Path) -> str:
    relative = path.relative_to(REPO).with_suffix("")
    parts = [PACKAGE_FOLDERS[relative.parts[0]], *relative.parts[1:]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_sources() -> list[Path]:
    return sorted(p for folder in PACKAGE_FOLDERS for p in (REPO / folder).rglob("*.py"))


def imports(module: str, source: str, is_package: bool = False) -> list[tuple[int, str, tuple[str, ...]]]:
    """(line, absolute module, names imported from it) for every import that can run in `module`'s source."""
    tree = ast.parse(source)
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for child in node.body for n in ast.walk(child)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([base] if base else [])])
            found.append((node.lineno, base, tuple(alias.name for alias in node.names)))
    return found


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(module: str, source: str, shown: str, is_package: bool = False) -> list[str]:
    found = []
    for line, base, names in imports(module, source, is_package):
        for package, forbidden in FORBIDDEN.items():
            if under(module, package):
                found += [f"{shown}:{line}: {module} imports {base} ({package} must not import {banned})"
                          for banned in forbidden if under(base, banned)]
        if base.split(".")[0] in OLD_TOP_LEVEL:
            found.append(f"{shown}:{line}: imports {base}: the package is tuneline.{base}")
        if under(base, "tuneline") and base != module:
            found += [f"{shown}:{line}: imports {base}.{name}: a private name of another module"
                      for name in names if name.startswith("_") and not name.endswith("__")]  # __version__ is public
    return found


def test_every_module_keeps_the_import_contracts():
    sources = package_sources()
    assert len(sources) > 100 and any(p.parts[-2] == "core" for p in sources)
    problems = [v for path in sources for v in violations(module_name(path), path.read_text(),
                                                           str(path.relative_to(REPO)), path.name == "__init__.py")]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("source, expected", [
    ("import torch\n", "tuneline.serving must not import torch"),
    ("def f():\n    from prefect import flow\n", "tuneline.serving must not import prefect"),
    ("from tuneline.tasks.ship.registry import Registry\n", "must not import tuneline.tasks"),
    ("from tuneline.core.config.base import _helper\n", "a private name of another module"),
    ("from tasks.config import Params\n", "the package is tuneline.tasks.config"),
])
def test_the_contract_check_catches_each_kind_of_violation(source: str, expected: str):
    # The source of a would-be module of the server, breaking exactly one rule.
    found = violations("tuneline.serving.probe", source, "serving/probe.py")
    assert any(expected in v for v in found), found


def test_relative_and_type_checking_imports_are_read_right():
    assert violations("tuneline.core.probe", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n",
                      "core/probe.py") == []
    assert "tuneline.serving must not import tuneline.tasks" in " ".join(
        violations("tuneline.serving.probe", "from ..tasks.ship import registry\n", "serving/probe.py"))
