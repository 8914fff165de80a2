"""The wheel: one import name, `tuneline`, holding every subpackage; a user project may use any folder names.

pyproject.toml lists the packages explicitly (the folders core/, tasks/, flows/, serving/ are mapped onto
tuneline.*, so setuptools cannot discover them): a subpackage missing from the list would be missing from the
wheel, while the editable install used for development still finds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO, cli_env

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def folder_packages() -> set[str]:
    """Every folder with an __init__.py under the mapped roots, as its dotted name under tuneline."""
    found = set()
    for dotted, folder in SETUPTOOLS["package-dir"].items():
        root = REPO / folder
        for init in root.rglob("__init__.py"):
            relative = init.parent.relative_to(root)
            if "__pycache__" not in relative.parts:
                found.add(".".join([dotted, *relative.parts]))
    return found


@pytest.mark.fast
def test_pyproject_lists_exactly_the_folders_that_are_packages():
    assert set(SETUPTOOLS["package-dir"]) == {"tuneline", "tuneline.core", "tuneline.tasks", "tuneline.flows",
                                              "tuneline.serving"}
    listed = set(SETUPTOOLS["packages"])
    assert len(listed) == len(SETUPTOOLS["packages"]), "a package is listed twice"
    found = folder_packages()
    assert not found - listed, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"
    assert not listed - found, f"listed but not a folder with an __init__.py: {sorted(listed - found)}"


# -- a real, non-editable install -----------------------------------------------------------------------------

SOURCES = ("pyproject.toml", "README.md", "tuneline", "core", "tasks", "flows", "serving")


def _run(command: list, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _ours(listing: set[str]) -> set[str]:
    return {name for name in listing if name != "__pycache__"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """A fresh venv with `pip install --no-deps` of the package (from a copy of its sources: pip builds in the
    source tree), plus, afterwards, a .pth naming this venv's site-packages for the third-party dependencies."""
    base = tmp_path_factory.mktemp("packaging")
    source = base / "source"
    source.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__", "*.egg-info")}
                                            if (REPO / name).is_dir() else {}))
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", venv])
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    before = set(os.listdir(site))
    _run([python, "-m", "pip", "install", "--no-deps", "--progress-bar", "off", "--disable-pip-version-check",
          source])
    after = set(os.listdir(site))
    # A plain path entry, not a site dir: the editable install's finder (.pth) in this venv must not load there.
    (site / "zz-tuneline-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return {"venv": venv, "site": site, "added": _ours(after - before), "removed": _ours(before - after)}


@pytest.mark.slow
def test_the_wheel_installs_one_name_holding_every_subpackage(installed, tmp_path: Path):
    added = installed["added"]
    assert installed["removed"] == set()
    assert "tuneline" in added and added - {"tuneline"} == {f"tuneline-{PYPROJECT['project']['version']}.dist-info"}, \
        added
    probe = ("import importlib, importlib.util; "
             f"names = {sorted(SETUPTOOLS['packages'])!r}; "
             "files = [importlib.import_module(n).__file__ for n in names]; "
             "print('\\n'.join(files)); "
             "assert all(importlib.util.find_spec(n) is None for n in ('tasks', 'flows', 'serving', 'core'))")
    files = _run([installed["venv"] / "bin" / "python", "-c", probe], cwd=tmp_path).stdout.split()
    assert files and all(Path(f).is_relative_to(installed["site"] / "tuneline") for f in files), files
    assert (installed["site"] / "tuneline" / "serving" / "proto").is_dir()  # package data travels too
    assert list((installed["site"] / "tuneline" / "serving" / "proto").glob("*.binpb"))


# A user's own packages named like Tuneline's folders. Importing any of them fails loudly, so the run below
# passing also shows Tuneline never imported them.
USER_FILES = {
    "tasks/__init__.py": "raise ImportError('the project\\'s own tasks package was imported')\n",
    "tasks/jobs.py": "def nightly():\n    return 'mine'\n",
    "serving/__init__.py": "raise ImportError('the project\\'s own serving package was imported')\n",
    "serving/web.py": "PORT = 9000\n",
    "flows.py": "raise ImportError('the project\\'s own flows module was imported')\n",
}
TINY = {"data.limit_train": 1500, "data.limit_test": 300, "train.epochs": 1, "train.batch_size": 64,
        "tune.enabled": False, "gate.min_accuracy": 0.5, "gate.min_class_recall": 0.0, "gate.max_ece": 0.5,
        "export.int8": False, "export.latency_runs": 10}


def _digest(folder: Path, names) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in names}


@pytest.mark.slow
def test_a_project_with_its_own_tasks_serving_and_flows_runs_to_a_promotion(installed, tmp_path: Path,
                                                                            mnist_mirror: Path):
    from tuneline.flows.params_file import write_overrides

    bin_dir = installed["venv"] / "bin"
    env = cli_env(mnist_mirror)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"  # dvc.yaml's `tuneline` too: the installed one
    env.pop("PYTHONPATH", None)
    project = tmp_path / "proj"
    for name, text in USER_FILES.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    _run([bin_dir / "tuneline", "init", project], cwd=tmp_path, env=env)
    before = _digest(project, USER_FILES)
    write_overrides(project / "params.yaml", TINY)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qam", "tiny"], cwd=project)
    done = _run([bin_dir / "python", "-m", "tuneline", "run"], cwd=project, env=env)
    assert "v0001 promoted to champion" in done.stdout, done.stdout[-3000:]
    ran = json.loads((project / ".tuneline" / "code" / "train.json").read_text())  # the files the stage ran
    assert ran and all(Path(f).is_relative_to(installed["site"] / "tuneline") for f in ran), sorted(ran)[:3]
    assert _digest(project, USER_FILES) == before
    assert sorted(p.name for p in (project / "tasks").iterdir() if p.name != "__pycache__") == ["__init__.py",
                                                                                                 "jobs.py"]
