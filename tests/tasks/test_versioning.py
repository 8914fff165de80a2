"""DVC as the record of what ran: its lines and `git add` hints reach the user once, not once per handler or call."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tuneline.tasks.versioning import commit_stage, track_folder

DVC_YAML = "stages:\n  a:\n    cmd: echo a > a.txt\n    outs: [a.txt]\n"


@pytest.fixture
def dvc_project(tmp_path, monkeypatch) -> Path:
    """A git + DVC project with one stage (a.txt) and a folder to track (reg/); the current folder is it."""
    root = tmp_path / "project"
    root.mkdir()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    subprocess.run([*git, "init", "-q"], cwd=root, check=True)
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=root, check=True, env=env)
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "a.txt").write_text("a\n")
    (root / "reg").mkdir()
    (root / "reg" / "v1.json").write_text("{}\n")
    subprocess.run([*git, "add", ".dvc", "dvc.yaml"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=root, check=True)
    monkeypatch.chdir(root)  # as the flow runs: DVC names files relative to the current folder
    return root


def test_tracking_a_folder_gives_one_git_add_line_not_dvcs_hint(dvc_project, capfd, caplog):
    caplog.set_level(logging.INFO)
    line = track_folder(dvc_project, "reg")
    assert line == "reg: recorded in reg.dvc; to record it in git: git add .gitignore reg.dvc"
    out, err = capfd.readouterr()
    for text in (out, err, caplog.text):
        assert "To track the changes with git" not in text and "autostage" not in text


def test_dvc_lines_are_printed_once_under_an_application_logging_set_up(dvc_project, capfd, caplog):
    # pytest's handlers sit on the root logger, as Prefect's and `tuneline stage`'s do; DVC adds its own to
    # stdout/stderr when imported, and each record reached both: every DVC line, its hints too, printed twice.
    caplog.set_level(logging.INFO)
    commit_stage(dvc_project, "a")
    out, err = capfd.readouterr()
    assert "Generating lock file 'dvc.lock'" in caplog.text  # through the application's handlers ...
    assert "lock file" not in out + err  # ... and not again through DVC's own


def test_autostage_stages_the_files_and_gives_no_hint(dvc_project):
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "config", "core.autostage", "true"], cwd=dvc_project,
                   check=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert track_folder(dvc_project, "reg") == "reg: recorded in reg.dvc"
    staged = subprocess.run(["git", "diff", "--cached", "--name-only"], cwd=dvc_project, capture_output=True,
                            text=True, check=True).stdout.split()
    assert "reg.dvc" in staged
