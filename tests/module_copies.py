"""Whether a file of Tuneline's was imported under a name other than its `tuneline.…` one.

Before Tuneline was one package, `tasks`, `flows` and `serving` were top-level names, and a checkout on sys.path
could load `tasks.config` beside `tuneline.tasks.config`: two copies of every class (an `isinstance` that fails, a
registry of two lock objects). These helpers find such modules in a process (`stray_modules`) or in the per-process
logs a run writes through tests/module_log/sitecustomize.py (`module_log_env`, `stray_modules_in_log`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The folders pyproject.toml maps onto tuneline.* (tuneline/, core/, tasks/, flows/, serving/).
PACKAGE_FOLDERS = {"tuneline": "tuneline", "core": "tuneline.core", "tasks": "tuneline.tasks",
                   "flows": "tuneline.flows", "serving": "tuneline.serving"}


def expected_name(file: str) -> str | None:
    """The dotted name a source file of the package must be loaded as, or None for a file outside it."""
    try:
        relative = Path(file).resolve().relative_to(REPO)
    except ValueError:
        return None
    if relative.parts[0] not in PACKAGE_FOLDERS or relative.suffix != ".py":
        return None
    parts = [PACKAGE_FOLDERS[relative.parts[0]], *relative.with_suffix("").parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def stray_modules(modules: dict[str, str | None]) -> list[str]:
    """'name (file, should be X)' for each module loaded from a package file under a name other than its own."""
    strays = []
    for name, file in modules.items():
        if not file or name == "__main__":  # `python -m tuneline` runs tuneline/__main__.py as __main__
            continue
        expected = expected_name(file)
        if expected is not None and name != expected:
            strays.append(f"{name} ({file}, should be {expected})")
    return sorted(strays)


def module_log_env(env: dict[str, str], folder: Path) -> dict[str, str]:
    """`env` plus what makes every Python process started with it log its modules into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = [str(REPO / "tests" / "module_log"), *filter(None, [env.get("PYTHONPATH")])]
    return {**env, "PYTHONPATH": os.pathsep.join(path), "TUNELINE_MODULE_LOG": str(folder)}


def stray_modules_in_log(folder: Path) -> tuple[int, list[str]]:
    """(processes logged, strays found in any of them, each with the process's command line)."""
    logs = sorted(folder.glob("*.json"))
    strays = []
    for log in logs:
        record = json.loads(log.read_text())
        strays += [f"{' '.join(record['argv'])[:120]}: {s}" for s in stray_modules(record["modules"])]
    return len(logs), strays
