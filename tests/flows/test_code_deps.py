"""A stage's code deps are the files it imports: dvc.yaml is generated from them and DVC sees every edit.

Fast: DVC only (no training). `test_code_change_retrains.py` runs the pipeline itself.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tuneline.flows import code_deps, dvc_yaml
from tests.conftest import REPO, make_project

def dvc(project: Path, *args: str) -> str:
    # The DVC CLI in a subprocess: in-process DVC keeps logging handlers bound to earlier tests' streams.
    return subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=project, check=True, text=True,
                          capture_output=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"}).stdout


def changed_stages(project: Path) -> set[str]:
    return set(json.loads(dvc(project, "status", "--json") or "{}"))


def placeholder_outputs(project: Path) -> None:
    """A stand-in for every stage output dvc.yaml declares, so DVC can record all stages without running them."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                name = next(iter(entry)) if isinstance(entry, dict) else entry
                path = project / re.sub(r"\$\{paths\.(\w+)\}", lambda m: params["paths"][m[1]], name)
                if path.suffix:  # a file (json, csv, png, pt, onnx)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text("{}\n" if path.suffix == ".json" else f"placeholder {name}\n")
                else:  # a folder output (data/raw, data/prepared, models/variants)
                    path.mkdir(parents=True, exist_ok=True)
                    (path / "placeholder").write_text("x\n")


@pytest.fixture
def recorded_project(tmp_path: Path) -> Path:
    """A project copy whose dvc.lock records every stage as up to date (outputs are placeholders)."""
    project = make_project(tmp_path)
    placeholder_outputs(project)
    dvc(project, "commit", "--force")
    assert changed_stages(project) == set()
    return project


def append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}\n")


def test_the_committed_dvc_yaml_is_the_generated_one():
    diff = dvc_yaml.stale_diff(REPO)
    assert not diff, f"dvc.yaml is stale: run `tuneline dvc-yaml`\n{diff}"


def test_editing_a_module_train_imports_lists_train_in_dvc_status(recorded_project: Path):
    # optim and augment are what the hand-written dvc.yaml missed: a code change shipped a stale model.
    append(recorded_project / "tasks" / "train" / "optim.py", "# a change to the optimizer code")
    assert {"train", "tune"} <= changed_stages(recorded_project)
    assert not {"fetch", "prepare", "export"} & changed_stages(recorded_project)


def test_editing_augmentation_or_checkpoints_reruns_every_stage_that_imports_them(recorded_project: Path):
    append(recorded_project / "tasks" / "data" / "augment.py", "# changed")
    append(recorded_project / "tasks" / "model" / "checkpoint.py", "# changed")
    changed = changed_stages(recorded_project)
    assert {"tune", "train", "evaluate", "export"} <= changed  # evaluate/export load the checkpoint
    assert not {"fetch", "prepare"} & changed


def test_editing_serving_or_a_pycache_file_changes_no_stage(recorded_project: Path):
    append(recorded_project / "serving" / "app.py", "# a server change")
    cache = recorded_project / "tasks" / "train" / "__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "optim.cpython-311.pyc").write_bytes(b"not hashed")
    assert changed_stages(recorded_project) == set()


