"""`tuneline init`: a project of the user's own, outside this repository, runs and retrains on code changes.

"Installed Tuneline" is a copy of this checkout's packages in a folder of its own (first on PYTHONPATH), as
site-packages would hold them: it lies outside the init'd project, so dvc.yaml covers it with the `code`
stage's fingerprints, and a test may edit it without touching the checkout other tests import.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, cli_env

BIN = Path(sys.executable).parent
TINY = {"data.limit_train": 1500, "data.limit_test": 300, "train.epochs": 1, "train.batch_size": 64,
        "tune.enabled": False, "gate.min_accuracy": 0.5, "gate.min_class_recall": 0.3, "gate.max_ece": 0.5,
        "export.int8": False, "export.latency_runs": 10}


def installed_copy(dest: Path) -> Path:
    """The package as site-packages holds it: tuneline/ with core, tasks, flows and serving inside (pyproject's
    package-dir). First on PYTHONPATH it wins over the editable install's finder, which comes after sys.path."""
    site = dest / "site"
    shutil.copytree(REPO / "tuneline", site / "tuneline", ignore=shutil.ignore_patterns("__pycache__"))
    for package in ("core", "tasks", "flows", "serving"):
        shutil.copytree(REPO / package, site / "tuneline" / package, ignore=shutil.ignore_patterns("__pycache__"))
    return site


