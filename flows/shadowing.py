"""Tuneline's top-level packages (`tasks`, `flows`, `serving`) must not be shadowed by a user's folders.

A project of the user's own may well have a folder called `tasks` or `serving`. Wherever the project
folder comes first on sys.path (Prefect loading the project's entry point, `python -m`, a user loader
imported from the project), `import tasks` would then find the user's folder instead of Tuneline's and fail
somewhere deep with a confusing error, or worse, run the wrong code. It is refused up front instead, with
the folder to rename. A folder that is a copy of Tuneline's package (this repository itself, a vendored
copy) is not a clash: flows/dvc_yaml.py checks that such a copy is the code that runs.
"""

from __future__ import annotations

from pathlib import Path

from tasks.config import ConfigError

PACKAGES = ("tasks", "flows", "serving")


def _installed(package: str) -> Path:
    module = __import__(package)
    return Path(module.__file__).resolve().parent


def _is_copy_of(folder: Path, installed: Path) -> bool:
    """Whether `folder` holds the same top-level modules as Tuneline's package (a checkout or vendored copy)."""
    ours = {p.name for p in installed.glob("*.py")}
    return bool(ours) and ours <= {p.name for p in folder.glob("*.py")}


def shadowing_folders(project: Path) -> list[Path]:
    """The project's folders (or modules) named like a Tuneline package that are not that package."""
    project = Path(project).resolve()
    clashes = []
    for package in PACKAGES:
        installed = _installed(package)
        for candidate in (project / package, project / f"{package}.py"):
            if not candidate.exists() or candidate.resolve() == installed:
                continue
            if candidate.is_dir() and _is_copy_of(candidate, installed):
                continue
            clashes.append(candidate)
    return clashes


def check_not_shadowed(project: Path) -> None:
    """Raise a one-line ConfigError naming each clashing folder and what to do."""
    clashes = shadowing_folders(project)
    if clashes:
        names = ", ".join(f"{p.name}{'/' if p.is_dir() else ''}" for p in clashes)
        raise ConfigError(f"{Path(project).resolve()}: {names} would shadow Tuneline's package of the same name "
                          f"({', '.join(PACKAGES)} are Tuneline's top-level packages): rename your folder, e.g. "
                          f"{clashes[0].stem} -> my_{clashes[0].stem}")
