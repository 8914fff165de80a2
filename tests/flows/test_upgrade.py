"""`tuneline upgrade`: a project made by the previous release (top-level `flows`/`tasks`/`serving` packages) runs
and serves with this one after one command; the rewrite touches only Tuneline's generated files.

The slow test builds the old project with the previous release's own code (git 1d19023, from this repository's
history), run end to end with it, then upgrades it with the installed package.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, cli_env

OLD_RELEASE = "1d19023"  # the last release with the top-level packages flows/, tasks/, serving/
BIN = Path(sys.executable).parent
# A run that takes seconds: a slice of MNIST, one epoch, a two-trial study of one epoch each, gates it passes.
TINY = {"data.limit_train": 1500, "data.limit_test": 300, "train.epochs": 1, "train.batch_size": 64,
        "tune.n_trials": 2, "tune.epochs": 1, "tune.limit_train": 500, "tune.limit_val": 200, "tune.pruner": "none",
        "gate.min_accuracy": 0.3, "gate.min_class_recall": 0.0, "gate.max_ece": 0.5,
        # A release may change the default recipe, so the upgraded run trains another model: on 300 test images
        # it may score a little under the old champion, which must not stop it registering (this is not a gate test).
        "gate.max_regression": 1.0,
        "export.int8": False, "export.latency_runs": 10}
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]


def write_params(project: Path, values: dict) -> None:
    from tuneline.flows.params_file import write_overrides

    write_overrides(project / "params.yaml", values)


def commit(project: Path, message: str) -> None:
    subprocess.run([*GIT, "add", "-A"], cwd=project, check=True)
    subprocess.run([*GIT, "commit", "-qm", message], cwd=project, check=True)


def run(cwd: Path, env: dict, *cmd: str, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if ok:
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


# -- the rewrite itself (no old release needed) --------------------------------------------------------------


def old_project(tmp_path: Path, flow_text: str | None = None) -> Path:
    """The files the previous release's `tuneline init` wrote that upgrade reads (flow file, prefect.yaml)."""
    from tuneline.flows.config_docs import render_params
    from tuneline.flows.upgrade import OLD_FLOW_TEXT, OLD_PREFECT_TEXT

    project = tmp_path / "proj"
    project.mkdir()
    (project / "params.yaml").write_text(render_params({"project": {"name": "mnist"}}))
    (project / "tuneline_flow.py").write_text(OLD_FLOW_TEXT if flow_text is None else flow_text)
    (project / "prefect.yaml").write_text(OLD_PREFECT_TEXT.format(name="mnist", project=project,
                                                                  flow_file="tuneline_flow.py"))
    return project


@pytest.mark.fast
def test_upgrade_replaces_the_old_generated_files_and_a_second_run_has_nothing_to_do(tmp_path: Path):
    from tuneline.core.config.base import ConfigError
    from tuneline.flows.init import FLOW_TEXT, PREFECT_TEXT
    from tuneline.flows.upgrade import check_upgraded, upgrade_project

    project = old_project(tmp_path)
    with pytest.raises(ConfigError, match=r"imports flows\.pipeline and flows\.shadowing.*run `tuneline upgrade`"):
        check_upgraded(project)
    changes, _ = upgrade_project(project)
    assert sorted(c.path.name for c in changes) == ["prefect.yaml", "tuneline_flow.py"]
    assert (project / "tuneline_flow.py").read_text() == FLOW_TEXT
    assert (project / "prefect.yaml").read_text() == PREFECT_TEXT.format(name="mnist", project=project,
                                                                        flow_file="tuneline_flow.py")
    check_upgraded(project)
    assert upgrade_project(project) == ([], [])
    assert not [p.name for p in project.iterdir() if p.name.endswith(".tmp")]  # written via temp file + rename


@pytest.mark.fast
def test_a_key_dvc_yaml_reads_is_added_to_an_older_params_yaml_with_its_default(tmp_path: Path):
    """dvc.yaml templates `${paths.…}` from params.yaml itself: a path this release added is missing from a project's
    params.yaml, and DVC fails to resolve the stage ("Could not find 'paths.…'") until upgrade adds it."""
    from tuneline.core.config.base import ConfigError
    from tuneline.flows.upgrade import check_upgraded, upgrade_project

    project = old_project(tmp_path)
    upgrade_project(project)  # the flow file and prefect.yaml: this test is about params.yaml
    params = project / "params.yaml"
    full = params.read_text()
    line = next(text for text in full.splitlines(keepends=True) if text.startswith("  confusion_png:"))
    params.write_text(full.replace(line, ""))
    with pytest.raises(ConfigError, match=r"params.yaml: lacks paths.confusion_png.*run `tuneline upgrade`"):
        check_upgraded(project)
    changes, _ = upgrade_project(project)
    assert [c.path.name for c in changes] == ["params.yaml"]
    after = params.read_text()
    assert yaml.safe_load(after) == yaml.safe_load(full)  # the same values; the rest of the file as it was
    others = [text for text in after.splitlines() if not text.startswith("  confusion_png:")]
    assert others == [text for text in full.splitlines() if text != line.rstrip("\n")]  # every other line kept
    assert after.index("confusion_png:") < after.index("\ndata:")  # in its own section
    check_upgraded(project)