def tool(cwd: Path, env: dict, *cmd: str, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if ok:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture
def site_env(tmp_path: Path, mnist_mirror: Path) -> tuple[Path, dict]:
    site = installed_copy(tmp_path)
    return site, {**cli_env(mnist_mirror), "PYTHONPATH": str(site)}


def set_params(project: Path, values: dict) -> None:
    from tuneline.flows.params_file import write_overrides

    write_overrides(project / "params.yaml", values)


def test_init_writes_a_committed_project_that_generates_its_own_dvc_yaml(tmp_path: Path, site_env):
    site, env = site_env
    project = tmp_path / "proj"
    out = tool(tmp_path, env, str(BIN / "tuneline"), "init", str(project))
    assert f"cd {project} && tuneline run" in out.stdout
    for name in ("params.yaml", "dvc.yaml", "prefect.yaml", "tuneline_flow.py", ".gitignore", ".dvcignore"):
        assert (project / name).is_file(), name
    assert tool(project, env, "git", "status", "--porcelain").stdout == ""  # everything committed
    assert (tmp_path / "proj-dvc-remote").is_dir()
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    assert stages["code"]["always_changed"] is True  # the installed code is outside: fingerprinted
    assert ".tuneline/code/train.json" in stages["train"]["deps"]
    assert not any(dep.startswith("tasks/") for stage in stages.values() for dep in stage.get("deps", []))
    # prefect.yaml's entry point exists in the folder and names the pipeline flow
    deployments = yaml.safe_load((project / "prefect.yaml").read_text())["deployments"]
    entry = deployments[0]["entrypoint"]
    module, _, flow = entry.partition(":")
    assert (project / module).is_file() and flow == "pipeline"
    # ...and the live loop's deployments (drift watch, promote on live evidence) are there too, their flows in that file
    assert [d["name"] for d in deployments] == ["nightly", "adhoc", "drift-watch", "promote-live"]
    import runpy

    from prefect import Flow

    flow_file = runpy.run_path(str(project / module))
    for deployment in deployments:
        module, _, flow = deployment["entrypoint"].partition(":")
        assert (project / module).is_file() and isinstance(flow_file.get(flow), Flow), deployment
    assert all(not s["active"] for d in deployments[2:] for s in d.get("schedules", []))
    assert tool(project, env, str(BIN / "tuneline"), "dvc-yaml", "--check").returncode == 0


def test_a_run_with_overrides_in_an_init_project_does_not_ask_git_for_the_code_fingerprints(tmp_path: Path, site_env):
    """The stages of an init'd project depend on the `code` stage's fingerprints (.tuneline/code/*.json, ignored by
    git): a run with overrides after a first run was refused with ".tuneline/code/evaluate.json: git does not
    track it". They are outputs, which the workspace's own `code` stage writes."""
    import logging

    from tuneline.flows.workspace import open_workspace

    site, env = site_env
    project = tmp_path / "proj"
    tool(tmp_path, env, str(BIN / "tuneline"), "init", str(project))
    tool(project, env, str(BIN / "tuneline"), "code-fingerprint")  # what a first run's `code` stage leaves behind
    assert (project / ".tuneline" / "code" / "train.json").is_file()
    with open_workspace(project, {"train.lr": 0.01}, logging.getLogger("test")) as workspace:
        assert workspace.isolated
        assert yaml.safe_load((workspace.root / "params.yaml").read_text())["train"]["lr"] == 0.01


def test_init_refuses_an_existing_project_and_missing_data_but_not_a_folder_named_like_tunelines(tmp_path: Path,
                                                                                                   site_env):
    _, env = site_env
    tuneline = str(BIN / "tuneline")
    project = tmp_path / "proj"
    tool(tmp_path, env, tuneline, "init", str(project))
    again = tool(tmp_path, env, tuneline, "init", str(project), ok=False)
    assert again.returncode == 2 and "already has params.yaml" in again.stderr

    mine = tmp_path / "mine"
    (mine / "tasks").mkdir(parents=True)
    (mine / "tasks" / "__init__.py").write_text("")
    (mine / "tasks" / "jobs.py").write_text("")
    tool(tmp_path, env, tuneline, "init", str(mine))  # Tuneline installs only `tuneline`: any folder name is fine
    assert sorted(p.name for p in (mine / "tasks").iterdir()) == ["__init__.py", "jobs.py"]
    assert tool(mine, env, "git", "ls-files", "tasks").stdout.split() == ["tasks/__init__.py", "tasks/jobs.py"]

    cifar = tool(tmp_path, env, tuneline, "init", str(tmp_path / "c10"), "--example", "cifar10", ok=False)
    assert cifar.returncode == 2 and "needs --data PATH" in cifar.stderr
    assert not (tmp_path / "c10").exists()


USER_NETS = """\
from torch import nn


def build(n_classes, in_channels, image_size, dropout, width=16):
    return nn.Sequential(nn.Conv2d(in_channels, width, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Dropout(dropout), nn.Linear(width * ((image_size[0] - 4) // 2) * ((image_size[1] - 4) // 2), n_classes))
"""


@pytest.mark.slow
def test_editing_installed_tuneline_code_or_the_users_network_retrains_while_data_stays_cached(tmp_path: Path,
                                                                                              site_env):
    site, env = site_env
    project = tmp_path / "proj"
    tool(tmp_path, env, str(BIN / "tuneline"), "init", str(project))
    (project / "mynets.py").write_text(USER_NETS)
    set_params(project, {**TINY, "model.arch": "mynets:build", "model.kwargs": {"width": 8}})
    tool(project, env, str(BIN / "tuneline"), "dvc-yaml")  # params now name the user's network module
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    for stage in ("tune", "train", "evaluate", "export"):
        assert "mynets.py" in stages[stage]["deps"], stage
    assert "mynets.py" not in stages["fetch"]["deps"] + stages["prepare"]["deps"]
    first = tool(project, env, str(BIN / "dvc"), "repro")
    for stage in ("fetch", "prepare", "train", "export"):
        assert f"Running stage '{stage}'" in first.stdout

    def assert_retrained_from_train_on(out: str) -> None:
        for stage in ("train", "evaluate", "export"):
            assert f"Running stage '{stage}'" in out, out
        for stage in ("fetch", "prepare"):  # the data stays cached
            assert f"Running stage '{stage}'" not in out and f"'{stage}' didn't change" in out

    # An edit to a module training imports, in the installed code: train and what follows rerun ...
    optim = site / "tuneline" / "tasks" / "train" / "optim.py"
    optim.write_text(optim.read_text() + "\n# an edit to the installed Tuneline\n")
    assert_retrained_from_train_on(tool(project, env, str(BIN / "dvc"), "repro").stdout)

    # ... and so does an edit to the user's network file.
    nets = project / "mynets.py"
    nets.write_text(nets.read_text().replace("nn.ReLU()", "nn.GELU()"))
    assert "train" in tool(project, env, str(BIN / "dvc"), "status").stdout
    assert_retrained_from_train_on(tool(project, env, str(BIN / "dvc"), "repro").stdout)

    # An edit to the server's code retrains nothing.
    app = site / "tuneline" / "serving" / "app.py"
    app.write_text(app.read_text() + "\n# a server edit\n")
    last = tool(project, env, str(BIN / "dvc"), "repro")
    assert [line for line in last.stdout.splitlines() if line.startswith("Running stage")] == ["Running stage 'code':"]
