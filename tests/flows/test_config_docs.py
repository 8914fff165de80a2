"""The config is the one place a default and its description live; files derived from it are checked."""

from __future__ import annotations

import re

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from tuneline.flows import config_docs
from tuneline.core.config.params import Params
from tuneline.core.config.tune import SpaceDim
from tests.conftest import REPO

TUNELINE = str(Path(sys.executable).parent / "tuneline")


def sections() -> list[type[BaseModel]]:
    return [field.annotation for field in Params.model_fields.values()] + [SpaceDim]


@pytest.mark.parametrize("section", sections(), ids=lambda s: s.__name__)
def test_every_field_has_a_description_beside_its_default(section: type[BaseModel]):
    assert [name for name, field in section.model_fields.items() if not field.description] == []


def test_params_yaml_and_the_knob_table_are_generated_from_the_config():
    assert config_docs.stale_files(REPO) == [], "run `tuneline config-docs`"
    table = (REPO / config_docs.DOC_FILE).read_text()
    for section, field in Params.model_fields.items():
        for key, sub in field.annotation.model_fields.items():
            assert f"| `{section}.{key}` |" in table
    assert "| `TUNELINE_TUNE_STORAGE` |" in table


def copy_docs(tmp_path: Path) -> Path:
    (tmp_path / "docs").mkdir()
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copy(REPO / config_docs.DOC_FILE, tmp_path / config_docs.DOC_FILE)
    return tmp_path


def test_a_stale_comment_or_table_row_is_caught_and_rewritten(tmp_path: Path):
    root = copy_docs(tmp_path)
    params = root / "params.yaml"
    params.write_text(params.read_text().replace("# peak learning rate", "# the learning rate (old words)"))
    doc = root / config_docs.DOC_FILE
    doc.write_text(doc.read_text().replace("| `train.lr` |", "| `train.learning_rate` |"))
    assert set(config_docs.stale_files(root)) == {params, doc}
    check = subprocess.run([TUNELINE, "--project", str(root), "config-docs", "--check"], capture_output=True, text=True)
    assert check.returncode == 1 and "stale" in check.stderr
    assert set(config_docs.write(root)) == {params, doc}
    assert config_docs.stale_files(root) == []


def test_regenerating_keeps_the_projects_values(tmp_path: Path):
    root = copy_docs(tmp_path)
    params = root / "params.yaml"
    params.write_text(re.sub(r"(?m)^  epochs: \d+ ", "  epochs: 7 ", params.read_text(), count=1))
    config_docs.write(root)
    from tuneline.core.config.params import load_params

    assert load_params(params).train.epochs == 7


def test_config_and_data_errors_exit_2_from_every_command(tmp_path: Path):
    root = copy_docs(tmp_path)
    bad = ["-S", "train.lr=-1"]
    for command in (["run", *bad], ["stage", "prepare", *bad], ["tune", *bad], ["models", *bad, "list"]):
        result = subprocess.run([TUNELINE, "--project", str(root), *command], capture_output=True, text=True)
        assert result.returncode == 2, (command, result.stderr)
        assert result.stderr.count("\n") == 1 and "train.lr" in result.stderr


def test_the_dvc_yaml_check_fails_on_a_hand_edit(tmp_path: Path):
    for folder in ("tuneline", "core", "tasks", "flows", "serving"):  # a vendored copy of the package's source
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    good = subprocess.run([TUNELINE, "--project", str(tmp_path), "dvc-yaml", "--check"], capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    text = (tmp_path / "dvc.yaml").read_text()
    (tmp_path / "dvc.yaml").write_text(text.replace("    - tasks/train/optim.py\n", "", 1))
    bad = subprocess.run([TUNELINE, "--project", str(tmp_path), "dvc-yaml", "--check"], capture_output=True, text=True)
    assert bad.returncode == 1 and "+    - tasks/train/optim.py" in bad.stderr
