"""End to end, as a user runs it: `tuneline run` (Prefect, embedded API) and `dvc repro` in a project copy,
on a small slice of the real MNIST, on CPU.

The story (params.yaml set for a small slice; a run with an override gate above reach fails in its own
workspace; the checkout's run passes and promotes; nothing changed; same weights again as an experiment; promote
and roll back by hand; two runs with overrides at once, each judged by its own gate) runs once per session in
the `story` fixture, which keeps what each step printed and left behind; each test below checks one part of
it, so that one failure hides no other.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import onnx
import pytest
import torch
import yaml

from tuneline.tasks.data.prepare import load_split
from tuneline.tasks.model.checkpoint import load_checkpoint
from tuneline.core.onnx_session import open_session
from tuneline.tasks.ship.registry import Registry
from tuneline.flows.params_file import write_overrides
from tuneline.core.config.overrides import parse_overrides
from tests.conftest import cli_env, make_project, once_per_session
from tests.tasks.test_summary import markdown_links
from tests.module_copies import module_log_env, stray_modules_in_log

pytestmark = pytest.mark.slow

SLICE = ["data.limit_train=3000", "data.limit_test=600", "train.epochs=2", "train.batch_size=64",
         # a real but small study: 3 one-epoch trials on 1,000 images, searching the lr only
         "tune.n_trials=3", "tune.epochs=1", "tune.limit_train=1000", "tune.limit_val=250",
         "tune.space={train.lr: {type: float, low: 0.003, high: 0.008, log: true}}",
         "gate.min_class_recall=0.8", "gate.max_ece=0.1"]  # quality bars a 2-epoch model on a slice can meet
BIN = Path(sys.executable).parent
GATE_ROW = "| `gate.min_accuracy` | test accuracy |"


def tuneline(project: Path, mirror: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "tuneline"), *args], cwd=project, env=env or cli_env(mirror),
                          capture_output=True, text=True, timeout=600)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lock_md5(project: Path, stage: str) -> str:
    return yaml.safe_load((project / "dvc.lock").read_text())["stages"][stage]["outs"][0]["md5"]


# --- the five-run story ------------------------------------------------------------------------------------------

# What a step keeps of the project (copied right after it): its outputs, the registry and the files DVC reads.
KEPT = ("metrics", "models", "reports", "registry", "tuning", "params.yaml", "dvc.lock", "registry.dvc")


@dataclass(frozen=True)
class Step:
    """One command of the story: its exit code and output, and the project as it left it (`state`)."""

    returncode: int
    stdout: str
    stderr: str
    dvc_status: str | None  # `dvc status` right after, where the story asks
    state: Path

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def json(self, name: str) -> dict:
        return json.loads((self.state / name).read_text())

    def text(self, name: str) -> str:
        return (self.state / name).read_text()


def _run_story(folder: Path, mirror: Path) -> None:
    """Run the story's commands in order in a project copy under `folder`, keeping each step (never asserting:
    every step runs, whatever an earlier one did, and the tests judge)."""
    project = make_project(folder)
    # Every Python process of the story logs the modules it loaded (tests/module_copies.py).
    env = module_log_env(cli_env(mirror), folder / "module-log")
    # The project's own choices for this story live in its params.yaml; overrides are per-run experiments.
    write_overrides(project / "params.yaml", parse_overrides([*SLICE, "gate.min_accuracy=0.85"]))
    _keep(project, folder / "steps" / "initial", {"returncode": 0, "stdout": "", "stderr": "", "dvc_status": None})
    commands = {
        "gate_fails": ["run", "-S", "gate.min_accuracy=0.999"],
        "gate_passes": ["run"],
        "unchanged": ["run"],
        "same_weights": ["run", "-S", "export.int8=false"],
        "promote": ["models", "promote", "v0002"],
        "rollback": ["models", "rollback"],
        "concurrent": None,  # two runs with overrides at once (below)
    }
    for name, args in commands.items():
        if args is None:
            _run_concurrently(project, env, folder / "steps")
            continue
        done = tuneline(project, mirror, *args, env=env)
        status = None
        if name in ("gate_passes", "rollback"):
            checked = subprocess.run([str(BIN / "dvc"), "status"], cwd=project, env=env,
                                     capture_output=True, text=True)
            status = checked.stdout + checked.stderr
        _keep(project, folder / "steps" / name, {"returncode": done.returncode, "stdout": done.stdout,
                                                 "stderr": done.stderr, "dvc_status": status})


def _keep(project: Path, state: Path, step: dict) -> None:
    state.mkdir(parents=True)
    for kept in KEPT:
        source = project / kept
        if source.is_dir():
            shutil.copytree(source, state / kept, ignore=shutil.ignore_patterns("checkpoints"))
        elif source.is_file():
            shutil.copy2(source, state / kept)
    (state / "step.json").write_text(json.dumps(step))


def _run_concurrently(project: Path, env: dict[str, str], steps: Path) -> None:
    """Two runs with different gates started together: each runs in its own workspace, judged by its own gate."""
    gates = {"concurrent_low": "gate.min_accuracy=0.5", "concurrent_high": "gate.min_accuracy=0.999"}
    children = {name: subprocess.Popen([str(BIN / "tuneline"), "run", "--no-push", "-S", gate], cwd=project,
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for name, gate in gates.items()}
    for name, child in children.items():
        stdout, stderr = child.communicate(timeout=600)
        _keep(project, steps / name, {"returncode": child.returncode, "stdout": stdout, "stderr": stderr,
                                      "dvc_status": None})


@pytest.fixture(scope="module")
def story_folder(tmp_path_factory: pytest.TempPathFactory, mnist_mirror: Path) -> Path:
    return once_per_session(tmp_path_factory, "pipeline-story", lambda folder: _run_story(folder, mnist_mirror))


@pytest.fixture(scope="module")
def story(story_folder: Path) -> dict[str, Step]:
    """Each step of the story by name (the keys of `commands` in _run_story)."""
    return {state.name: Step(**json.loads((state / "step.json").read_text()), state=state)
            for state in (story_folder / "steps").iterdir()}


@pytest.fixture(scope="module")
def story_project(story_folder: Path) -> Path:
    """The story's project as the last step left it (its data/prepared is the same after every step)."""
    return story_folder / "project"


