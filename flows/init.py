"""`tuneline init DIR`: a project of the user's own, outside this repository, ready to `tuneline run`.

It writes params.yaml (an example's settings, with gates that suit it: MNIST's 0.99 accuracy gate would
fail every CIFAR-10 run). The examples are mnist (the default), cifar10, speech (spoken digits, FSDD) and sst2
(sentence sentiment); `--data PATH` fills the example's path key. With `--data` and no `--example`, the data
decides: flows/recognise.py looks at what PATH holds (MNIST's .gz files, class folders of images, audio clips,
TSV/CSV/JSONL text) and the example follows it (mnist, image defaults, speech, sst2-like text settings).

It also writes dvc.yaml (generated for this project: Tuneline's installed code is outside it, so the `code`
stage fingerprints it), prefect.yaml (with an entry point that exists in the folder), a .gitignore and a
.dvcignore; then `git init`, `dvc init`, a local DVC remote and the first commit.

Nothing is left half-made: if any step fails, every file and folder init created is removed again.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from tuneline.core.config.base import ConfigError
from tuneline.tasks.data.remote import is_url

log = logging.getLogger(__name__)

# The defaults are MNIST's fast recipe (lean_cnn, bf16 where the CPU computes it, a weight average, light
# rotation/shift/zoom): the other examples set precision and train.ema as their accuracies were measured (speech and
# text do not use image knobs left at their defaults; cifar10 sets its own).
# Each example: the params it changes from the defaults. Paths to data are filled in from --data.
EXAMPLES: dict[str, dict[str, Any]] = {
    "mnist": {
        "project": {"name": "mnist"},
        "data": {"source": "mnist"},
    },
    # CIFAR-10 on a CPU: the fast network (width 16), AdamW with one-cycle, flips, 2-pixel shifts, label smoothing,
    # bf16 where the CPU computes it (1.5x fp32's images/s for this net here), the default weight average, and each
    # image scored with its mirror image outside training (flip_average: in the ONNX graph too); a short tuning study
    # on a slice leaves the time to the final training: 17 epochs, 0.853 test accuracy in 10 min 9 s from init on
    # 2 cores (15 epochs without flip_average and the weight average: 0.835). AdamW 3e-3 with unscaled logits learnt
    # fastest here (airbench's SGD recipe is tuned for GPU batch sizes and epochs; docs/benchmarks.md, CIFAR-10). The
    # gates are CIFAR's: MNIST's 0.99 accuracy would fail every run; label smoothing lowers confidence, so ECE is
    # looser.
    "cifar10": {
        "project": {"name": "cifar10"},
        "data": {"source": "imagefolder", "val_fraction": 0.1},
        "model": {"arch": "fast_cnn", "dropout": 0.0, "kwargs": {"width": 16, "logit_scale": 1.0, "flip_average": True}},
        "train": {"epochs": 17, "batch_size": 256, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 5e-4,
                  "scheduler": "onecycle", "label_smoothing": 0.1, "augment_flip": True, "augment_translate": 0.0625,
                  "augment_rotate_deg": 0.0, "augment_scale": 0.0, "eval_batch_size": 1000, "precision": "native"},
        # Two epochs per trial (40 steps of batch 256): with fewer steps batch norm's running statistics are still at
        # their initial values when the trial validates, and every trial scores chance.
        "tune": {"enabled": True, "n_trials": 3, "epochs": 2, "limit_train": 5000, "limit_val": 2000,
                 "pruner": "none", "space": {"train.lr": {"type": "float", "low": 1e-3, "high": 6e-3, "log": True},
                                             "train.batch_size": {"type": "categorical", "choices": [256]}}},
        "gate": {"min_accuracy": 0.75, "min_class_recall": 0.5, "max_ece": 0.15, "max_regression": 0.01},
    },
    # Spoken digits (FSDD: 8 kHz clips named {digit}_{speaker}_{index}.wav, index 0-4 the test split) with the
    # log-mel CNN at width 48: 30 epochs reached 0.993 on the 300 test clips, width 32 for 20 epochs 0.967, width 24
    # for 30 epochs 0.947 (docs/benchmarks.md, speech). Clips are fitted to the training clips' 95th percentile (0.7 s).
    "speech": {
        "project": {"name": "speech"},
        "data": {"source": "audio", "sample_rate": 8000, "label_pattern": "{label}_{speaker}_{index}",
                 "test_rule": "index < 5", "val_fraction": 0.1},
        "model": {"arch": "audio_cnn", "dropout": 0.1, "kwargs": {"width": 48}},
        "train": {"epochs": 30, "batch_size": 64, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 1e-3,
                  "scheduler": "onecycle", "augment_time_shift": 0.1, "augment_noise": 0.005, "eval_batch_size": 500,
                  "precision": "auto", "ema": 0.0},
        "tune": {"enabled": False},
        "gate": {"min_accuracy": 0.9, "min_class_recall": 0.8, "max_ece": 0.15, "max_regression": 0.01},
    },
    # Sentence sentiment (SST-2: TSVs whose text column is `sentence` in train, `content` in dev, the test split)
    # with Kim's text CNN, three of them, each trained on its own loss and averaged (members: one CNN's dev accuracy
    # swings about two points with its seed; the three gave 0.830, 0.833, 0.825 for seeds 0-2). Three epochs: the
    # phrase-level validation split keeps improving after that, but dev (whole sentences) does not (one CNN,
    # seed 1: 0.786, 0.799, 0.819, 0.809, 0.804 after epochs 1-5; docs/benchmarks.md).
    "sst2": {
        "project": {"name": "sst2"},
        "data": {"source": "text", "text_column": ["sentence", "content"], "label_column": "label",
                 "class_names": {"0": "negative", "1": "positive"}, "val_fraction": 0.05},
        "model": {"arch": "text_cnn", "dropout": 0.5, "kwargs": {"members": 3}},
        "train": {"epochs": 3, "batch_size": 64, "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0,
                  "scheduler": "none", "eval_batch_size": 1000, "precision": "auto", "ema": 0.0},
        "tune": {"enabled": False},
        # max_size_mb: three embeddings of the training vocabulary (13,808 x 128 floats each on SST-2) are 23 MB.
        "gate": {"min_accuracy": 0.75, "min_class_recall": 0.6, "max_ece": 0.2, "max_regression": 0.02,
                 "max_size_mb": 40.0},
    },
}

# The data key --data fills, by data.source.
PATH_KEYS = {"mnist": "mirror", "imagefolder": "image_folder", "audio": "audio_folder", "text": "text_files"}

GITIGNORE = """\
# Tuneline project: data and models are DVC's (dvc.lock, registry.dvc); git keeps code, params and metrics.
__pycache__/
.prefect/
/.tuneline/
/.tuneline-run.lock
/data/raw
/data/prepared
/models
/registry
/tuning/study.db*
/tuning/*.html
dvc_plots/
*.tmp
"""

DVCIGNORE = """\
# Keep DVC's directory walks out of run workspaces (.tuneline/code holds stage deps: not ignored).
/.tuneline/runs/
/.prefect/
"""

FLOW_FILE = "tuneline_flow.py"
FLOW_TEXT = '''\
"""This project's Prefect entry point: Tuneline's pipeline flow (installed package), run in this folder.

Tuneline installs one import name, `tuneline`, so this project's own folders (tasks/, serving/, ...) are
simply yours.
"""

from pathlib import Path

from tuneline.flows.drift_watch import drift_watch, promote_live  # noqa: F401  (the live loop's deployments)
from tuneline.flows.pipeline import pipeline  # noqa: F401  (prefect.yaml's entry point names it here)

if __name__ == "__main__":
    pipeline(project_dir=str(Path(__file__).parent))
'''

PREFECT_TEXT = """\
# Prefect deployments of this project's Tuneline pipeline. Register with `prefect deploy --all`
# (after `prefect work-pool create tuneline-process --type process`); a worker started in this folder
# (or with TUNELINE_PROJECT_DIR set to it) runs them.
name: {name}
prefect-version: 3.1.0

pull:
  - prefect.deployments.steps.set_working_directory:
      directory: "{{{{ $TUNELINE_PROJECT_DIR }}}}"

definitions:
  work_pool: &tuneline_pool
    name: tuneline-process
    job_variables:
      env:
        PREFECT_SERVER_ANALYTICS_ENABLED: "false"
        DO_NOT_TRACK: "1"
        DVC_NO_ANALYTICS: "1"
        PREFECT_LOGGING_EXTRA_LOGGERS: tuneline
        TUNELINE_PROJECT_DIR: "{project}"

deployments:
  - name: nightly
    description: Full pipeline every night on this project's params.yaml.
    entrypoint: {flow_file}:pipeline
    parameters:
      project_dir: "."
    work_pool: *tuneline_pool
    schedules:
      - cron: "0 2 * * *"
        timezone: UTC
        active: false
  - name: adhoc
    description: >-
      Run on demand, e.g. prefect deployment run '{name}/adhoc' --params '{{"overrides": {{"train.epochs": 4}}}}'
    entrypoint: {flow_file}:pipeline
    parameters:
      project_dir: "."
    work_pool: *tuneline_pool
  # The live loop (Tuneline's docs/operations.md): off until a server with drift and capture serves this project.
  - name: drift-watch
    description: >-
      Every 10 minutes: read the inference server's drift score (GET /v2/live/<model>) and, when it is over its
      threshold, start tuneline/adhoc on the captured traffic (data.source=capture), at most once per watch.cooldown_s.
    entrypoint: {flow_file}:drift_watch
    parameters:
      project_dir: "."
    work_pool: *tuneline_pool
    schedules:
      - interval: 600
        active: false
  - name: promote-live
    description: >-
      On demand: promote the challenger to champion only if the server's live window of it meets gate.live_* and its
      offline gates held (`tuneline models promote --live` as a flow run).
    entrypoint: {flow_file}:promote_live
    parameters:
      project_dir: "."
    work_pool: *tuneline_pool
"""


def _params(example: str | None, data: str | None, target: Path) -> tuple[str, dict[str, Any]]:
    """(what the project starts from, for messages; its params): `example`'s, else what `data` holds."""
    import copy

    if example is None and data is None:
        example = "mnist"
    if data is not None and is_url(data):  # read where it lies by fetch (tasks/data/remote.py): nothing to check here
        shown = where = data
    elif data is not None:
        path = Path(data).expanduser().resolve()
        if not path.exists():
            raise ConfigError(f"--data {data}: not found: give the data set's folder or archive (or its URL)")
        where = str(path)
        shown = path.relative_to(target).as_posix() if path.is_relative_to(target) else where
    if example is not None:
        values = copy.deepcopy(EXAMPLES[example])
        if data is not None:
            values["data"][PATH_KEYS[values["data"]["source"]]] = shown
        elif values["data"]["source"] != "mnist":
            raise ConfigError(f"tuneline init --example {example}: needs --data PATH (the data set's folder, or a "
                              ".tar, .tar.gz or .zip of it)")
        return example, values
    from tuneline.flows.recognise import recognise_data

    found = recognise_data(where)
    found[PATH_KEYS[found["source"]]] = shown
    return _following(found)


def _following(found: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The params a recognised `data:` section starts from: its source's example, with the data as found."""
    import copy

    source = found["source"]
    if source == "imagefolder":  # any images: the defaults (cifar10's settings and gates suit CIFAR, not any set)
        return "defaults, imagefolder data", {"data": found}
    example = {"mnist": "mnist", "audio": "speech", "text": "sst2"}[source]
    values = copy.deepcopy(EXAMPLES[example])
    data = values["data"]
    if source == "audio":
        # the clips' own rate and labels, not FSDD's; FSDD's split rule only for FSDD-shaped names
        if found.get("label_pattern") != data["label_pattern"]:
            data.pop("test_rule")
        data.pop("label_pattern")
        data.pop("sample_rate")
    elif source == "text":  # sst2's settings, not its names: the model is named after the data, classes by label
        values.pop("project")
        for key in ("text_column", "label_column", "class_names"):
            data.pop(key)
        example = "sst2's settings, text data"
    data.update(found)
    return example, values


def _model_name(values: dict[str, Any]) -> str:
    """project.name, else the data set's (an image folder's stem, `text`): what the registry calls the model."""
    from tuneline.core.config.params import Params

    params = Params.model_validate(values)
    return params.project.resolve_name(params.data)


def _git(cwd: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": os.environ.get("GIT_AUTHOR_NAME", "tuneline init"),
           "GIT_AUTHOR_EMAIL": os.environ.get("GIT_AUTHOR_EMAIL", "tuneline@localhost"),
           "GIT_COMMITTER_NAME": os.environ.get("GIT_COMMITTER_NAME", "tuneline init"),
           "GIT_COMMITTER_EMAIL": os.environ.get("GIT_COMMITTER_EMAIL", "tuneline@localhost")}
    _check(subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True), "git", args)


def _dvc(cwd: Path, *args: str) -> None:
    dvc = Path(sys.executable).parent / "dvc"
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    _check(subprocess.run([str(dvc) if dvc.exists() else "dvc", *args], cwd=cwd, env=env, capture_output=True,
                          text=True), "dvc", args)


def _check(result: subprocess.CompletedProcess, tool: str, args: tuple[str, ...]) -> None:
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise RuntimeError(f"tuneline init: `{tool} {' '.join(args)}` failed: {detail[-1] if detail else result.returncode}")


def init_project(target: Path, example: str | None = None, data: str | None = None,
                 remote: Path | None = None) -> Path:
    """Create the project at `target` (new, or a folder of the user's code); returns its path.

    `example` None: mnist without `data`, else the example that what `data` holds follows (flows/recognise.py).

    Refuses a folder that already holds a project (any other folders and modules of yours are fine). On any
    failure, everything init created is removed again (the user's own files are never touched).
    """
    from tuneline.flows import dvc_yaml
    from tuneline.flows.config_docs import render_params

    if example is not None and example not in EXAMPLES:
        raise ConfigError(f"--example {example}: unknown; choose one of {', '.join(EXAMPLES)}")
    target = Path(target).expanduser().resolve()
    ours = ["params.yaml", "dvc.yaml", "prefect.yaml", FLOW_FILE, ".gitignore", ".dvcignore", ".git", ".dvc"]
    if target.exists():
        if present := [name for name in ours if (target / name).exists()]:
            raise ConfigError(f"{target}: already has {', '.join(present)}: init writes a new project; pick a new "
                              "folder, or one with only your own code and data in it")
    example, values = _params(example, data, target)
    remote = Path(remote).expanduser().resolve() if remote else target.parent / f"{target.name}-dvc-remote"
    created_target = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    try:
        (target / "params.yaml").write_text(render_params(values))
        (target / FLOW_FILE).write_text(FLOW_TEXT)
        (target / "prefect.yaml").write_text(PREFECT_TEXT.format(name=_model_name(values), project=target,
                                                                 flow_file=FLOW_FILE))
        (target / ".gitignore").write_text(GITIGNORE)
        _git(target, "init", "-q")
        _dvc(target, "init", "-q")
        (target / ".dvcignore").write_text(DVCIGNORE)
        _dvc(target, "config", "core.analytics", "false")
        _dvc(target, "config", "core.autostage", "false")
        remote.mkdir(parents=True, exist_ok=True)
        _dvc(target, "remote", "add", "-d", "local", str(remote))
        dvc_yaml.write(target)  # generated for this folder: Tuneline's code is outside it (fingerprinted)
        _git(target, "add", "-A")
        _git(target, "commit", "-q", "-m", f"tuneline init (example {example})")
    except BaseException:
        if created_target:
            shutil.rmtree(target, ignore_errors=True)
        else:
            for name in ours:
                path = target / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        raise
    log.info("init: %s (example %s, DVC remote %s)", target, example, remote)
    return target
