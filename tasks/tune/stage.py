"""Stage `tune`: an Optuna study over the search space in params.yaml -> best params + every trial.

The seed article's loop — train, evaluate, adjust, repeat — made automatic: TPE proposes a config,
the training engine reports validation accuracy after every epoch, and a pruner (successive halving by
default) stops trials that are behind, so most of the budget goes to promising configs. A trial that
raises, diverges, runs out of GPU memory or loses its worker is recorded as failed with its reason and does
not count toward n_trials; the study goes on until `tune.max_failures` failures, or stops early when its
best has not improved for `tune.patience` trials (tasks/tune/budget.py, stopping.py).

With `tune.objectives` naming serving costs too (latency_p99_ms, size_mb) the study is multi-objective: each trial's
model is exported and measured after its training, trials are neither pruned nor packed, and tune.pick chooses the
Pareto trial train uses (tasks/tune/pareto.py).

The study lives in an RDB (SQLite by default, PostgreSQL for many machines) under a name derived from
everything that changes what a trial sees (tasks/tune/study.py: data version, prepare settings, fixed
params outside the space, trial settings, objective): rerunning continues the same study, and with its
`n_trials` already spent it runs no new trial; a changed setting starts a new one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from tuneline.core.atomic import staged_dir
from tuneline.tasks.data.prepare import SPLITS, load_manifest, open_split, stratified_take
from tuneline.tasks.data.shards import FORMAT, gather_rows, shard_plan, split_entry, write_shard
from tuneline.tasks.tune.budget import next_step
from tuneline.tasks.tune.results import TuneResult, write_disabled, write_results, write_trials_table
from tuneline.tasks.tune.space import validate_space
from tuneline.tasks.tune.storage import storage_url
from tuneline.tasks.tune.study import create_study, is_multi_objective, load_study, study_identity, study_name
from tuneline.tasks.tune.workers import run_workers

if TYPE_CHECKING:  # the root schema: not a code dep of this stage (core/config/params.py)
    from tuneline.core.config.params import Params

log = logging.getLogger(__name__)


def run_tune(params: Params, prepared_dir: Path, tuning_dir: Path, data_version: str, workers: int = 1,
             storage: str | None = None) -> TuneResult:
    """Run (or continue) the study with `workers` processes; write best params, trials CSV and plots.

    `storage` is an RDB URL that wins over tune.storage (the CLI passes $TUNELINE_TUNE_STORAGE).
    """
    cfg = params.tune
    tuning_dir = Path(tuning_dir)
    tuning_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.enabled:
        result = write_disabled(tuning_dir)
        log.info("tune: disabled (tune.enabled=false): training uses params.yaml as given")
        return result
    validate_space(params, cfg.space)
    params = _multi_objective_settings(params)
    cfg = params.tune
    name, url = study_name(params, data_version), storage_url(cfg, tuning_dir, storage)
    # The identity travels with the study, so `optuna-dashboard` (or load_study) shows what it was run on.
    study = create_study(cfg, name, url)
    study.set_user_attr("identity", study_identity(params, data_version))
    if is_multi_objective(cfg):
        _name_metrics(study, cfg.objectives)
    first_number = len(study.get_trials(deepcopy=False))  # failures from here on count toward tune.max_failures
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tune-") as tmp:
        prepared = subset_prepared(Path(prepared_dir), Path(tmp) / "data", cfg.limit_train, cfg.limit_val, params.data.seed)
        try:
            run_workers(params, prepared, name, url, Path(tmp), workers, first_number)
        finally:
            from tuneline.tasks.tune.trial_run import forget_worker_data  # torch: imported when trials ran

            forget_worker_data()  # trials in this process kept the splits on the device
    study = load_study(name, url)
    step = next_step(study, cfg, first_number)
    if step.kind == "failures":
        write_trials_table(study, tuning_dir, cfg.objectives)  # each failure's reason, before the error points at it
        raise TuneFailedError(f"tune: study {name} stopped: {step.reason}. See {tuning_dir / 'trials.csv'} for every "
                              "trial's reason; fix the cause (or raise tune.max_failures) and rerun to continue")
    stopped = step.reason if step.kind == "patience" else None
    if stopped:
        log.info("tune: study %s stopped early: %s", name, stopped)
    return write_results(study, cfg, tuning_dir, time.perf_counter() - started, stopped=stopped, gate=params.gate)


def _multi_objective_settings(params: Params) -> Params:
    """A multi-objective study runs unpruned and unpacked; say so once. Single-objective params pass unchanged.

    Pruning: Optuna cannot prune a multi-objective study, and a rung rule on accuracy alone would cut the small,
    fast models whose early accuracy lags — the cheap end of the very front the study is for. Packing: a pack's
    members report to a pruner together (tasks/tune/packed_rounds.py); with nothing to prune and a serving cost to
    measure after each trial, one trial at a time is the simple, correct path.
    """
    cfg = params.tune
    if not is_multi_objective(cfg):
        return params
    log.info("tune: objectives %s: a multi-objective study; pruning off (tune.pruner=%s not applied: Optuna cannot "
             "prune multi-objective studies, and pruning on accuracy would cut the cheap models of the front)",
             cfg.objectives, cfg.pruner)
    if cfg.packing not in (None, 1):
        log.info("tune: tune.packing=%s not applied: a multi-objective study trains one trial at a time", cfg.packing)
        params = params.model_copy(update={"tune": cfg.model_copy(update={"packing": None})})
    return params


def _name_metrics(study, objectives: list[str]) -> None:
    """The objectives' names on the study, so optuna-dashboard labels its Pareto plot."""
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(objectives))


class TuneFailedError(RuntimeError):
    """The study stopped after tune.max_failures failed trials in one tune call."""


def subset_prepared(prepared_dir: Path, dest: Path, limit_train: int | None, limit_val: int | None, seed: int) -> Path:
    """A stratified slice of the prepared splits for cheap trials (same manifest, fewer records, in shards of the
    same size), gathered shard by shard: the prepared data is never whole in memory. No limits: `prepared_dir`."""
    if limit_train is None and limit_val is None:
        return Path(prepared_dir)
    manifest = load_manifest(prepared_dir)
    limits = {"train": limit_train, "val": limit_val, "test": 0}  # trials never read the test split
    splits = {}
    with staged_dir(Path(dest)) as staging:
        for split in SPLITS:
            source = open_split(prepared_dir, split)
            labels, limit = source.labels(), limits[split]
            rows = np.arange(labels.size)
            if limit is not None and limit < labels.size:
                rows = stratified_take(labels, limit, seed)[0] if limit else rows[:0]
            shards = []
            for index, (start, stop) in enumerate(shard_plan(rows.size, source.record_bytes,
                                                             manifest.get("shard_mb", 64.0))):
                x, y = gather_rows(source, rows[start:stop])
                shards.append(write_shard(staging, split, index, x, y, source.layout))
            splits[split] = split_entry(shards)
            source.close()
        counts = {split: entry["count"] for split, entry in splits.items()}
        (staging / "manifest.json").write_text(json.dumps({
            **manifest, "format": FORMAT, "record": source.layout.to_dict(), "splits": splits, "counts": counts,
            "slice": {"train": limit_train, "val": limit_val}}))
    return Path(dest)