def test_no_file_of_tuneline_is_loaded_under_two_names_in_any_process_of_the_runs(story_folder: Path):
    """The CLI, Prefect's flow, each DVC stage command and the tuning workers import Tuneline only as `tuneline.…`
    (a second name for one file is a second copy of every class in it)."""
    processes, strays = stray_modules_in_log(story_folder / "module-log")
    assert processes >= 10, f"only {processes} processes logged their modules: is the module log wired?"
    assert not strays, "\n".join(strays)


def test_a_gate_above_reach_fails_the_run_and_ships_nothing(story):
    failed = story["gate_fails"]
    assert failed.returncode == 1, failed.output
    assert "gate gate.min_accuracy FAILED: test accuracy" in failed.stderr
    assert "threshold 0.9990" in failed.stderr
    assert "| `gate.min_accuracy` | test accuracy |" in failed.stderr  # the whole table is in the run's message
    assert not (failed.state / "models" / "model.onnx").exists()
    assert not (failed.state / "registry").exists()  # nothing registered, nothing promoted


@pytest.mark.slow
def test_a_failed_gate_prints_the_reason_then_the_table_once_and_no_traceback(story):
    failed = story["gate_fails"]  # `tuneline run` with gate.min_accuracy=0.999 on a slice of MNIST
    assert failed.returncode == 1, failed.output
    assert "Traceback" not in failed.output
    assert failed.output.count(GATE_ROW) == 1, failed.stderr
    lines = failed.stderr.splitlines()
    (reason,) = [i for i, line in enumerate(lines) if line.startswith("tuneline: run failed: ")]
    assert re.fullmatch(r"tuneline: run failed: gate gate\.min_accuracy FAILED: test accuracy 0\.\d{4} vs threshold "
                        r"0\.9990 \(margin -0\.\d{4}\): the model is not exported", lines[reason])
    assert lines[reason + 2].startswith("| gate | metric |") and GATE_ROW in lines[reason + 4]
    # Prefect's own lines about the failure are one line each (the state messages carry the reason, not the table)
    finished = [line for line in lines if "Finished in state Failed" in line]
    assert len(finished) == 2 and all("gate gate.min_accuracy FAILED" in line for line in finished)


