"""Each stage depends on its own config: editing a section's schema reruns the stages that read it, and only them.

The params schema is one module per section (core/config/); a stage's code deps are the import closure of what
it runs (flows/code_deps.py), so the server's section (core/config/serve.py) and the root schema
(core/config/params.py) are no stage's dep. Here, in a copy of this repository, every stage's outputs are
recorded as they are (`dvc commit`, no training), then one schema file is edited and `dvc status` says which stages
that edit would rerun.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import cli_env, make_project

DVC = str(Path(sys.executable).parent / "dvc")


def _placeholder_outputs(project: Path) -> None:
    """Stand-ins for every stage output and data dep (dvc commit records whatever is there)."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]

    def resolve(text: str) -> Path:
        return project / re.sub(r"\$\{paths\.(\w+)\}", lambda m: params["paths"][m[1]], text)

    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                path = resolve(next(iter(entry)) if isinstance(entry, dict) else entry)
                if path.suffix:  # a file (json, csv, png, pt, onnx)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text("{}\n" if path.suffix == ".json" else "placeholder\n")
                else:  # a folder output (data/raw, data/prepared, models/variants)
                    path.mkdir(parents=True, exist_ok=True)
                    (path / "placeholder").write_text("x\n")


def _changed_stages(project: Path, mirror: Path) -> set[str]:
    """The stages `dvc status` reports as changed (stage names end with ':' in its output)."""
    out = subprocess.run([DVC, "status"], cwd=project, env=cli_env(mirror), capture_output=True, text=True,
                         check=True).stdout
    return {line[:-1] for line in out.splitlines() if line and not line.startswith((" ", "\t")) and line.endswith(":")}


def _edit_description(path: Path, field: str, addition: str) -> None:
    """Append text to one field's description in a schema module (a docs-only edit of that field)."""
    text = path.read_text()
    pattern = re.compile(rf'(\n    {field}: [^\n]*?description="[^"]*)(")')
    assert pattern.search(text), f"{path}: no field {field!r} with a description"
    path.write_text(pattern.sub(lambda m: m[1] + addition + m[2], text, count=1))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory, mnist_mirror: Path) -> Path:
    project = make_project(tmp_path_factory.mktemp("config-deps"))
    _placeholder_outputs(project)
    subprocess.run([DVC, "commit", "-f", "-q"], cwd=project, env=cli_env(mirror := mnist_mirror), check=True,
                   capture_output=True)
    assert _changed_stages(project, mirror) == set()
    return project


@pytest.fixture
def project(recorded: Path):
    """The recorded project; each test's edits are undone after it (git checkout of the schema folder)."""
    yield recorded
    subprocess.run(["git", "checkout", "-q", "--", "core", "params.yaml"], cwd=recorded, check=True)


def test_editing_a_server_only_field_reruns_no_stage(project: Path, mnist_mirror: Path):
    _edit_description(project / "core" / "config" / "serve.py", "port", " (edited)")
    _edit_description(project / "core" / "config" / "serve.py", "workers", " (edited)")
    assert _changed_stages(project, mnist_mirror) == set()


def test_editing_a_train_field_reruns_the_stages_that_train(project: Path, mnist_mirror: Path):
    _edit_description(project / "core" / "config" / "train.py", "lr", " (edited)")
    changed = _changed_stages(project, mnist_mirror)
    assert {"train", "tune"} <= changed and not changed & {"fetch", "prepare"}, changed


def test_a_value_export_measures_with_reruns_export_only(project: Path, mnist_mirror: Path):
    params = project / "params.yaml"
    params.write_text(re.sub(r"(\nserve:\n(?:  .*\n)*?  threads:) \d+", r"\1 3", params.read_text()))
    assert "threads: 3" in params.read_text()
    assert _changed_stages(project, mnist_mirror) == {"export"}
    subprocess.run(["git", "checkout", "-q", "--", "params.yaml"], cwd=project, check=True)
    params.write_text(re.sub(r"(\nserve:\n(?:  .*\n)*?  port:) \d+", r"\1 9000", params.read_text()))
    assert "port: 9000" in params.read_text()
    assert _changed_stages(project, mnist_mirror) == set()
