"""`tuneline models list | show | promote | rollback` on a registry folder, through the real command line entry."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tuneline.flows.cli import main
from tuneline.tasks.ship.registry import Registry
from tests.tasks.registry_worker import tiny_model

pytestmark = pytest.mark.fast

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def project(tmp_path):
    """A project folder (params.yaml) whose registry holds three versions of its model (mnist, project.name's
    default); v0001 is champion."""
    saved = dict(os.environ)  # the CLI sets PREFECT_/DVC_ defaults for its process; keep them out of other tests
    shutil.copyfile(REPO / "params.yaml", tmp_path / "params.yaml")
    registry = Registry(tmp_path / "registry", "mnist")
    for i in range(3):
        registry.register({"model.onnx": tiny_model(tmp_path / f"m{i}.onnx", float(i))},
                          metrics={"accuracy": 0.9 + i / 100, "macro_f1": 0.89}, gates=[], lineage={}, run_id=None)
    registry.promote("v0001")
    yield tmp_path
    os.environ.clear()
    os.environ.update(saved)


def tuneline(project: Path, *args: str) -> int:
    return main(["--project", str(project), "models", *args])


def test_list_and_show(project, capsys):
    assert tuneline(project, "list") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["model", "version", "created", "accuracy", "macro_f1", "MB", "files", "aliases"]
    assert out[1].split()[:2] == ["mnist", "v0001"] and out[1].split()[-1] == "champion"
    assert out[3].split()[3] == "0.9200"
    assert tuneline(project, "show", "champion") == 0
    out = capsys.readouterr().out
    card = json.loads(out[:out.rindex("}") + 1])
    assert card["version"] == "v0001" and card["aliases"] == ["champion"]
    assert "files verified: model.onnx match their sha256 and are valid ONNX" in out


def test_promote_then_rollback_restores_the_previous_champion(project, capsys):
    assert tuneline(project, "promote", "v0003") == 0
    assert "champion -> v0003 (previous: v0001)" in capsys.readouterr().out
    assert tuneline(project, "promote", "v0002", "--alias", "challenger") == 0
    assert tuneline(project, "rollback") == 0
    out = capsys.readouterr().out
    assert "champion rolled back -> v0001 (previous: none)" in out
    assert "not recorded in DVC" in out  # this folder is not a DVC project; the change itself is done
    registry = Registry(project / "registry")
    assert registry.alias("champion")["version"] == "v0001" and registry.alias("challenger")["version"] == "v0002"


def test_errors_are_one_line_with_what_to_do(project, capsys):
    assert tuneline(project, "promote", "v0009") == 1
    assert "no version 'v0009' (versions: v0001, v0002, v0003)" in capsys.readouterr().err
    (project / "registry" / "models" / "mnist" / "versions" / "v0002" / "model.onnx").write_bytes(b"tampered")
    assert tuneline(project, "show", "v0002") == 1
    err = capsys.readouterr().err
    assert "v0002/model.onnx: sha256" in err and "does not match its card" in err and len(err.strip().splitlines()) == 1
    assert tuneline(project, "promote", "v0002") == 1  # a tampered version never becomes champion
    assert Registry(project / "registry").alias("champion")["version"] == "v0001"


def test_several_models_by_name(project, capsys):
    """list shows every model; promote and rollback act on --name's (default: the project's) and no other."""
    other = Registry(project / "registry", "digits")
    for i in range(2):
        other.register({"model.onnx": tiny_model(project / f"d{i}.onnx", 10.0 + i)}, metrics={}, gates=[],
                       lineage={}, run_id=None)
    other.promote("v0001")
    assert tuneline(project, "list") == 0
    rows = [line.split()[:2] for line in capsys.readouterr().out.splitlines()[1:]]
    assert rows == [["digits", "v0001"], ["digits", "v0002"], ["mnist", "v0001"], ["mnist", "v0002"], ["mnist", "v0003"]]
    assert tuneline(project, "list", "--name", "digits") == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    assert tuneline(project, "promote", "v0002", "--name", "digits") == 0
    assert "digits champion -> v0002 (previous: v0001)" in capsys.readouterr().out
    assert Registry(project / "registry", "mnist").alias("champion")["version"] == "v0001"  # untouched
    assert tuneline(project, "promote", "v0003") == 0  # the project's own model
    assert Registry(project / "registry", "digits").alias("champion")["version"] == "v0002"