def test_a_run_with_overrides_leaves_the_checkout_as_it_was_whether_it_fails_or_passes(story, story_project):
    # A run with an override that failed its gate left params.yaml and the checkout's outputs as they were ...
    for name in ("params.yaml", "metrics/eval.json", "reports/run_summary.md"):
        assert story["gate_fails"].text(name) == story["initial"].text(name), name
    # ... and runs with overrides that passed (one registered a challenger) changed nothing the checkout's run wrote.
    for name in ("params.yaml", "dvc.lock", "metrics/eval.json", "metrics/export.json", "reports/run_summary.md"):
        assert story["same_weights"].text(name) == story["unchanged"].text(name), name
    assert not list((story_project / ".tuneline" / "runs").glob("run-*"))  # every workspace was removed


def test_a_run_with_overrides_is_a_dvc_experiment_with_its_params_and_metrics(story, story_project):
    same = story["same_weights"]
    (name,) = re.findall(r"experiment:\s+(run-[\w-]+)", same.stdout)
    shown = subprocess.run([str(BIN / "dvc"), "exp", "show", "--json"], cwd=story_project, capture_output=True,
                           text=True, env=cli_env(Path(".")))
    assert shown.returncode == 0, shown.stderr
    assert name in shown.stdout
    exported = subprocess.run(["git", "show", f"{_exp_ref(story_project, name)}:params.yaml"], cwd=story_project,
                              capture_output=True, text=True, check=True).stdout
    assert yaml.safe_load(exported)["export"]["int8"] is False  # the run's params, recorded; the checkout's unchanged
    assert yaml.safe_load(same.text("params.yaml"))["export"]["int8"] is True


def _exp_ref(project: Path, name: str) -> str:
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=project,
                          capture_output=True, text=True, check=True).stdout.split()
    (ref,) = [r for r in refs if r.endswith("/" + name)]
    return ref


def test_two_runs_at_once_are_each_judged_by_their_own_gate(story):
    low, high = story["concurrent_low"], story["concurrent_high"]
    assert low.returncode == 0, low.output
    assert high.returncode == 1 and "gate gate.min_accuracy FAILED" in high.stderr and "threshold 0.9990" in high.stderr
    assert "threshold 0.9990" not in low.output
    # Both started from what the checkout's run made (the shared DVC cache and run-cache): nothing retrained.
    for run in (low, high):
        assert "train: done" not in run.output and "tune: done" not in run.output


def test_a_reachable_gate_completes_and_says_where_the_model_is(story, story_project):
    done = story["gate_passes"]
    assert done.returncode == 0, done.output
    assert f"ONNX model:   {story_project / 'models' / 'model.onnx'}" in done.stdout
    assert "run summary:" in done.stdout
    metrics = done.json("metrics/eval.json")
    assert metrics["gates_passed"] is True and metrics["accuracy"] >= 0.85
    assert metrics["n_test"] == 600


def test_after_a_failed_gate_the_next_run_restores_its_stages_from_the_run_cache(story):
    # Run 1 failed at the gate in its own workspace after fetch..train: run 2 restored them (DVC's run-cache).
    summary = story["gate_passes"].text("reports/run_summary.md")
    assert "fetch restored, prepare restored, tune restored, train restored, evaluate ran, export ran" in summary


def test_exported_onnx_matches_the_checkpoint(story, story_project):
    # Parity of the exported file with the PyTorch checkpoint, on real test images, at batch 256.
    done = story["gate_passes"]
    model, _ = load_checkpoint(done.state / "models" / "model.pt")
    images, _ = load_split(story_project / "data" / "prepared", "test")
    pixels = images[:256].float()
    with torch.no_grad():
        expected = model(pixels).numpy()
    (actual,) = open_session(done.state / "models" / "model.onnx").run(["logits"], {"pixels": pixels.numpy()})
    assert np.abs(actual - expected).max() <= 1e-4


