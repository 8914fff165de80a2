"""What a run leaves in the project that git must not offer to commit."""

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", [".tuneline-run.lock", "dvc_plots/index.html", ".tuneline/code/train.json",
                                  ".tuneline/runs/abc/params.yaml"])
def test_run_byproducts_are_ignored_by_git(path):
    out = subprocess.run(["git", "check-ignore", "--no-index", path], cwd=REPO, capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, f"{path} is not ignored by .gitignore"


def test_no_tracked_file_is_ignored():
    out = subprocess.run(["git", "ls-files", "-ci", "--exclude-standard"], cwd=REPO, capture_output=True, text=True,
                         check=True)
    assert out.stdout == ""
