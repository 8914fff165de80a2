"""Packed trials (tune.packing): K trials trained together in one process, each slot refilled as soon as it frees.

A pack starts with up to K trials of one group (same architecture, optimizer family, batch size and other
shared settings: tuneline.tasks.train.packed.group_key). At every epoch boundary each member reports its validation
accuracy to Optuna and asks the pruner, as a trial trained alone would (trial.report / trial.should_prune, in
row order); a member that is pruned, completes or diverges leaves, and its slot is refilled at once with the
next trial that fits the pack (asked from the study, or taken from the backlog of trials asked earlier that
did not fit theirs). A newcomer counts its own epochs, runs its own lr schedule and optimizer steps from 0 and
walks the data by its own train.seed (tasks/train/packed.py, data_seed="own"), so it sees the batches, the
schedule and the pruner's rungs it would see alone: its metrics equal its solo twin's
(tests/tasks/tune/test_packs_that_prune.py). Packs therefore stay full while the study has trials to give.

The budget is tasks/tune/budget.py's, as in the one-at-a-time path: a trial is asked only while `next_step` says
"run" (n_trials counts COMPLETE and PRUNED trials, plus the running ones; a FAIL trial frees its place), and the
study stops at `tune.max_failures` failures or `tune.patience`. Asked trials that never ran when the study stops
are told FAIL and marked `not_run` (neither budget nor failure). The timeout is checked between packs and before
each refill.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import logging
import time
import warnings
from pathlib import Path

from tuneline.core.config.tune import TuneConfig
from tuneline.tasks.data.stream import DataAccess
from tuneline.tasks.tune.budget import NOT_RUN, next_step, taken_before
from tuneline.tasks.tune.heartbeats import TrialHeartbeats
from tuneline.tasks.tune.objective import failure_reason, make_objective, worker_id
from tuneline.tasks.tune.space import trial_params

if TYPE_CHECKING:  # the root schema: not a code dep of this stage (core/config/params.py)
    from tuneline.core.config.params import Params

log = logging.getLogger(__name__)

# tune.packing=auto on CUDA. The reference run (H100, seed CNN) packed 16 models at 6.1x the sequential
# speed; not measured by this project yet (no GPU was lent), so treat 16 as a starting point, not a tuned value.
AUTO_PACK_CUDA = 16
WAIT_S = 1.0  # while others' running trials would complete the budget: how often to look again


def packing_size(cfg: TuneConfig, base: Params) -> int | None:
    """tune.packing resolved to the largest pack (before the memory cap), or None: one trial at a time."""
    from tuneline.tasks.train.setup import resolve_device

    if cfg.packing == "auto":
        if resolve_device(base.train.device).type != "cuda":
            log.info("tune: tune.packing=auto: off on CPU (set tune.packing to K to pack anyway)")
            return None
        return AUTO_PACK_CUDA
    return cfg.packing if cfg.packing and cfg.packing > 1 else None


class _Trials:
    """This worker's asked trials: asks the study within the budget, keeps those that fit no pack yet (backlog)."""

    def __init__(self, study, base: Params, cfg: TuneConfig, heartbeats: TrialHeartbeats, first_number: int,
                 pack_size: int):
        self.study, self.base, self.cfg, self.heartbeats = study, base, cfg, heartbeats
        self.first_number, self.pack_size = first_number, pack_size
        self.backlog: list[tuple] = []  # (trial, params) asked, waiting for a pack of their group

    def ask(self) -> tuple | None:
        """A new trial and its params, or None when the budget has no room (or another worker took it)."""
        import optuna

        if next_step(self.study, self.cfg, self.first_number).action != "run":
            return None
        with warnings.catch_warnings():  # "heartbeat is meant for Study.optimize": TrialHeartbeats beats here
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = self.study.ask()
        trial.set_user_attr("worker", worker_id())  # first: a worker that dies from here on is seen as lost
        self.heartbeats.add(trial)
        if taken_before(self.study.get_trials(deepcopy=False), trial.number) >= self.cfg.n_trials:
            self.drop(trial, "not run: other workers had taken the last of tune.n_trials")
            return None
        try:
            return trial, trial_params(self.base, self.cfg, trial)
        except Exception as exc:  # noqa: BLE001 - a space that builds an invalid config: recorded, the study goes on
            self.tell(trial, optuna.trial.TrialState.FAIL, failure_reason(exc))
            return None

    def next(self) -> tuple | None:
        """The oldest backlog trial, else a new one."""
        return self.backlog.pop(0) if self.backlog else self.ask()

    def draw(self, n: int, fits) -> list[tuple]:
        """Up to `n` trials whose params `fits`: backlog first, then asked (those that do not fit join the backlog;
        at most pack_size of them per draw, so a space of many groups cannot ask the whole budget ahead)."""
        taken = [entry for entry in self.backlog if fits(entry[1])][:n]
        self.backlog = [entry for entry in self.backlog if all(entry is not t for t in taken)]
        misfits = 0
        while len(taken) < n and misfits < self.pack_size:
            entry = self.ask()
            if entry is None:
                break
            if fits(entry[1]):
                taken.append(entry)
            else:
                self.backlog.append(entry)
                misfits += 1
        return taken

    def tell(self, trial, state, reason: str = "", value: float | None = None) -> None:
        """Finish `trial` (once: a trial told already is left as it is) and stop its heartbeat."""
        import optuna

        self.heartbeats.discard(trial)
        try:
            if reason:
                trial.set_user_attr("reason", reason)
            self.study.tell(trial, value, state=state, skip_if_finished=True)
        except optuna.exceptions.UpdateFinishedTrialError:  # told meanwhile (e.g. failed by another worker)
            pass

    def drop(self, trial, reason: str) -> None:
        """A trial asked but never run: FAIL, marked not_run (counts as neither budget nor failure)."""
        import optuna

        try:
            trial.set_user_attr(NOT_RUN, True)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass
        self.tell(trial, optuna.trial.TrialState.FAIL, reason)

    def drop_backlog(self, reason: str) -> None:
        for trial, _params in self.backlog:
            self.drop(trial, reason)
        self.backlog = []