def test_lineage_is_the_data_version_dvc_lock_records(story):
    # The data version in the checkpoint and the ONNX metadata is the DVC hash dvc.lock records.
    done = story["gate_passes"]
    data_version = lock_md5(done.state, "fetch")
    assert data_version.endswith(".dir")
    _, checkpoint = load_checkpoint(done.state / "models" / "model.pt")
    assert checkpoint["lineage"]["data_version"] == data_version
    metadata = {p.key: p.value for p in onnx.load(str(done.state / "models" / "model.onnx")).metadata_props}
    assert metadata["data_version"] == data_version
    assert json.loads(metadata["labels"]) == [str(d) for d in range(10)]
    assert metadata["git_commit"] == checkpoint["lineage"]["git_commit"] != "unknown"
    summary = done.text("reports/run_summary.md")
    assert data_version in summary and "gate.min_accuracy" in summary


def test_the_checkouts_run_is_recorded_in_dvc_lock_and_pushed(story, story_project):
    done = story["gate_passes"]
    params = yaml.safe_load(done.text("params.yaml"))
    assert params["train"]["epochs"] == 2 and params["gate"]["min_accuracy"] == 0.85
    # dvc.lock tells the truth: nothing to reproduce (the registry is DVC data too: registry.dvc).
    assert "up to date" in done.dvc_status, done.dvc_status
    assert (done.state / "registry.dvc").is_file()
    remote = story_project.parent / "dvc-remote"
    assert any(p.is_file() for p in remote.rglob("*")), "dvc push put nothing in the remote"


def test_the_first_model_past_every_gate_becomes_champion_with_its_variants(story):
    done = story["gate_passes"]
    assert "v0001 promoted to champion: the first model (no champion yet)" in done.stdout
    registry = Registry(done.state / "registry")
    assert registry.alias("champion")["version"] == "v0001"
    card = registry.verify("v0001")
    assert card["files"]["model.onnx"]["sha256"] == sha256(done.state / "models" / "model.onnx")
    assert card["lineage"]["data_version"] == lock_md5(done.state, "fetch")
    int8 = done.json("metrics/export.json")["variants"]["int8"]  # evaluated; kept or rejected by max_quant_drop
    assert int8["kept"] == ("model.int8.onnx" in card["files"]) == (int8["drop"] <= 0.005)
    summary = done.text("reports/run_summary.md")
    assert f"int8 variant**: test accuracy {int8['accuracy']:.4f}, drop {int8['drop']:+.4f}" in summary
    # Its links open from reports/: the card (by model name), the ONNX file, the two pictures the stages drew.
    links = markdown_links(summary)
    assert {"../registry/models/mnist/versions/v0001/card.json", "../metrics/confusion.png",
            "../metrics/train_curves.png"} <= set(links)
    assert all((done.state / "reports" / unquote(link)).is_file() for link in links), links
    assert "ONNX Runtime** (CPUExecutionProvider): p50" in summary and "gate.max_latency_p99_ms" in summary


def test_tuning_ran_a_study_whose_best_lr_trained_the_model(story):
    done = story["gate_passes"]
    best = done.json("tuning/best_params.json")
    assert len(done.text("tuning/trials.csv").strip().splitlines()) == 1 + 3
    _, checkpoint = load_checkpoint(done.state / "models" / "model.pt")
    assert checkpoint["params"]["train"]["lr"] == best["params"]["train.lr"] != 0.001
    summary = done.text("reports/run_summary.md")
    assert "## Tuning" in summary and f"Study `{best['study']}`" in summary


def test_an_unchanged_rerun_is_all_cache_hits_and_rewrites_nothing(story):
    again = story["unchanged"]
    assert again.returncode == 0, again.output
    assert ("fetch cached, prepare cached, tune cached, train cached, evaluate cached, export cached"
            in again.text("reports/run_summary.md"))
    assert sha256(again.state / "models" / "model.pt") == sha256(story["gate_passes"].state / "models" / "model.pt")
    assert "model.onnx is already registered as v0001 (champion): unchanged" in again.stdout


def test_a_new_export_of_the_same_weights_is_kept_as_challenger_and_says_why(story):
    same = story["same_weights"]  # export.int8=false: a new file, no better
    assert same.returncode == 0, same.output
    accuracy = f"{story['gate_passes'].json('metrics/eval.json')['accuracy']:.4f}"
    assert (f"v0002 kept as challenger, not promoted: test accuracy {accuracy} vs champion v0001 {accuracy} on the "
            "same 600 test images (change +0.0000 < gate.min_improvement 0.0010); champion v0001 stays") in same.stdout
    registry = Registry(same.state / "registry")
    assert registry.alias("champion")["version"] == "v0001" and registry.alias("challenger")["version"] == "v0002"


