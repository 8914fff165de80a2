"""The one place that turns `Params` + a project folder into stage calls.

Both callers go through here: the Prefect flow (one task per stage) and `tuneline stage NAME`, which is
what dvc.yaml runs. Paths come from params.yaml's `paths` section (`PathsConfig.resolve`), environment variables from
flows/environment.py: stage functions get both as arguments.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import json
import os
import subprocess
import tempfile
from pathlib import Path

from tuneline.core.config.base import params_hash
from tuneline.flows.environment import Environment
from tuneline.tasks.train.distributed import NPROC_ENV, DistributedTrainingFailed, context, nproc_from_env, torchrun_command
from tuneline.tasks.evaluate.evaluate import EvaluateResult, run_evaluate
from tuneline.tasks.ship.export import ExportResult, run_export
from tuneline.tasks.data.fetch import FetchResult, resolve_mirror, run_fetch
from tuneline.tasks.lineage import Lineage, git_commit
from tuneline.tasks.data.prepare import PrepareResult, run_prepare
from tuneline.tasks.data.stream import DataAccess
from tuneline.tasks.ship.promote import PromoteResult, run_promote
from tuneline.tasks.train.curves import render_curves_png
from tuneline.tasks.train.loop import TrainResult, read_history, run_train
from tuneline.tasks.tune.results import TuneResult, apply_best_params
from tuneline.tasks.tune.stage import run_tune
from tuneline.tasks.tune.storage import storage_url
from tuneline.tasks.versioning import data_version

# The stage table is defined once, in flows/dvc_yaml.py (dvc.yaml is generated from it).
from tuneline.flows.dvc_yaml import STAGE_NAMES as STAGES
from tuneline.flows.dvc_yaml import check_running_code

if TYPE_CHECKING:  # the root schema: not a code dep of this stage (core/config/params.py)
    from tuneline.core.config.params import Params


def fetch(params: Params, root: Path, project: Path | None = None) -> FetchResult:
    mirror = resolve_mirror(params.data, Environment.read().data_mirror)
    # A relative data.image_folder and a user loader's module are the project's: looked up from `root`. The server's
    # capture folder (untracked, under .tuneline/) and the registry stay with the checkout: looked up from `project`.
    shared = Path(project if project is not None else root)
    return run_fetch(params.data, params.paths.resolve(root).raw, mirror=mirror, project_dir=root,
                     capture_dir=shared / params.data.capture_dir, registry_dir=params.paths.resolve(root, project).registry)


def prepare(params: Params, root: Path, project: Path | None = None) -> PrepareResult:
    paths = params.paths.resolve(root)
    return run_prepare(params.data, paths.raw, paths.prepared)


def lineage(params: Params, root: Path) -> Lineage:
    return Lineage(data_version=data_version(root, params.paths.raw), params_hash=params_hash(params),
                   git_commit=git_commit(root))


def tune(params: Params, root: Path, project: Path | None = None, workers: int = 1) -> TuneResult:
    """The study lives with the project (`project`, default `root`): runs in workspaces continue it."""
    paths = params.paths.resolve(root, project)
    storage = storage_url(params.tune, paths.study_db.parent, Environment.read().tune_storage)
    if storage == f"sqlite:///{paths.study_db}":
        paths.study_db.parent.mkdir(parents=True, exist_ok=True)  # the project's, which a workspace run may precede
    return run_tune(params, paths.prepared, paths.tuning, data_version(root, params.paths.raw), workers=workers,
                    storage=storage)


def train(params: Params, root: Path, project: Path | None = None, nproc_per_node: int | None = None) -> TrainResult:
    """Train with params.yaml + the tune stage's best params (the model records the effective values).

    With nproc_per_node > 1 (or $TUNELINE_NPROC_PER_NODE: a number, or `auto` for every visible GPU), the
    stage runs under torchrun as that many DistributedDataParallel processes, one per GPU (CPU processes
    with gloo where there is none).
    """
    nproc = nproc_per_node if nproc_per_node is not None else nproc_from_env(Environment.read().nproc_per_node)
    if nproc < 1:
        raise ValueError(f"nproc_per_node must be at least 1, got {nproc}")
    if nproc > 1 and not context().enabled:
        return _train_with_torchrun(params, root, project, nproc)
    paths = params.paths.resolve(root, project)
    params = apply_best_params(params, paths.tuning / "best_params.json")
    # Only rank 0 writes the model that records the lineage: the other ranks skip DVC's hash of the data.
    origin = lineage(params, root) if context().is_main else Lineage("-", "-", "-")
    # Checkpoints belong to the project: a run in a workspace of its own resumes from them when rerun.
    result = run_train(params.model, params.train, paths.prepared, paths.model,
                       paths.history, origin, params=params.model_dump(mode="json"), checkpoint_dir=paths.checkpoints,
                       access=DataAccess.from_config(params.data))
    if context().is_main:  # one picture, from the history rank 0 wrote
        render_curves_png(result.history, paths.train_curves_png)
    return result


def _train_with_torchrun(params: Params, root: Path, project: Path | None, nproc: int) -> TrainResult:
    """Launch `torchrun -m tuneline.flows.cli stage train` on this node and read back what rank 0 wrote.

    The children get these exact params (overrides included) as a file rather than re-reading params.yaml.
    """
    with tempfile.TemporaryDirectory(prefix="tuneline-ddp-") as tmp:
        params_file = Path(tmp) / "params.json"
        params_file.write_text(json.dumps(params.model_dump(mode="json")))
        env = {**os.environ, NPROC_ENV: "1"}  # the children train; they must not launch torchrun again
        shared = ["--shared-project", str(project)] if project is not None else []
        cmd = torchrun_command(nproc, ["--project", str(root), "stage", "train", "--params-file", str(params_file),
                                       *shared])
        result = subprocess.run(cmd, cwd=root, env=env)
    if result.returncode != 0:
        raise DistributedTrainingFailed(f"train: torchrun with {nproc} processes exited with {result.returncode}; "
                                        "the last completed epoch is checkpointed: rerun to resume")
    paths = params.paths.resolve(root)
    history = read_history(paths.history)
    return TrainResult(model_path=paths.model, history_path=paths.history,
                       history=history, best_val_accuracy=max(h["val_accuracy"] for h in history),
                       device=f"DistributedDataParallel x{nproc}")


def evaluate(params: Params, root: Path, project: Path | None = None, enforce: bool = True) -> EvaluateResult:
    paths = params.paths.resolve(root)
    return run_evaluate(paths.model, paths.prepared, paths.metrics,
                        paths.confusion, params.gate, params.train, enforce=enforce,
                        confusion_png=paths.confusion_png, access=DataAccess.from_config(params.data))


def export(params: Params, root: Path, project: Path | None = None) -> ExportResult:
    paths = params.paths.resolve(root)
    return run_export(params.export, paths.model, paths.prepared,
                      paths.metrics, paths.onnx,
                      variants_dir=paths.variants, report_path=paths.export_metrics,
                      gate_cfg=params.gate, device=params.serve.device, threads=params.serve.threads,
                      provider=params.serve.provider, model_name=model_name(params),
                      access=DataAccess.from_config(params.data))


def model_name(params: Params) -> str:
    """The model's name in the registry and the server: project.name, else the data set's."""
    return params.project.resolve_name(params.data)


def promote(params: Params, root: Path, project: Path | None = None, run_id: str | None = None) -> PromoteResult:
    """Register the exported model in the project's registry and promote it if it beats the champion (not a
    DVC stage: see README)."""
    paths = params.paths.resolve(root, project)
    return run_promote(params.gate, paths.registry, paths.onnx,
                       paths.prepared, paths.metrics,
                       paths.export_metrics,
                       variants_dir=paths.variants, name=model_name(params), run_id=run_id,
                       device=params.serve.device, access=DataAccess.from_config(params.data))


def run_stage(name: str, params: Params, root: Path, project: Path | None = None):
    """Run one stage by name (what `tuneline stage NAME` and dvc.yaml call); outputs under `root`, the
    project-scoped paths (registry, study, checkpoints) under `project` (default `root`)."""
    runners = {"fetch": fetch, "prepare": prepare, "tune": tune, "train": train, "evaluate": evaluate, "export": export}
    if name not in runners:
        raise ValueError(f"unknown stage {name!r}: choose one of {', '.join(STAGES)}")
    check_running_code(root, name)  # the code DVC hashes for this stage is the code about to run
    return runners[name](params, root, project)
