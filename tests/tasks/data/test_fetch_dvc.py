"""The fetch stage depends on the source's own bytes: an image folder (or archive) outside the project, and a
user loader's module inside it. Was: deleting images from a class folder left `dvc status` "up to date".

Real `tuneline init` projects (Tuneline's code outside them), real `dvc repro` and `dvc status`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

from tuneline.flows.params_file import write_overrides
from tests.conftest import cli_env
from tests.tasks.data.test_imagefolder import write_colour_folder

BIN = Path(sys.executable).parent


def run(project: Path, *cmd: str) -> str:
    result = subprocess.run([str(BIN / cmd[0]), *cmd[1:]], cwd=project, env=cli_env(project), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def changed(project: Path) -> set[str]:
    """Stages `dvc status fetch` lists (fetch and what it depends on; `code` always runs, so it is left out)."""
    return set(json.loads(run(project, "dvc", "status", "fetch", "--json") or "{}")) - {"code"}


def init_project(tmp_path: Path) -> Path:
    """A fresh `tuneline init` project (the MNIST example; its source is changed by each test)."""
    run(tmp_path, "tuneline", "init", str(tmp_path / "proj"))
    return tmp_path / "proj"


def fetch_deps(project: Path) -> list[str]:
    return yaml.safe_load((project / "dvc.yaml").read_text())["stages"]["fetch"]["deps"]


def use_source(project: Path, overrides: dict) -> None:
    """Point params.yaml at another source and regenerate dvc.yaml, as a user does."""
    write_overrides(project / "params.yaml", overrides)
    run(project, "tuneline", "dvc-yaml")


def record_fetch(project: Path) -> None:
    """Record fetch's deps in dvc.lock without running it (its output is a placeholder): cheaper than a repro."""
    run(project, "tuneline", "code-fingerprint")
    (project / "data" / "raw").mkdir(parents=True, exist_ok=True)
    (project / "data" / "raw" / "placeholder").write_text("recorded by dvc commit\n")
    run(project, "dvc", "commit", "--force", "fetch")


def test_fetch_depends_on_the_image_folder_archive_and_loader_module(tmp_path):
    project = init_project(tmp_path)
    assert not any(dep.startswith("${data") for dep in fetch_deps(project))  # MNIST: checked by content instead

    # A folder outside the project, through a real `dvc repro`: deleting images lists fetch as changed.
    images = tmp_path / "images"
    write_colour_folder(images, ["a", "b"], per_class=6)
    use_source(project, {"data.source": "imagefolder", "data.image_folder": str(images)})
    assert "${data.image_folder}" in fetch_deps(project)
    run(project, "dvc", "repro", "fetch")
    assert json.loads((project / "data" / "raw" / "classes.json").read_text()) == ["a", "b"]
    assert changed(project) == set()
    for path in sorted((images / "b").iterdir())[:3]:
        path.unlink()
    assert "fetch" in changed(project)

    # An archive: rewriting it with fewer images lists fetch.
    archive = tmp_path / "images.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(images, arcname="images")
    use_source(project, {"data.image_folder": str(archive)})
    record_fetch(project)
    assert changed(project) == set()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(images / "a", arcname="images/a")
    assert "fetch" in changed(project)

    # A loader's module in the project: listed in dvc.yaml, and editing it lists fetch.
    (project / "mydata").mkdir()
    (project / "mydata" / "__init__.py").write_text("")
    (project / "mydata" / "load.py").write_text("def load(n=8):\n    raise NotImplementedError\n")
    use_source(project, {"data.source": "mydata.load:load", "data.image_folder": None, "data.options": {"n": 20}})
    assert {"mydata/__init__.py", "mydata/load.py"} <= set(fetch_deps(project))
    assert "${data.image_folder}" not in fetch_deps(project)
    record_fetch(project)
    assert changed(project) == set()
    (project / "mydata" / "load.py").write_text((project / "mydata" / "load.py").read_text() + "# edited\n")
    assert "fetch" in changed(project)