EDITED_FLOW = '''\
"""My entry point."""
from pathlib import Path

from flows.shadowing import check_not_shadowed

check_not_shadowed(Path(__file__).parent)

from flows.pipeline import pipeline  # noqa: E402
from tasks.ship.registry import Registry
from mylib.extra import hook


def nightly():
    hook(Registry)
    return pipeline(project_dir=str(Path(__file__).parent))
'''


@pytest.mark.fast
def test_an_edited_flow_file_keeps_its_text_with_only_tunelines_imports_renamed(tmp_path: Path):
    from tuneline.flows.upgrade import upgrade_project

    project = old_project(tmp_path, EDITED_FLOW)
    changes, _ = upgrade_project(project)
    assert [c.path.name for c in changes if "edited by you" in c.why] == ["tuneline_flow.py"]
    assert (project / "tuneline_flow.py").read_text() == EDITED_FLOW.replace(
        "from flows.shadowing import check_not_shadowed\n", "").replace(
        "check_not_shadowed(Path(__file__).parent)\n", "").replace(
        "from flows.pipeline", "from tuneline.flows.pipeline").replace(
        "from tasks.ship", "from tuneline.tasks.ship")
    assert upgrade_project(project)[0] == []


@pytest.mark.fast
@pytest.mark.parametrize("line, says", [
    ("import flows.pipeline", "line 2: `import flows.pipeline` binds the old package name: write `from "
                              "tuneline.flows.pipeline import …`"),
    ("from tasks.config import ConfigError", "line 2: `from tasks.config import …`: this release has no module "
                                             "tuneline.tasks.config"),
    ("from flows.pipeline import no_such_flow", "this release has no no_such_flow in tuneline.flows.pipeline"),
])
def test_an_edited_flow_file_that_cannot_be_renamed_safely_is_refused_untouched(tmp_path: Path, line: str, says: str):
    from tuneline.core.config.base import ConfigError
    from tuneline.flows.upgrade import upgrade_project

    text = f'"""Mine."""\n{line}\n'
    project = old_project(tmp_path, text)
    prefect_before = (project / "prefect.yaml").read_text()
    with pytest.raises(ConfigError) as refused:
        upgrade_project(project)
    assert says in str(refused.value) and "change that by hand" in str(refused.value)
    assert (project / "tuneline_flow.py").read_text() == text  # nothing written, not even the other files
    assert (project / "prefect.yaml").read_text() == prefect_before


@pytest.mark.fast
def test_a_projects_own_tasks_package_is_not_taken_for_tunelines(tmp_path: Path):
    from tuneline.flows.init import FLOW_TEXT
    from tuneline.flows.upgrade import check_upgraded, upgrade_project

    project = old_project(tmp_path, FLOW_TEXT + "from tasks.jobs import nightly_job  # the user's own package\n")
    (project / "tasks").mkdir()
    (project / "tasks" / "jobs.py").write_text("def nightly_job():\n    pass\n")
    check_upgraded(project)
    assert [c.path.name for c in upgrade_project(project)[0]] == ["prefect.yaml"]


# -- the previous release's project, upgraded end to end -------------------------------------------------------


def previous_release(dest: Path) -> Path:
    """The previous release's packages (flows/, tasks/, serving/) from git history, as a folder for PYTHONPATH."""
    found = subprocess.run(["git", "cat-file", "-e", f"{OLD_RELEASE}^{{commit}}"], cwd=REPO, capture_output=True)
    if found.returncode != 0:
        pytest.fail(f"git commit {OLD_RELEASE} (the previous release) is not in {REPO}: this test builds a project "
                    "with it; run it in a full clone (`git fetch --unshallow`)")
    archive = subprocess.run(["git", "archive", OLD_RELEASE, "flows", "tasks", "serving"], cwd=REPO,
                             capture_output=True, check=True).stdout
    tree = dest / "old-release"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tree, filter="data")
    return tree


