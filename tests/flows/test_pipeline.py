"""End to end, as a user runs it: `tuneline run` (Prefect, embedded API) and `dvc repro` in a project copy,
on a small slice of the real MNIST, on CPU."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml

from tasks.model.checkpoint import load_checkpoint
from tasks.ship.onnx_session import open_session
from tasks.data.prepare import load_split
from tasks.ship.registry import Registry
from tests.conftest import cli_env

pytestmark = pytest.mark.slow

SLICE = ["data.limit_train=3000", "data.limit_test=600", "train.epochs=2", "train.batch_size=64",
         # a real but small study: 3 one-epoch trials on 1,000 images, searching the lr only
         "tune.n_trials=3", "tune.epochs=1", "tune.limit_train=1000", "tune.limit_val=250",
         "tune.space={train.lr: {type: float, low: 0.0005, high: 0.002, log: true}}",
         "gate.min_class_recall=0.8", "gate.max_ece=0.1"]  # quality bars a 2-epoch model on a slice can meet
BIN = Path(sys.executable).parent


def tuneline(project: Path, mirror: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "tuneline"), *args], cwd=project, env=cli_env(mirror), capture_output=True,
                          text=True, timeout=600)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lock_md5(project: Path, stage: str) -> str:
    return yaml.safe_load((project / "dvc.lock").read_text())["stages"][stage]["outs"][0]["md5"]


def test_flow_gates_exports_records_lineage_and_skips_unchanged(project: Path, mnist_mirror: Path):
    overrides = [arg for kv in SLICE for arg in ("-S", kv)]

    # 1. A gate above what the model reaches: the run fails with the gate's numbers, nothing is exported.
    failed = tuneline(project, mnist_mirror, "run", *overrides, "-S", "gate.min_accuracy=0.999")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "gate gate.min_accuracy FAILED: test accuracy" in failed.stderr
    assert "threshold 0.9990" in failed.stderr
    assert "| `gate.min_accuracy` | test accuracy |" in failed.stderr  # the whole table is in the run's message
    assert not (project / "models" / "model.onnx").exists()
    assert not (project / "registry").exists()  # nothing registered, nothing promoted
    metrics = json.loads((project / "metrics" / "eval.json").read_text())
    assert metrics["gates_passed"] is False and metrics["gates"][0]["margin"] < 0

    # 2. A reachable gate: the run completes and says where the model and summary are.
    done = tuneline(project, mnist_mirror, "run", *overrides, "-S", "gate.min_accuracy=0.85")
    assert done.returncode == 0, done.stdout + done.stderr
    onnx_path = project / "models" / "model.onnx"
    assert f"ONNX model:   {onnx_path}" in done.stdout
    assert "run summary:" in done.stdout
    metrics = json.loads((project / "metrics" / "eval.json").read_text())
    assert metrics["gates_passed"] is True and metrics["accuracy"] >= 0.85
    assert metrics["n_test"] == 600

    # Parity of the exported file with the PyTorch checkpoint, on real test images, at batch 256.
    model, checkpoint = load_checkpoint(project / "models" / "model.pt")
    images, _ = load_split(project / "data" / "prepared", "test")
    pixels = images[:256].unsqueeze(1).float()
    with torch.no_grad():
        expected = model(pixels).numpy()
    (actual,) = open_session(onnx_path).run(["logits"], {"pixels": pixels.numpy()})
    assert np.abs(actual - expected).max() <= 1e-4

    # Lineage: the data version in the checkpoint and the ONNX metadata is the DVC hash dvc.lock records.
    data_version = lock_md5(project, "fetch")
    assert data_version.endswith(".dir")
    assert checkpoint["lineage"]["data_version"] == data_version
    metadata = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert metadata["data_version"] == data_version
    assert json.loads(metadata["labels"]) == [str(d) for d in range(10)]
    assert metadata["git_commit"] == checkpoint["lineage"]["git_commit"] != "unknown"

    # The overrides were written to params.yaml, so dvc.lock tells the truth: nothing to reproduce.
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["train"]["epochs"] == 2 and params["gate"]["min_accuracy"] == 0.85
    status = subprocess.run([str(BIN / "dvc"), "status"], cwd=project, env=cli_env(mnist_mirror),
                            capture_output=True, text=True, check=True)
    assert "up to date" in status.stdout, status.stdout
    remote = project.parent / "dvc-remote"
    assert any(p.is_file() for p in remote.rglob("*")), "dvc push put nothing in the remote"
    summary = (project / "reports" / "run_summary.md").read_text()
    assert data_version in summary and "gate.min_accuracy" in summary

    # The first model that passes every gate becomes champion; its registry version is what was exported.
    assert "v0001 promoted to champion: the first model (no champion yet)" in done.stdout
    registry = Registry(project / "registry")
    assert registry.alias("champion")["version"] == "v0001"
    card = registry.verify("v0001")
    assert card["files"]["model.onnx"]["sha256"] == sha256(onnx_path)
    assert card["lineage"]["data_version"] == data_version
    exported = json.loads((project / "metrics" / "export.json").read_text())
    int8 = exported["variants"]["int8"]  # evaluated, and kept or rejected by export.max_quant_drop
    assert int8["kept"] == ("model.int8.onnx" in card["files"]) == (int8["drop"] <= 0.005)
    assert f"int8 variant**: test accuracy {int8['accuracy']:.4f}, drop {int8['drop']:+.4f}" in summary
    assert "ONNX Runtime** (CPUExecutionProvider): p50" in summary and "gate.max_latency_p99_ms" in summary
    assert (project / "registry.dvc").is_file()  # the registry is DVC data; `dvc status` above covered it

    # Tuning ran a real study; the final model was trained with the best trial's lr, and the summary shows it.
    best = json.loads((project / "tuning" / "best_params.json").read_text())
    assert len((project / "tuning" / "trials.csv").read_text().strip().splitlines()) == 1 + 3
    assert checkpoint["params"]["train"]["lr"] == best["params"]["train.lr"] != 0.001
    assert "## Tuning" in summary and f"Study `{best['study']}`" in summary

    # Run 1 failed at the gate after committing fetch..train: this run resumed after them (Prefect cache hits).
    summary_text = (project / "reports" / "run_summary.md").read_text()
    assert "fetch cached, prepare cached, tune cached, train cached, evaluate ran, export ran" in summary_text

    # 3. Nothing changed: every stage is a Prefect cache hit and the model is not rewritten.
    model_hash = sha256(project / "models" / "model.pt")
    again = tuneline(project, mnist_mirror, "run")
    assert again.returncode == 0, again.stdout + again.stderr
    assert ("fetch cached, prepare cached, tune cached, train cached, evaluate cached, export cached"
            in (project / "reports" / "run_summary.md").read_text())
    assert sha256(project / "models" / "model.pt") == model_hash
    assert "model.onnx is already registered as v0001 (champion): unchanged" in again.stdout

    # 4. A new export of the same weights (no INT8 this time) is no better: kept as challenger, and the run says why.
    same = tuneline(project, mnist_mirror, "run", "-S", "export.int8=false")
    assert same.returncode == 0, same.stdout + same.stderr
    accuracy = f"{metrics['accuracy']:.4f}"
    assert (f"v0002 kept as challenger, not promoted: test accuracy {accuracy} vs champion v0001 {accuracy} on the "
            "same 600 test images (change +0.0000 < gate.min_improvement 0.0010); champion v0001 stays") in same.stdout
    assert registry.alias("champion")["version"] == "v0001" and registry.alias("challenger")["version"] == "v0002"

    # 5. By hand: promote the challenger, then roll back; each change is recorded in registry.dvc.
    promoted = tuneline(project, mnist_mirror, "models", "promote", "v0002")
    assert promoted.returncode == 0 and "champion -> v0002 (previous: v0001)" in promoted.stdout, promoted.stderr
    rolled = tuneline(project, mnist_mirror, "models", "rollback")
    assert rolled.returncode == 0 and "champion rolled back -> v0001" in rolled.stdout, rolled.stderr
    assert registry.alias("champion")["version"] == "v0001"
    status = subprocess.run([str(BIN / "dvc"), "status"], cwd=project, env=cli_env(mnist_mirror),
                            capture_output=True, text=True, check=True)
    assert "up to date" in status.stdout, status.stdout


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


def test_a_run_killed_mid_training_resumes_after_its_last_stage_and_checkpoint(project: Path, mnist_mirror: Path):
    import os
    import signal
    import time

    args = [arg for kv in [*SLICE, "train.epochs=8", "gate.min_accuracy=0.8", "gate.min_class_recall=0.5",
                           "gate.max_ece=0.2", "export.int8=false"] for arg in ("-S", kv)]
    child = subprocess.Popen([str(BIN / "tuneline"), "run", "--no-push", *args], cwd=project, env=cli_env(mnist_mirror),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    resume = project / "models" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 300
    while not resume.exists():  # training has finished an epoch: kill the whole run (flow, server, all)
        assert child.poll() is None and time.monotonic() < deadline, "the run ended before its first epoch checkpoint"
        time.sleep(0.1)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert not (project / "models" / "model.pt").exists()

    again = tuneline(project, mnist_mirror, "run", "--no-push")  # params.yaml holds the first run's overrides
    assert again.returncode == 0, again.stdout + again.stderr
    summary = (project / "reports" / "run_summary.md").read_text()
    assert "fetch cached, prepare cached, tune cached, train ran, evaluate ran, export ran" in summary
    output = again.stdout + again.stderr
    assert "train: resuming from" in output and "resumed_from_epoch=0" not in output
    history = json.loads(json.dumps(torch.load(project / "models" / "model.pt", weights_only=True)["history"]))
    assert [h["epoch"] for h in history] == list(range(1, 9))
