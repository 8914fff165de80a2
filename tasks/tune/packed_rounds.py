"""Packed trials (tune.packing): K trials per process, asked in rounds, grouped, trained as one pack, told alone."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

from tasks.config import Params, TuneConfig
from tasks.tune.heartbeats import TrialHeartbeats
from tasks.tune.objective import make_objective, worker_id
from tasks.tune.space import trial_params

log = logging.getLogger(__name__)

# tune.packing=auto on CUDA. The reference run (H100, seed CNN) packed 16 models at 6.1x the sequential
# speed; not measured by this project yet (no GPU was lent), so treat 16 as a starting point, not a tuned value.
AUTO_PACK_CUDA = 16
PACKS_PER_ROUND = 2  # a round asks at most this many packs' worth of trials (see optimize_packed)


def packing_size(cfg: TuneConfig, base: Params) -> int | None:
    """tune.packing resolved to the largest pack (before the memory cap), or None: one trial at a time."""
    from tasks.train.loop import resolve_device

    if cfg.packing == "auto":
        if resolve_device(base.train.device).type != "cuda":
            log.info("tune: tune.packing=auto: off on CPU (set tune.packing to K to pack anyway)")
            return None
        return AUTO_PACK_CUDA
    return cfg.packing if cfg.packing and cfg.packing > 1 else None


def optimize_packed(study, base: Params, cfg: TuneConfig, prepared: Path, workdir: Path, pack_size: int) -> None:
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

    solo = make_objective(base, cfg, prepared, workdir)
    started = time.monotonic()
    capacity: dict[tuple, int] = {}
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    log.info("tune: packing up to %d trials per pack", pack_size)
    with TrialHeartbeats(study) as heartbeats:
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
                    with warnings.catch_warnings():  # "heartbeat is meant for Study.optimize": TrialHeartbeats beats here
                        warnings.filterwarnings("ignore", message="Heartbeat of storage")
                        trial = study.ask()
                    heartbeats.add(trial)
                    pending.append(trial)
                    params = trial_params(base, cfg, trial)
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


def _tell_pack(study, chunk: list, base: Params, prepared: Path, heartbeats: TrialHeartbeats) -> None:
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