def optimize_packed(study, base: Params, cfg: TuneConfig, prepared: Path, workdir: Path, pack_size: int,
                    first_number: int = 0) -> None:
    """One worker, packed: train trials in packs of up to `pack_size` of one group, refilling freed slots, until
    budget.next_step says stop (or tune.timeout_s passes); failures from trial `first_number` on count toward
    tune.max_failures."""
    from tuneline.tasks.train.packed import group_key, pack_capacity

    solo = make_objective(base, cfg, prepared, workdir)
    started = time.monotonic()
    capacity: dict[tuple, int] = {}
    timed_out = lambda: cfg.timeout_s is not None and time.monotonic() - started >= cfg.timeout_s
    log.info("tune: packing up to %d trials per pack, freed slots refilled", pack_size)
    with TrialHeartbeats(study) as heartbeats:
        trials = _Trials(study, base, cfg, heartbeats, first_number, pack_size)
        try:
            while not timed_out():
                step = next_step(study, cfg, first_number)
                if step.action == "stop":
                    if step.kind != "done":
                        log.warning("tune: study %s stopped: %s", study.study_name, step.reason)
                    break
                first = trials.next()
                if first is None:
                    time.sleep(WAIT_S)  # others' running trials would complete the budget
                    continue
                key = group_key(first[1].model, first[1].train)
                if key not in capacity:
                    capacity[key] = pack_capacity(first[1].model, first[1].train, prepared, pack_size)
                same = lambda params: group_key(params.model, params.train) == key  # noqa: B023
                chunk = [first, *trials.draw(capacity[key] - 1, same)]
                if len(chunk) == 1:
                    _tell_solo(study, solo, trials, first[0])
                else:
                    _train_pack(chunk, base, prepared, trials, refill=lambda: not timed_out())
        finally:  # asked and never trained: not a result and not a failure
            trials.drop_backlog("not run: the tuner stopped before this trial's pack formed")


