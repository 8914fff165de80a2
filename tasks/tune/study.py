"""The Optuna study: its identity (what makes two runs the same study), creation, sampler and pruner."""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from typing import Any, TYPE_CHECKING

from tuneline.core.config.tune import TuneConfig
from tuneline.tasks.tune.storage import open_storage

if TYPE_CHECKING:  # the root schema: not a code dep of this stage (core/config/params.py)
    from tuneline.core.config.params import Params

# What a trial maximises: its best validation accuracy over its epochs (tasks/tune/objective.py). Part of the
# identity, so a study is never continued under a different objective.
OBJECTIVE = {"metric": "val_accuracy", "reduce": "max over epochs", "direction": "maximize"}

# tune.objectives: accuracy first (maximised), then serving costs of the trial's exported model (minimised). A study
# with more than one is multi-objective: a Pareto front instead of one best (tasks/tune/pareto.py).
DIRECTIONS = {"accuracy": "maximize", "latency_p99_ms": "minimize", "size_mb": "minimize"}

# tune.* keys that describe the objectives: in the identity's "objective" part (only when there are several, so a
# single-objective study keeps the name it always had), not in its "tune" part. pick only chooses among finished
# trials, so it is in neither.
OBJECTIVE_KEYS = frozenset({"objectives", "latency_runs", "latency_threads", "pick"})

# data.* keys that change the train/val splits a trial trains and validates on. The raw data itself is the
# data version; limit_test only shapes the test split, which no trial reads; mirror/image_folder say where
# the raw data came from, which the data version already covers.
TRIAL_DATA_KEYS = ("source", "val_fraction", "seed", "limit_train")

# train.* keys that change how a trial runs, not what it learns: where (device), how fast (compile,
# channels_last, precision — "auto" already differs by device), bit-for-bit repeatability (deterministic),
# how evaluation is batched, and resume (trials never resume). train.epochs is replaced by tune.epochs.
# A key not listed here counts, so a new train.* setting starts a new study until someone says otherwise.
TRAIN_EXECUTION_KEYS = frozenset({"device", "precision", "channels_last", "compile", "deterministic",
                                  "eval_batch_size", "resume", "epochs", "checkpoint_every_steps"})
# train.* keys added after studies existed, and their defaults: left out at their default, so an existing study keeps
# its name.
LATER_TRAIN_KEYS = {"images_per_epoch": None, "augment_time_shift": 0.0, "augment_noise": 0.0, "augment_spec_mask": 0.0,
                    "ema": 0.0}  # ema's default is 0.98; tuneline upgrade writes 0 into an earlier project's params

# tune.* keys that change the budget, the storage or how trials are scheduled, not what a trial sees:
# a larger n_trials (or patience, or max_failures) continues the study; packed and unpacked trials give the
# same results.
TUNE_BUDGET_KEYS = frozenset({"enabled", "n_trials", "timeout_s", "storage", "study_name", "packing", "max_failures",
                              "patience"})


def study_identity(params: Params, data_version: str) -> dict[str, Any]:
    """Everything that changes what a trial sees: data, prepare settings, fixed model/train params, trial settings, objective."""
    space = params.tune.space
    fixed = {section: {key: value for key, value in getattr(params, section).model_dump(mode="json").items()
                       if f"{section}.{key}" not in space}
             for section in ("model", "train")}
    fixed["train"] = {k: v for k, v in fixed["train"].items()
                      if k not in TRAIN_EXECUTION_KEYS and not (k in LATER_TRAIN_KEYS and v == LATER_TRAIN_KEYS[k])}
    return {
        "data_version": data_version,
        "prepare": {key: getattr(params.data, key) for key in TRIAL_DATA_KEYS},
        "fixed": fixed,
        "tune": params.tune.model_dump(mode="json", exclude=set(TUNE_BUDGET_KEYS | OBJECTIVE_KEYS)),
        "objective": objective_identity(params),
    }


def is_multi_objective(cfg: TuneConfig) -> bool:
    return len(cfg.objectives) > 1


def latency_threads(params: Params) -> int:
    """Intra-op threads the latency objective measures with: tune.latency_threads, else serve.threads."""
    return params.tune.latency_threads if params.tune.latency_threads is not None else params.serve.threads


