"""Stage `tune`: an Optuna study over the search space in params.yaml -> best params + every trial.

The seed article's loop — train, evaluate, adjust, repeat — made automatic: TPE proposes a config,
the training engine reports validation accuracy after every epoch, and a pruner (successive halving by
default) stops trials that are behind, so most of the budget goes to promising configs. A trial that
diverges or runs out of GPU memory is recorded as failed with its reason, and the study goes on.

The study lives in an RDB (SQLite by default, PostgreSQL for many machines) under a name derived from
the data version, search space and trial settings: rerunning continues the same study, and with its
`n_trials` already spent it runs no new trial.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import socket
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.atomic import staged_file, write_bytes_atomic
from tasks.config import ConfigError, Params, SpaceDim, TuneConfig, build_params
from tasks.lineage import Lineage
from tasks.data.prepare import SPLITS, load_manifest, stratified_take

log = logging.getLogger(__name__)

TUNABLE_SECTIONS = ("model", "train")
BEST_FORMAT = "tuneline.best_params/1"


@dataclass(frozen=True)
class TuneResult:
    study_name: str
    best_params: dict[str, Any]
    best_value: float | None
    states: dict[str, int]
    best_params_path: Path
    trials_csv: Path
    top_trials: list[dict]


def validate_space(base: Params, space: dict[str, SpaceDim]) -> None:
    """Every dimension names a tunable key and every value it can take is valid there — before any trial."""
    for key, dim in space.items():
        if key.split(".")[0] not in TUNABLE_SECTIONS:
            raise ConfigError(f"tune.space: {key!r} is not tunable: search over model.* or train.* keys")
        probes = dim.choices if dim.type == "categorical" else [dim.low, dim.high]
        for value in probes:
            try:
                build_params(base.model_dump(mode="json"), {key: value}, source="tune.space")
            except ConfigError as exc:
                raise ConfigError(f"tune.space.{key}: value {value!r} is not valid: {exc}") from None


def study_name(cfg: TuneConfig, data_version: str) -> str:
    """Same data, space and trial settings -> same study (continued, not restarted)."""
    if cfg.study_name:
        return cfg.study_name
    # How trials are executed (packing) is not part of the study's identity: packed and unpacked runs continue it.
    settings = cfg.model_dump(mode="json", exclude={"n_trials", "timeout_s", "storage", "enabled", "packing"})
    payload = {"data": data_version, "tune": settings}
    return "tuneline-" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


STORAGE_ENV = "TUNELINE_TUNE_STORAGE"  # wins over tune.storage: keeps a database password out of params.yaml


def storage_url(cfg: TuneConfig, tuning_dir: Path) -> str:
    """The study's RDB URL: $TUNELINE_TUNE_STORAGE, else tune.storage, else SQLite under paths.tuning.

    PostgreSQL (postgresql://user:pass@host/db) lets workers on many machines share one study.
    """
    return os.environ.get(STORAGE_ENV) or cfg.storage or f"sqlite:///{Path(tuning_dir).resolve() / 'study.db'}"


def redact(url: str) -> str:
    """The URL with its password masked, for logs and error messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not parseable: say nothing about it rather than leak it
        return "<unparseable storage URL>"


def _storage(url: str):
    import optuna
    import sqlalchemy.exc

    # A heartbeat lets a rerun mark trials of a killed worker as failed (and retry them once) instead
    # of leaving them RUNNING forever; SQLite's busy timeout covers several local workers writing at once,
    # pre-ping drops server connections that died while a trial trained (PostgreSQL restarts, idle cuts).
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat: stable in practice since 2.x
            storage = optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=10, grace_period=30,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
        if url.startswith("sqlite"):
            _sqlite_write_ahead_log(storage.engine)
        return storage
    except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.ArgumentError, ModuleNotFoundError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise ConfigError(f"tune.storage: cannot open the study storage {redact(url)}: {reason}. Check that the "
                          f"database server is up and the URL (or ${STORAGE_ENV}) is right") from None


def _sqlite_write_ahead_log(engine) -> None:
    """SQLite in WAL mode with synchronous=NORMAL: a commit no longer waits for an fsync.

    Optuna commits several times per trial and epoch (ask, params, report, prune check, tell, heartbeat);
    with the default rollback journal each commit costs an fsync (6-40 ms on this disk), which was a fixed
    cost of every short trial. WAL keeps every committed trial through a killed process (only an OS crash
    or power cut can lose the last commits), and readers no longer block the writer. Local disks only:
    WAL needs shared memory, so a study on a network filesystem belongs in PostgreSQL.
    """
    from sqlalchemy import event

    def on_connect(dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")  # persistent in the file; cheap to repeat
        cursor.execute("PRAGMA synchronous=NORMAL")  # per connection
        cursor.close()

    event.listen(engine, "connect", on_connect)
    engine.dispose()  # connections pooled while Optuna created its tables reconnect with the pragmas


def worker_id() -> str:
    """host:pid of this process: which machine and worker ran a trial (trials.csv's `worker` column)."""
    return f"{socket.gethostname()}:{os.getpid()}"


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

    return optuna.create_study(study_name=name, storage=_storage(url), direction="maximize", load_if_exists=True,
                               sampler=optuna.samplers.TPESampler(seed=cfg.sampler_seed), pruner=_pruner(cfg))


def _suggest(trial, key: str, dim: SpaceDim) -> Any:
    if dim.type == "float":
        return trial.suggest_float(key, dim.low, dim.high, log=dim.log, step=dim.step)
    if dim.type == "int":
        return trial.suggest_int(key, int(dim.low), int(dim.high), log=dim.log, step=int(dim.step or 1))
    return trial.suggest_categorical(key, dim.choices)


def subset_prepared(prepared_dir: Path, dest: Path, limit_train: int | None, limit_val: int | None, seed: int) -> Path:
    """A stratified slice of the prepared splits for cheap trials (same manifest, smaller arrays)."""
    manifest = load_manifest(prepared_dir)
    dest.mkdir(parents=True, exist_ok=True)
    limits = {"train": limit_train, "val": limit_val, "test": None}
    for split in SPLITS:
        images = np.load(prepared_dir / f"{split}-images.npy")
        labels = np.load(prepared_dir / f"{split}-labels.npy")
        limit = limits[split]
        if limit is not None and limit < labels.size:
            keep, _ = stratified_take(labels, limit, seed)
            images, labels = images[keep], labels[keep]
        np.save(dest / f"{split}-images.npy", images)
        np.save(dest / f"{split}-labels.npy", labels)
    # The trial data's "files" identify the slice, so resume checkpoints never cross slices.
    (dest / "manifest.json").write_text(json.dumps({**manifest, "files": {"slice": [limit_train, limit_val, manifest["files"]]}}))
    return dest


def _objective(base: Params, cfg: TuneConfig, prepared: Path, workdir: Path):
    import optuna
    import torch

    from tasks.train.loop import DivergedError, run_train

    def objective(trial: optuna.Trial) -> float:
        sampled = {key: _suggest(trial, key, dim) for key, dim in cfg.space.items()}
        params = build_params(base.model_dump(mode="json"), {**sampled, "train.epochs": cfg.epochs}, source="trial")
        trial_dir = workdir / f"trial-{trial.number}"
        trial.set_user_attr("worker", worker_id())
        best = {"value": 0.0}

        def report(record: dict, _model) -> None:
            best["value"] = max(best["value"], record["val_accuracy"])
            trial.report(record["val_accuracy"], record["epoch"])
            trial.set_user_attr("epochs_run", record["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {record['epoch']}: val_accuracy {record['val_accuracy']:.4f} behind the other trials")

        try:
            run_train(params.model, params.train.model_copy(update={"resume": False}), prepared,
                      trial_dir / "model.pt", trial_dir / "history.csv", Lineage("trial", "trial", "trial"),
                      checkpoint_dir=trial_dir / "ckpt", show_progress=False, on_epoch=report)
        except DivergedError as exc:
            trial.set_user_attr("reason", f"diverged: {exc}")
            raise
        except torch.cuda.OutOfMemoryError as exc:
            trial.set_user_attr("reason", f"out of GPU memory: {str(exc).splitlines()[0]}")
            raise
        finally:
            shutil.rmtree(trial_dir, ignore_errors=True)
        return best["value"]

    return objective


def _optimize(base: Params, cfg: TuneConfig, prepared: Path, name: str, url: str, workdir: Path) -> None:
    """One worker: run trials until the study holds n_trials finished ones (or the timeout passes)."""
    import optuna
    import torch

    from tasks.train.loop import DivergedError

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = create_study(cfg, name, url)
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    done = len(study.get_trials(deepcopy=False, states=states))
    if done >= cfg.n_trials:
        return
    pack_size = packing_size(cfg, base)
    if pack_size:
        _optimize_packed(study, base, cfg, prepared, workdir, pack_size)
        return
    study.optimize(_objective(base, cfg, prepared, workdir), timeout=cfg.timeout_s,
                   callbacks=[optuna.study.MaxTrialsCallback(cfg.n_trials, states=states)],
                   catch=(DivergedError, torch.cuda.OutOfMemoryError), gc_after_trial=False)


# --- Packed trials (tune.packing): K trials per process, asked and told through Optuna's ask/tell -----------

# tune.packing=auto on CUDA. The reference run (H100, seed CNN) packed 16 models at 6.1x the sequential
# speed; not measured by this project yet (no GPU was lent), so treat 16 as a starting point, not a tuned value.
AUTO_PACK_CUDA = 16
PACKS_PER_ROUND = 2  # a round asks at most this many packs' worth of trials (see _optimize_packed)


def packing_size(cfg: TuneConfig, base: Params) -> int | None:
    """tune.packing resolved to the largest pack (before the memory cap), or None: one trial at a time."""
    from tasks.train.loop import resolve_device

    if cfg.packing == "auto":
        if resolve_device(base.train.device).type != "cuda":
            log.info("tune: tune.packing=auto: off on CPU (set tune.packing to K to pack anyway)")
            return None
        return AUTO_PACK_CUDA
    return cfg.packing if cfg.packing and cfg.packing > 1 else None


def _trial_params(base: Params, cfg: TuneConfig, trial) -> Params:
    sampled = {key: _suggest(trial, key, dim) for key, dim in cfg.space.items()}
    return build_params(base.model_dump(mode="json"), {**sampled, "train.epochs": cfg.epochs}, source="trial")


class _Heartbeats:
    """Heartbeats for every trial this worker holds: study.optimize beats for its one trial, ask/tell must do it.

    Without them another worker (or a rerun) would take a trial waiting for its pack for a dead one, fail it
    and enqueue a retry.
    """

    def __init__(self, study):
        from optuna.storages._heartbeat import is_heartbeat_enabled

        self.storage = study._storage
        self.interval = self.storage.get_heartbeat_interval() if is_heartbeat_enabled(self.storage) else None
        self.trial_ids: set[int] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="tune-heartbeats", daemon=True)

    def __enter__(self) -> "_Heartbeats":
        if self.interval:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()

    def add(self, trial) -> None:
        if self.interval:
            self.storage.record_heartbeat(trial._trial_id)
            with self.lock:
                self.trial_ids.add(trial._trial_id)

    def discard(self, trial) -> None:
        with self.lock:
            self.trial_ids.discard(trial._trial_id)

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            with self.lock:
                ids = sorted(self.trial_ids)
            for trial_id in ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as exc:  # a missed beat is retried next interval; the grace period covers a few
                    log.debug("tune: heartbeat for trial id %d failed: %s", trial_id, exc)


def _optimize_packed(study, base: Params, cfg: TuneConfig, prepared: Path, workdir: Path, pack_size: int) -> None:
    """One worker, packed: ask trials in rounds, group them, train each group as one pack, tell each trial.

    A round asks trials until one group (same architecture, optimizer family, batch size and other shared
    settings: tasks.train.packed.group_key) holds a full pack, or PACKS_PER_ROUND packs' worth, or the budget is
    spent; then every group of the round trains, fullest first (a group of one trains alone, with run_train).
    Asking more than one pack's worth fills packs when the space has a categorical batch size or
    architecture; capping it keeps the sampler's feedback fresh. n_trials counts finished trials (complete,
    pruned, failed) plus trials other workers are running, so workers do not overshoot by whole packs;
    the timeout is checked between rounds (a round that was asked always finishes).
    """
    import optuna

    from tasks.train.packed import group_key, pack_capacity

    solo = _objective(base, cfg, prepared, workdir)
    started = time.monotonic()
    capacity: dict[tuple, int] = {}
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    log.info("tune: packing up to %d trials per pack", pack_size)
    with _Heartbeats(study) as heartbeats:
        while cfg.timeout_s is None or time.monotonic() - started < cfg.timeout_s:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # as study.optimize does before each trial
            trials = study.get_trials(deepcopy=False)
            budget = (cfg.n_trials - sum(t.state in finished for t in trials)
                      - sum(t.state == optuna.trial.TrialState.RUNNING for t in trials))
            if budget <= 0:
                return
            groups: dict[tuple, list] = {}
            pending: list = []  # asked and not yet told: failed if this round ends in an exception
            try:
                for _ in range(min(budget, PACKS_PER_ROUND * pack_size)):
                    with warnings.catch_warnings():  # "heartbeat is meant for Study.optimize": _Heartbeats beats here
                        warnings.filterwarnings("ignore", message="Heartbeat of storage")
                        trial = study.ask()
                    heartbeats.add(trial)
                    pending.append(trial)
                    params = _trial_params(base, cfg, trial)
                    key = group_key(params.model, params.train)
                    if key not in capacity:
                        capacity[key] = pack_capacity(params.model, params.train, prepared, pack_size)
                    groups.setdefault(key, []).append((trial, params))
                    if len(groups[key]) >= capacity[key]:
                        break
                for key, members in sorted(groups.items(), key=lambda kv: -len(kv[1])):
                    for at in range(0, len(members), capacity[key]):
                        chunk = members[at:at + capacity[key]]
                        if len(chunk) == 1:
                            _tell_solo(study, solo, chunk[0][0])
                        else:
                            _tell_pack(study, chunk, base, prepared, heartbeats)
                        for trial, _params in chunk:
                            heartbeats.discard(trial)
                            pending.remove(trial)
            except BaseException:
                for trial in pending:
                    _tell_failed(study, trial, "the tuner stopped while this trial was asked or training")
                    heartbeats.discard(trial)
                raise


def _tell_failed(study, trial, reason: str) -> None:
    import optuna

    try:
        trial.set_user_attr("reason", reason)
    except optuna.exceptions.UpdateFinishedTrialError:  # already told (e.g. by its pack's callback)
        return
    study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)


def _tell_solo(study, objective, trial) -> None:
    """A trial that has no pack to join: trained alone by run_train, told as study.optimize would."""
    import optuna
    import torch

    from tasks.train.loop import DivergedError

    try:
        value = objective(trial)
    except optuna.TrialPruned:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    except (DivergedError, torch.cuda.OutOfMemoryError) as exc:
        log.warning("tune: trial %d failed: %s", trial.number, exc)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    except BaseException:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    else:
        study.tell(trial, value)


def _tell_pack(study, chunk: list, base: Params, prepared: Path, heartbeats: _Heartbeats) -> None:
    """Train `chunk` [(trial, params)] as one pack: each trial reports every epoch and is pruned or told alone.

    A pruned trial's slot is dropped, not refilled: a newcomer would start mid-stream (its data order,
    schedule position and the pruner's rung comparisons would no longer match an unpacked run of the same
    config), and Optuna cannot be asked for a trial of this pack's architecture and batch size. The pack
    shrinks instead (cheaper epochs), and the next round asks for new trials with the pruned results known.
    """
    import optuna
    import torch

    from tasks.train.packed import Member, train_packed

    told: set[int] = set()
    numbers = ",".join(str(trial.number) for trial, _ in chunk)

    def callbacks(trial):
        def on_epoch(record: dict) -> bool:
            # Every epoch reports, so trials.csv's epochs_run (len(intermediate_values)) needs no extra write.
            trial.report(record["val_accuracy"], record["epoch"])
            return trial.should_prune()

        def on_end(result) -> None:
            if result.status == "diverged":
                trial.set_user_attr("reason", f"diverged: {result.reason}")
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            elif result.status == "pruned":
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            else:
                study.tell(trial, result.best_val_accuracy)
            told.add(trial.number)
            heartbeats.discard(trial)

        return on_epoch, on_end

    members = []
    for trial, params in chunk:
        trial.set_user_attr("worker", worker_id())
        trial.set_user_attr("pack", numbers)  # the trials trained together with this one
        on_epoch, on_end = callbacks(trial)
        members.append(Member(params.model, params.train, on_epoch=on_epoch, on_end=on_end))
    try:
        train_packed(members, prepared, data_seed=base.train.seed)
    except torch.cuda.OutOfMemoryError as exc:
        for trial, _params in chunk:
            if trial.number not in told:
                _tell_failed(study, trial, f"out of GPU memory in a pack of {len(chunk)}: "
                                           f"{str(exc).splitlines()[0]}; lower tune.packing")


def _worker(base_json: dict, cfg_json: dict, prepared: str, name: str, url: str, workdir: str, gpu: str | None) -> None:
    if gpu is not None:  # pin this worker to one GPU before CUDA initialises
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    logging.basicConfig(level=logging.WARNING)
    _optimize(Params.model_validate(base_json), TuneConfig.model_validate(cfg_json), Path(prepared), name, url, Path(workdir))


def run_tune(params: Params, prepared_dir: Path, tuning_dir: Path, data_version: str, workers: int = 1) -> TuneResult:
    """Run (or continue) the study with `workers` processes; write best params, trials CSV and plots."""
    import optuna

    cfg = params.tune
    tuning_dir = Path(tuning_dir)
    tuning_dir.mkdir(parents=True, exist_ok=True)
    best_path = tuning_dir / "best_params.json"
    if not cfg.enabled:
        write_bytes_atomic(best_path, (json.dumps({"format": BEST_FORMAT, "enabled": False, "params": {}}, indent=2) + "\n").encode())
        _write_trials_csv(tuning_dir / "trials.csv", [], [])
        log.info("tune: disabled (tune.enabled=false): training uses params.yaml as given")
        return TuneResult("", {}, None, {}, best_path, tuning_dir / "trials.csv", [])
    validate_space(params, cfg.space)
    name, url = study_name(cfg, data_version), storage_url(cfg, tuning_dir)
    create_study(cfg, name, url)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tune-") as tmp:
        prepared = subset_prepared(Path(prepared_dir), Path(tmp) / "data", cfg.limit_train, cfg.limit_val, params.data.seed)
        if workers <= 1:
            _optimize(params, cfg, prepared, name, url, Path(tmp))
        else:
            gpus = _visible_gpus()
            ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no forked CUDA/threads
            procs = [ctx.Process(target=_worker, args=(params.model_dump(mode="json"), cfg.model_dump(mode="json"),
                                                         str(prepared), name, url, tmp,
                                                         gpus[i % len(gpus)] if len(gpus) > 1 else None))
                     for i in range(workers)]
            for proc in procs:
                proc.start()
            for proc in procs:
                proc.join()
            failed = [p.exitcode for p in procs if p.exitcode != 0]
            if failed:
                raise RuntimeError(f"tune: {len(failed)} of {workers} workers failed (exit codes {failed}); "
                                   "the study keeps every finished trial: rerun to continue")
    study = optuna.load_study(study_name=name, storage=_storage(url))
    return _write_results(study, cfg, tuning_dir, time.perf_counter() - started)


def _visible_gpus() -> list[str]:
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def _trial_rows(study) -> tuple[list[dict], list[str]]:
    keys = sorted({k for t in study.trials for k in t.params})
    rows = []
    for t in study.trials:
        duration = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        rows.append({"number": t.number, "state": t.state.name, "value": t.value,
                     "duration_s": round(duration, 2) if duration is not None else None,
                     "epochs_run": t.user_attrs.get("epochs_run", len(t.intermediate_values)),
                     "reason": t.user_attrs.get("reason", ""), "worker": t.user_attrs.get("worker", ""),
                     **{k: t.params.get(k) for k in keys}})
    return rows, keys


def _write_trials_csv(path: Path, rows: list[dict], keys: list[str]) -> None:
    fields = ["number", "state", "value", "duration_s", "epochs_run", "reason", "worker", *keys]
    with staged_file(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _write_results(study, cfg: TuneConfig, tuning_dir: Path, seconds: float) -> TuneResult:
    import optuna

    rows, keys = _trial_rows(study)
    _write_trials_csv(tuning_dir / "trials.csv", rows, keys)
    states: dict[str, int] = {}
    for row in rows:
        states[row["state"]] = states.get(row["state"], 0) + 1
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise RuntimeError(f"tune: no trial of study {study.study_name} completed ({states}); see "
                           f"{tuning_dir / 'trials.csv'} for each trial's reason, then widen or fix tune.space")
    best = study.best_trial
    top = sorted((r for r in rows if r["state"] == "COMPLETE"), key=lambda r: -r["value"])[:5]
    payload = {"format": BEST_FORMAT, "enabled": True, "study": study.study_name, "best_trial": best.number,
               "value": best.value, "params": best.params, "states": states, "seconds": round(seconds, 1)}
    write_bytes_atomic(tuning_dir / "best_params.json", (json.dumps(payload, indent=2) + "\n").encode())
    _write_plots(study, tuning_dir, len(complete))
    log.info("tune: study %s: best val_accuracy %.4f (trial %d) %s; trials %s", study.study_name, best.value,
             best.number, best.params, states)
    return TuneResult(study.study_name, best.params, best.value, states, tuning_dir / "best_params.json",
                      tuning_dir / "trials.csv", top)


def _write_plots(study, tuning_dir: Path, n_complete: int) -> None:
    """Optuna's own optimization history and parameter importances, as standalone HTML (plotly)."""
    from optuna import visualization

    figures = {"history.html": visualization.plot_optimization_history(study)}
    if n_complete >= 2 and len(study.best_trial.params) >= 2:  # importances need variation to explain
        figures["importance.html"] = visualization.plot_param_importances(study)
    for name, figure in figures.items():
        with staged_file(tuning_dir / name) as tmp:
            figure.write_html(str(tmp), include_plotlyjs=True, full_html=True)


def apply_best_params(params: Params, best_params_path: Path) -> Params:
    """Params with the tuned values on top (as if given with -S); unchanged when tuning is off."""
    path = Path(best_params_path)
    if not params.tune.enabled or not path.is_file():
        return params
    best = json.loads(path.read_text())
    if not best.get("params"):
        return params
    return build_params(params.model_dump(mode="json"), best["params"], source=str(path))


def tuning_summary(tuning_dir: Path, top: int = 5) -> dict:
    """What the last tune stage found: best params/value, trial states and the top trials (for reports)."""
    best_path, trials_path = Path(tuning_dir) / "best_params.json", Path(tuning_dir) / "trials.csv"
    if not best_path.is_file():
        return {"enabled": False}
    best = json.loads(best_path.read_text())
    rows = list(csv.DictReader(open(trials_path))) if trials_path.is_file() else []
    complete = sorted((r for r in rows if r["state"] == "COMPLETE"), key=lambda r: -float(r["value"]))
    return {"enabled": best.get("enabled", False), "study": best.get("study"), "best_value": best.get("value"),
            "best_params": best.get("params", {}), "states": best.get("states", {}), "top_trials": complete[:top]}
