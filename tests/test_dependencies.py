"""Every third-party module the code imports is declared in pyproject.toml, not merely installed because some
other package depends on it today (issue 13: ruamel.yaml, rich and sqlalchemy were).

Each .py file is parsed (imports anywhere: module level, inside functions, under try), each top-level import
name is mapped to the distribution that installs it (importlib.metadata), and that distribution must be among
the requirements its folder may rely on: flows/, tasks/ and serving/ the [project] dependencies; bench/ those
plus the `bench` extra; tests/ those plus the `test` extra.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast

REPO = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"tuneline", "tests", "bench"}
# folder -> the optional-dependency extras it may use besides [project] dependencies
SCANNED = {"core": (), "flows": (), "tasks": (), "serving": (), "tuneline": (), "bench": ("bench",), "tests": ("test",)}


def normalize(name: str) -> str:
    """PEP 503: 'ruamel.yaml' and 'Ruamel_YAML' are one distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    """'onnxruntime-gpu>=1.20,<2; sys_platform == "linux"' -> 'onnxruntime-gpu'; 'psycopg[binary]>=3' -> 'psycopg'."""
    return normalize(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)[1])


def declared(extras: tuple[str, ...]) -> set[str]:
    """Normalized names of [project] dependencies plus the given extras (markers ignored: declared is declared)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    optional = project.get("optional-dependencies", {})
    missing = [extra for extra in extras if extra not in optional]
    assert not missing, f"pyproject.toml has no extra {missing}"
    return {requirement_name(r) for r in [*project["dependencies"], *(d for e in extras for d in optional[e])]}


def imported_names(source: str) -> set[str]:
    """Top-level names of the absolute imports anywhere in `source` ('import a.b', 'from a.b import c' -> 'a')."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@cache
def distributions_of() -> dict[str, list[str]]:
    return packages_distributions()


def undeclared_imports(folder: str, allowed: set[str]) -> list[str]:
    """'path: import X (distribution Y)' for each third-party import in `folder` that `allowed` does not cover."""
    problems = []
    for path in sorted((REPO / folder).rglob("*.py")):
        siblings = {other.stem for other in path.parent.glob("*.py")}  # a script importing its neighbour (bench/)
        for name in sorted(imported_names(path.read_text()) - FIRST_PARTY - siblings - set(sys.stdlib_module_names)):
            dists = distributions_of().get(name)
            where = path.relative_to(REPO)
            if not dists:
                problems.append(f"{where}: import {name} (no installed distribution provides it)")
            elif not {normalize(d) for d in dists} & allowed:
                problems.append(f"{where}: import {name} (distribution {' or '.join(sorted(set(dists)))})")
    return problems


@pytest.mark.parametrize("folder", list(SCANNED))
def test_every_third_party_import_is_declared(folder):
    extras = SCANNED[folder]
    problems = undeclared_imports(folder, declared(extras))
    where = "[project] dependencies" + "".join(f" or the `{e}` extra" for e in extras)
    assert not problems, f"not declared in pyproject.toml's {where}:\n  " + "\n  ".join(problems)


def test_the_scan_sees_every_kind_of_import():
    source = ("import numpy as np, os.path\nfrom ruamel.yaml import YAML\nfrom . import sibling\n"
              "def f():\n    import sqlalchemy.exc\n    try:\n        from rich.progress import Progress\n"
              "    except ImportError:\n        pass\n")
    assert imported_names(source) == {"numpy", "os", "ruamel", "sqlalchemy", "rich"}
    assert requirement_name("psycopg[binary]>=3.1,<4") == "psycopg"
    assert requirement_name("onnxruntime-gpu>=1.20; sys_platform == 'linux'") == "onnxruntime-gpu"
    assert normalize("ruamel.yaml") == normalize("Ruamel_YAML") == "ruamel-yaml"


def test_an_undeclared_import_is_reported(tmp_path, monkeypatch):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("def f():\n    import sqlalchemy\n    import numpy\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert undeclared_imports("pkg", {"numpy"}) == ["pkg/mod.py: import sqlalchemy (distribution SQLAlchemy)"]