def objective_identity(params: Params) -> dict[str, Any]:
    """What the trials' values mean: OBJECTIVE alone for the default; each objective (and how latency is measured:
    device, threads, runs) when there are several."""
    cfg = params.tune
    if not is_multi_objective(cfg):
        return OBJECTIVE
    described = []
    for name in cfg.objectives:
        entry: dict[str, Any] = {"name": name, "direction": DIRECTIONS[name]}
        if name == "accuracy":
            entry.update(metric=OBJECTIVE["metric"], reduce=OBJECTIVE["reduce"])
        elif name == "latency_p99_ms":
            entry.update(device=params.serve.device, provider=params.serve.provider, threads=latency_threads(params),
                         runs=cfg.latency_runs, batch=1)
        else:
            entry.update(file="FP32 ONNX", unit="10^6 bytes")
        described.append(entry)
    return {"objectives": described}


def study_name(params: Params, data_version: str) -> str:
    """Same identity -> same study (continued); any change -> a new one, e.g. `tuneline-mnist-3000-seed_cnn-1a2b3c4d5e6f`.

    The readable part (source, training images, architecture) lets a person tell studies apart; the hash of
    the whole identity keeps two studies that differ elsewhere apart. tune.study_name, when set, wins.
    """
    if params.tune.study_name:
        return params.tune.study_name
    identity = study_identity(params, data_version)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    images = params.data.limit_train or "full"
    arch = "any" if "model.arch" in params.tune.space else params.model.arch
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"tuneline-{params.data.source}-{images}-{arch}-{digest}")


def min_resource(cfg: TuneConfig) -> int:
    """tune.min_resource, with "auto" derived from the epoch budget: tune.epochs // reduction_factor**2, at least 1.

    Three rungs (min, min*rf, min*rf**2 <= epochs) when the budget allows, two otherwise (epochs < rf**2: rung 1,
    then the trials kept run to the end). A trial judged after too few epochs is judged on noise; more rungs
    than three save little (each keeps 1/rf of the trials) and judge earlier still.
    """
    if cfg.min_resource != "auto":
        return cfg.min_resource
    return max(1, cfg.epochs // cfg.reduction_factor ** 2)


def rung_epochs(cfg: TuneConfig) -> list[int]:
    """The epochs at which successive halving compares trials (the last rung may be tune.epochs itself)."""
    rungs, epoch = [], min_resource(cfg)
    while epoch < cfg.epochs:
        rungs.append(epoch)
        epoch *= cfg.reduction_factor
    return rungs


def _pruner(cfg: TuneConfig):
    import optuna

    if cfg.pruner == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_resource(cfg), reduction_factor=cfg.reduction_factor)
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min_resource(cfg), max_resource=cfg.epochs,
                                              reduction_factor=cfg.reduction_factor)
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_warmup_steps=min_resource(cfg))
    return optuna.pruners.NopPruner()


def create_study(cfg: TuneConfig, name: str, url: str):
    """Create (or load) the study; done once before workers start, which avoids a race on a new SQLite file."""
    import optuna

    # Optuna cannot prune a multi-objective study (Trial.report raises there): its trials run to the end.
    pruner = optuna.pruners.NopPruner() if is_multi_objective(cfg) else _pruner(cfg)
    study = optuna.create_study(study_name=name, storage=open_storage(url),
                                directions=[DIRECTIONS[name] for name in cfg.objectives],
                                load_if_exists=True, sampler=optuna.samplers.TPESampler(seed=cfg.sampler_seed),
                                pruner=pruner)
    # Named on every open, a continued study included (one made before names were set gets them too), so
    # optuna-dashboard's axes read val_accuracy / latency_p99_ms rather than "Objective 0".
    with warnings.catch_warnings():  # experimental since Optuna 3.2: a warning on every run would be noise
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(metric_names(cfg))
    return study


def metric_names(cfg: TuneConfig) -> list[str]:
    """The study's objective names, in order: val_accuracy, then the serving costs tune.objectives adds."""
    return [OBJECTIVE["metric"] if objective == "accuracy" else objective for objective in cfg.objectives]


def load_study(name: str, url: str):
    """The existing study, to read its trials."""
    import optuna

    return optuna.load_study(study_name=name, storage=open_storage(url))