def test_promote_and_rollback_by_hand_are_recorded_in_registry_dvc(story):
    promoted, rolled = story["promote"], story["rollback"]
    assert promoted.returncode == 0 and "champion -> v0002 (previous: v0001)" in promoted.stdout, promoted.output
    assert Registry(promoted.state / "registry").alias("champion")["version"] == "v0002"
    assert rolled.returncode == 0 and "champion rolled back -> v0001" in rolled.stdout, rolled.output
    assert Registry(rolled.state / "registry").alias("champion")["version"] == "v0001"
    assert "up to date" in rolled.dvc_status, rolled.dvc_status


# --- other end-to-end runs ---------------------------------------------------------------------------------------


def test_dvc_repro_runs_the_stages_then_none(project: Path, mnist_mirror: Path):
    params_path = project / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    for kv in [*SLICE, "gate.min_accuracy=0.8"]:
        key, value = kv.split("=", 1)
        section, name = key.split(".")
        params[section][name] = yaml.safe_load(value)
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    dvc = str(BIN / "dvc")
    first = subprocess.run([dvc, "repro"], cwd=project, env=cli_env(mnist_mirror), capture_output=True, text=True)
    assert first.returncode == 0, first.stdout + first.stderr
    for stage in ("fetch", "prepare", "tune", "train", "evaluate", "export"):
        assert f"Running stage '{stage}'" in first.stdout
    assert (project / "models" / "model.onnx").is_file()
    second = subprocess.run([dvc, "repro"], cwd=project, env=cli_env(mnist_mirror), capture_output=True, text=True)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Running stage" not in second.stdout
    assert "didn't change, skipping" in second.stdout
    push = subprocess.run([dvc, "push"], cwd=project, env=cli_env(mnist_mirror), capture_output=True, text=True)
    assert push.returncode == 0, push.stdout + push.stderr
    assert any(p.is_file() for p in (project.parent / "dvc-remote").rglob("*"))


def test_a_run_with_overrides_killed_mid_training_resumes_from_its_checkpoint(project: Path, mnist_mirror: Path):
    """SIGKILL a run with overrides mid-training, then rerun it with the same overrides: the stages it finished
    come back from DVC's run-cache, training resumes from the project's checkpoint, the dead workspace goes."""
    import os
    import signal
    import time

    args = [arg for kv in [*SLICE, "train.epochs=8", "gate.min_accuracy=0.8", "gate.min_class_recall=0.5",
                           "gate.max_ece=0.2", "export.int8=false"] for arg in ("-S", kv)]
    child = subprocess.Popen([str(BIN / "tuneline"), "run", "--no-push", *args], cwd=project, env=cli_env(mnist_mirror),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    resume = project / "models" / "checkpoints" / "last.pt"  # checkpoints belong to the project, not the workspace
    deadline = time.monotonic() + 300
    while not resume.exists():  # training has finished an epoch: kill the whole run (flow, server, all)
        assert child.poll() is None and time.monotonic() < deadline, "the run ended before its first epoch checkpoint"
        time.sleep(0.1)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    (dead,) = [p for p in (project / ".tuneline" / "runs").glob("run-*") if p.is_dir()]  # left behind

    again = tuneline(project, mnist_mirror, "run", "--no-push", *args)
    output = again.stdout + again.stderr
    assert again.returncode == 0, output
    assert "removed the workspace of a run that did not finish" in output and not dead.exists()
    for stage in ("fetch", "prepare", "tune"):
        assert f"{stage}: restored from DVC's run-cache" in output
    assert "train: resuming from" in output and "resumed_from_epoch=0" not in output
    (name,) = re.findall(r"experiment:\s+(run-[\w-]+)", again.stdout)
    history = subprocess.run(["git", "show", f"{_exp_ref(project, name)}:metrics/train_history.csv"], cwd=project,
                             capture_output=True, text=True, check=True).stdout
    assert [int(row.split(",")[0]) for row in history.strip().splitlines()[1:]] == list(range(1, 9))
    assert not (project / "models" / "model.pt").exists()  # the checkout's outputs were never written