def _tell_solo(study, objective, trials: _Trials, trial) -> None:
    """A trial that has no pack to join: trained alone (train_trial), told as study.optimize would tell it."""
    import optuna

    try:
        value = objective(trial)
    except optuna.TrialPruned:
        trials.tell(trial, optuna.trial.TrialState.PRUNED)
    except Exception as exc:  # noqa: BLE001 - FAIL with its reason (the objective recorded it); the study goes on
        log.warning("tune: trial %d failed: %s", trial.number, failure_reason(exc))
        trials.tell(trial, optuna.trial.TrialState.FAIL)
    except BaseException:
        trials.tell(trial, optuna.trial.TrialState.FAIL, "the tuner stopped while this trial was training")
        raise
    else:
        trials.tell(trial, optuna.trial.TrialState.COMPLETE, value=value)


def _train_pack(chunk: list, base: Params, prepared: Path, trials: _Trials, refill) -> None:
    """Train `chunk` [(trial, params)] as one pack; each member reports every epoch and is pruned or told alone,
    and each freed slot takes the next trial that fits (while `refill()` says the tuner may go on)."""
    import optuna
    import torch

    from tuneline.tasks.train.packed import Member, train_packed

    state = optuna.trial.TrialState
    running: dict[int, object] = {}  # trial number -> trial, for members not yet told
    pack_id = chunk[0][0].number  # the pack's first trial: every trial it trains carries it

    def member(trial, params) -> Member:
        trial.set_user_attr("pack_id", pack_id)
        trial.set_user_attr("pack", ",".join(str(n) for n in sorted(running) + [trial.number]))  # rows when it joined
        running[trial.number] = trial

        def on_epoch(record: dict) -> bool:
            # Every epoch reports, so trials.csv's epochs_run (len(intermediate_values)) needs no extra write.
            trial.report(record["val_accuracy"], record["epoch"])
            trial.set_user_attr("epochs_run", record["epoch"])
            return trial.should_prune()

        def on_end(result) -> None:
            running.pop(trial.number, None)
            if result.status == "diverged":
                trials.tell(trial, state.FAIL, f"diverged: {result.reason}")
            elif result.status == "pruned":
                trials.tell(trial, state.PRUNED)
            else:
                trials.tell(trial, state.COMPLETE, value=result.best_val_accuracy)

        return Member(params.model, params.train, on_epoch=on_epoch, on_end=on_end)

    def join(free: int, unfit_reason) -> list[Member]:
        if not refill():
            return []
        fits = lambda params: unfit_reason(Member(params.model, params.train)) is None
        return [member(trial, params) for trial, params in trials.draw(free, fits)]

    members = [member(trial, params) for trial, params in chunk]
    try:
        train_packed(members, prepared, data_seed="own", refill=join, access=DataAccess.from_config(base.data))
    except torch.cuda.OutOfMemoryError as exc:
        reason = f"out of GPU memory in a pack of {len(chunk)}: {str(exc).splitlines()[0]}; lower tune.packing"
        _fail_all(trials, running, reason)
    except Exception as exc:  # noqa: BLE001 - as a trial that raises: FAIL with the reason, the study goes on
        log.warning("tune: pack of trials %s failed: %s", ",".join(map(str, sorted(running))), failure_reason(exc))
        _fail_all(trials, running, failure_reason(exc))
    except BaseException:
        _fail_all(trials, running, "the tuner stopped while this trial was training")
        raise


def _fail_all(trials: _Trials, running: dict, reason: str) -> None:
    import optuna

    for trial in list(running.values()):
        trials.tell(trial, optuna.trial.TrialState.FAIL, reason)
    running.clear()