@pytest.mark.parametrize("stage", dvc_yaml.STAGE_NAMES)
def test_every_module_a_stage_loads_at_run_time_is_a_dep(stage: str):
    """The import closure (static) against what Python really loads when the stage's modules import."""
    entry = sorted(code_deps.stage_entry_modules(stage))
    probe = ("import json, sys\n"
             f"for name in {entry!r}: __import__(name)\n"
             "print(json.dumps(sorted(m.__file__ for n, m in list(sys.modules.items())\n"
             "      if n.split('.')[0] in ('tasks', 'flows', 'serving') and getattr(m, '__file__', None))))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                                       check=True).stdout)
    derived = {str(path) for path in code_deps.stage_code_files(stage)}
    assert set(loaded) - derived == set()
    assert not any("serving" in Path(path).parts for path in derived) or stage == "export"


def test_code_outside_the_project_is_covered_by_a_fingerprint(tmp_path: Path):
    """Tuneline installed elsewhere (site-packages): no absolute paths in dvc.yaml, a fingerprint dep instead."""
    (tmp_path / "params.yaml").write_text("{}\n")
    text = dvc_yaml.render(tmp_path)
    assert str(REPO) not in text and "/tasks/" not in text
    assert ".tuneline/code/train.json" in text and "always_changed: true" in text
    written = dvc_yaml.write_fingerprints(tmp_path)
    fingerprint = json.loads((tmp_path / ".tuneline" / "code" / "train.json").read_text())
    assert str(REPO / "tasks" / "train" / "optim.py") in fingerprint and len(written) == len(dvc_yaml.STAGE_NAMES)
    assert not any("__pycache__" in name for name in fingerprint)


def test_a_project_copy_that_differs_from_the_running_code_is_refused(tmp_path: Path):
    from tuneline.core.config.base import ConfigError

    project = make_project(tmp_path)
    dvc_yaml.check_running_code(project, "train")  # identical copy: fine
    append(project / "tasks" / "train" / "optim.py", "# edited, but the code that runs is the installed one")
    with pytest.raises(ConfigError, match="differs from the code that runs"):
        dvc_yaml.check_running_code(project, "train")


def test_a_user_module_is_followed_within_its_own_package(tmp_path: Path, monkeypatch):
    package = tmp_path / "mymodels"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "net.py").write_text("import torch\nfrom mymodels import blocks\n")
    (package / "blocks.py").write_text("def block():\n    from . import layers\n")
    (package / "layers.py").write_text("")
    (package / "unused.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    files = {path.name for path in code_deps.stage_code_files("train", user_modules=["mymodels.net"])}
    assert {"net.py", "blocks.py", "layers.py", "__init__.py", "loop.py"} <= files and "unused.py" not in files


# Each stage depends on its own config: the params schema is one module per section (core/config/), so the
# server's section (serve.py) and the root schema (params.py) are no stage's code dep.
def _edit_description(path: Path, field: str, addition: str) -> None:
    """Append text to one field's description in a schema module (a docs-only edit of that field)."""
    text = path.read_text()
    pattern = re.compile(rf'(\n    {field}: [^\n]*?description="[^"]*)(")')
    assert pattern.search(text), f"{path}: no field {field!r} with a description"
    path.write_text(pattern.sub(lambda m: m[1] + addition + m[2], text, count=1))


def test_editing_a_server_only_field_reruns_no_stage(recorded_project: Path):
    _edit_description(recorded_project / "core" / "config" / "serve.py", "port", " (edited)")
    _edit_description(recorded_project / "core" / "config" / "serve.py", "workers", " (edited)")
    assert changed_stages(recorded_project) == set()


def test_editing_a_train_field_reruns_the_stages_that_train(recorded_project: Path):
    _edit_description(recorded_project / "core" / "config" / "train.py", "lr", " (edited)")
    changed = changed_stages(recorded_project)
    assert {"train", "tune"} <= changed and not changed & {"fetch", "prepare"}, changed


def test_a_value_export_measures_with_reruns_export_only(recorded_project: Path):
    params = recorded_project / "params.yaml"
    params.write_text(re.sub(r"(\nserve:\n(?:  .*\n)*?  threads:) \d+", r"\1 3", params.read_text()))
    assert "threads: 3" in params.read_text()
    assert changed_stages(recorded_project) == {"export"}
    subprocess.run(["git", "checkout", "-q", "--", "params.yaml"], cwd=recorded_project, check=True)
    params.write_text(re.sub(r"(\nserve:\n(?:  .*\n)*?  port:) \d+", r"\1 9000", params.read_text()))
    assert "port: 9000" in params.read_text()
    assert changed_stages(recorded_project) == set()
