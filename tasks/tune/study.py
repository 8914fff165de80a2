"""The Optuna study: its name (what makes two runs the same study), creation, sampler and pruner."""

from __future__ import annotations

import hashlib
import json

from tasks.config import TuneConfig
from tasks.tune.storage import open_storage


def study_name(cfg: TuneConfig, data_version: str) -> str:
    """Same data, space and trial settings -> same study (continued, not restarted)."""
    if cfg.study_name:
        return cfg.study_name
    # How trials are executed (packing) is not part of the study's identity: packed and unpacked runs continue it.
    settings = cfg.model_dump(mode="json", exclude={"n_trials", "timeout_s", "storage", "enabled", "packing"})
    payload = {"data": data_version, "tune": settings}
    return "tuneline-" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def _pruner(cfg: TuneConfig):
    import optuna

    if cfg.pruner == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=cfg.min_resource, reduction_factor=cfg.reduction_factor)
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=cfg.min_resource, max_resource=cfg.epochs,
                                              reduction_factor=cfg.reduction_factor)
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_warmup_steps=cfg.min_resource)
    return optuna.pruners.NopPruner()


def create_study(cfg: TuneConfig, name: str, url: str):
    """Create (or load) the study; done once before workers start, which avoids a race on a new SQLite file."""
    import optuna

    return optuna.create_study(study_name=name, storage=open_storage(url), direction="maximize", load_if_exists=True,
                               sampler=optuna.samplers.TPESampler(seed=cfg.sampler_seed), pruner=_pruner(cfg))


def load_study(name: str, url: str):
    """The existing study, to read its trials."""
    import optuna

    return optuna.load_study(study_name=name, storage=open_storage(url))