def old_release_env(tmp_path: Path, mirror: Path) -> dict:
    """An environment in which `tuneline` (dvc.yaml's stage commands included) is the previous release."""
    tree = previous_release(tmp_path)
    shims = tmp_path / "old-bin"
    shims.mkdir()
    shim = shims / "tuneline"
    shim.write_text(f'#!/bin/sh\nPYTHONPATH="{tree}" exec "{sys.executable}" -m flows.cli "$@"\n')
    shim.chmod(0o755)
    env = cli_env(mirror)
    env.update(PATH=f"{shims}{os.pathsep}{env['PATH']}", PYTHONPATH=str(tree))
    return env


def studies(project: Path) -> dict[str, int]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{project / 'tuning' / 'study.db'}"
    return {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(url, include_best_trial=False)}


@pytest.mark.slow
def test_a_project_of_the_previous_release_runs_and_serves_after_tuneline_upgrade(tmp_path: Path, mnist_mirror: Path):
    started = time.monotonic()
    project = tmp_path / "proj"
    old = old_release_env(tmp_path, mnist_mirror)
    run(tmp_path, old, "tuneline", "init", str(project))
    assert "from flows.pipeline import pipeline" in (project / "tuneline_flow.py").read_text()  # really the old one
    write_params(project, TINY)
    commit(project, "tiny")
    first = run(project, old, "tuneline", "run")
    assert "v0001 promoted to champion" in first.stdout
    assert (project / "registry" / "models" / "mnist" / "aliases" / "champion.json").is_file()
    before = studies(project)
    assert list(before.values()) == [2], before
    commit(project, "the old release's first run")

    new = cli_env(mnist_mirror)  # the installed package: no PYTHONPATH, the venv's `tuneline`
    refused = run(project, new, str(BIN / "tuneline"), "run", ok=False)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.strip().splitlines() == [refused.stderr.strip()]  # one line, no traceback
    assert "imports flows.pipeline" in refused.stderr and "run `tuneline upgrade`" in refused.stderr

    head = run(project, new, "git", "rev-parse", "HEAD").stdout
    upgraded = run(project, new, str(BIN / "tuneline"), "upgrade")
    assert "tuneline_flow.py" in upgraded.stdout and "prefect.yaml" in upgraded.stdout
    assert "commit them: git add" in upgraded.stdout
    # The weight average came with a default that trains differently: the old project keeps training as it did.
    assert "train.ema: 0.0, which keeps this project training as the release before did" in upgraded.stdout
    assert yaml.safe_load((project / "params.yaml").read_text())["train"]["ema"] == 0.0
    assert run(project, new, "git", "rev-parse", "HEAD").stdout == head  # nothing committed by the upgrade
    assert "nothing to upgrade" in run(project, new, str(BIN / "tuneline"), "upgrade").stdout
    # prefect.yaml's entry point loads with this release (what a deployment's worker does)
    entry = yaml.safe_load((project / "prefect.yaml").read_text())["deployments"][0]["entrypoint"]
    run(project, new, sys.executable, "-c", f"from prefect.flows import load_flow_from_entrypoint as load; "
                                            f"assert load({entry!r}).name == 'tuneline'")

    write_params(project, {"tune.n_trials": 3})  # a larger budget continues the same study
    commit(project, "tuneline upgrade")
    second = run(project, new, str(BIN / "tuneline"), "run")
    assert "v0002" in second.stdout, second.stdout[-2000:]
    assert studies(project) == {name: 3 for name in before}  # the study continued, not restarted

    listed = run(project, new, str(BIN / "tuneline"), "models", "list").stdout
    assert "v0001" in listed and "v0002" in listed
    champion = next(line.split()[1] for line in listed.splitlines() if line.startswith("mnist ") and "champion" in line)
    assert_serves(project, new, champion, tmp_path)
    print(f"old release init + run, upgrade, run, serve: {time.monotonic() - started:.0f} s")


def assert_serves(project: Path, env: dict, champion: str, tmp_path: Path) -> None:
    """`tuneline serve` in the project answers one classification over loopback, from the champion."""
    import httpx
    import numpy as np
    from PIL import Image

    from tests.serving.conftest import free_port, wait_until
    from tuneline.tasks.data.shards import first_records

    image = tmp_path / "digit.png"
    Image.fromarray(first_records(project / "data" / "prepared", "test", 1)[0][0, 0]).save(image)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(BIN / "tuneline"), "serve", "--port", str(port)], cwd=project, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: server.poll() is None and httpx.get(url + "/v2/health/ready").status_code == 200,
                   timeout=90, what="tuneline serve ready")
        predicted = run(tmp_path, env, str(BIN / "tuneline"), "predict", str(image), "--url", url)
        assert f"mnist {champion})" in predicted.stdout, predicted.stdout
    finally:
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=30)
    assert server.returncode == -signal.SIGTERM, stderr[-2000:]
