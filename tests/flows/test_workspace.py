"""A run with overrides gets a workspace of its own (flows/workspace.py): set-up, refusals and clean-up.

The end-to-end behaviour (the checkout untouched, experiments, concurrent runs, resume after SIGKILL) is in
tests/flows/test_pipeline.py and test_deployment.py; these check the workspace itself, without training.
"""

from __future__ import annotations

import re

import logging
import subprocess
from pathlib import Path

import pytest
import yaml

from tuneline.flows.workspace import RUNS_DIR, clean_stale, open_workspace
from tuneline.core.config.base import ConfigError
from tuneline.core.config.paths import PathsConfig
from tests.conftest import make_project

log = logging.getLogger("test")


def test_project_scoped_paths_stay_with_the_project_and_outputs_go_to_the_workspace(tmp_path: Path):
    project, workspace = tmp_path / "project", tmp_path / "project" / RUNS_DIR / "run-1"
    paths = PathsConfig().resolve(workspace, project)
    assert paths.registry == project / "registry"
    assert paths.checkpoints == project / "models" / "checkpoints"
    assert paths.study_db == project / "tuning" / "study.db"
    assert paths.model == workspace / "models" / "model.pt" and paths.metrics == workspace / "metrics" / "eval.json"
    assert set(paths.project_scoped()) == {"registry", "checkpoints", "study_db"}


def test_a_workspace_has_the_checkouts_params_plus_overrides_and_goes_away(tmp_path: Path):
    project = make_project(tmp_path)
    params = project / "params.yaml"
    params.write_text(re.sub(r"(?m)^  epochs: \d+ ", "  epochs: 5 ", params.read_text(), count=1))  # uncommitted, on disk
    before = params.read_bytes()
    with open_workspace(project, {"train.lr": 0.01}, log) as workspace:
        assert workspace.isolated and workspace.root.parent == project / RUNS_DIR
        copied = yaml.safe_load((workspace.root / "params.yaml").read_text())
        assert copied["train"]["lr"] == 0.01 and copied["train"]["epochs"] == 5
        local_config = (workspace.root / ".dvc" / "config.local").read_text()
        assert f"dir = {project.resolve() / '.dvc' / 'cache'}" in local_config  # the shared cache: no data copied
    assert params.read_bytes() == before
    assert not workspace.root.exists()
    assert "run-" not in subprocess.run(["git", "worktree", "list"], cwd=project, capture_output=True,
                                        text=True).stdout


def test_without_overrides_the_run_is_the_checkouts_own(tmp_path: Path):
    project = make_project(tmp_path)
    with open_workspace(project, {}, log) as workspace:
        assert workspace.root == workspace.project == project.resolve() and workspace.experiment is None


def test_a_code_file_git_does_not_track_stops_a_run_with_overrides_and_names_it(tmp_path: Path):
    project = make_project(tmp_path)
    (project / "tasks" / "extra.py").write_text("# a module the user forgot to add\n")
    dvc_yaml = project / "dvc.yaml"
    dvc_yaml.write_text(dvc_yaml.read_text().replace("    - tasks/data/fetch.py\n",
                                                     "    - tasks/data/fetch.py\n    - tasks/extra.py\n", 1))
    with pytest.raises(ConfigError, match=r"tasks/extra.py: git does not track it"):
        with open_workspace(project, {"train.lr": 0.01}, log):
            pass
    assert not [p for p in (project / RUNS_DIR).iterdir() if p.is_dir()]  # nothing half set up is left


def test_the_workspace_of_a_killed_run_is_removed_by_the_next_run(tmp_path: Path):
    project = make_project(tmp_path)
    dead = project / RUNS_DIR / "run-dead"
    subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(dead), "HEAD"], cwd=project, check=True)
    dead.with_suffix(".lock").write_text("")  # its run died: nobody holds the lock
    assert clean_stale(project) == [dead]
    assert not dead.exists() and not dead.with_suffix(".lock").exists()
    assert "run-dead" not in subprocess.run(["git", "worktree", "list"], cwd=project, capture_output=True,
                                            text=True).stdout
