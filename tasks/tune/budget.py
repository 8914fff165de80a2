"""The study's budget and its faults: what is left to run, trials lost with their worker, the failure limit.

`n_trials` counts *finished* trials — COMPLETE or PRUNED. A FAIL trial (it raised, diverged, ran out of
memory, or its worker died) is recorded with its reason but does not use up the budget: the study runs
another in its place, until `tune.max_failures` failures in one tune call stop it with an error.

Exactly n_trials, with several workers on one study: a worker runs a trial only while finished + running
trials are below n_trials (it waits while others' running trials would fill it), and a trial re-checks
right after it was asked, against the trials numbered before it, because two workers can ask at the same
instant; the later one is then told FAIL, marked `not_run`, and counts as neither budget nor failure.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Literal

from tuneline.core.config.tune import TuneConfig
from tuneline.tasks.tune.stopping import patience_reason

log = logging.getLogger(__name__)

NOT_RUN = "not_run"  # user attr of a trial asked after the budget was taken: not a failure, not a result


class BudgetTaken(Exception):
    """Raised by a trial asked after other workers had already taken the last of n_trials."""


def max_failures(cfg: TuneConfig) -> int:
    """tune.max_failures, or n_trials when unset."""
    return cfg.max_failures if cfg.max_failures is not None else cfg.n_trials


def _ok(trial) -> bool:
    import optuna

    return trial.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def _running(trial) -> bool:
    import optuna

    return trial.state == optuna.trial.TrialState.RUNNING


def failures(trials, first_number: int) -> list:
    """FAIL trials numbered from `first_number` (this tune call's), not counting trials that were never run."""
    import optuna

    return [t for t in trials if t.number >= first_number and t.state == optuna.trial.TrialState.FAIL
            and not t.user_attrs.get(NOT_RUN)]


def taken_before(trials, number: int) -> int:
    """Budget held by trials numbered below `number`: finished ones and those still running."""
    return sum(1 for t in trials if t.number < number and (_ok(t) or _running(t)))


@dataclass(frozen=True)
class Step:
    action: Literal["run", "wait", "stop"]
    reason: str = ""
    kind: Literal["", "done", "patience", "failures"] = ""


def next_step(study, cfg: TuneConfig, first_number: int) -> Step:
    """What a worker does next: run a trial, wait for others' running trials, or stop (and why)."""
    import warnings

    import optuna

    reap_lost_local_trials(study)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # trials of workers on other machines: by their heartbeat
    trials = study.get_trials(deepcopy=False)
    failed = failures(trials, first_number)
    if len(failed) >= max_failures(cfg):
        last = failed[-1]
        return Step("stop", f"{len(failed)} trials failed in this tune call (tune.max_failures={max_failures(cfg)}); "
                            f"last: trial {last.number}: {last.user_attrs.get('reason') or 'no reason recorded'}",
                    "failures")
    ok = sum(1 for t in trials if _ok(t))
    if cfg.patience is not None and (reason := patience_reason(trials, cfg.patience)):
        return Step("stop", reason, "patience")
    if ok >= cfg.n_trials:
        return Step("stop", f"{ok} finished trials (tune.n_trials={cfg.n_trials})", "done")
    running = sum(1 for t in trials if _running(t))
    if ok + running >= cfg.n_trials:
        return Step("wait", f"{running} running trials would complete the budget")
    return Step("run")


def worker_id(pid: int | None = None) -> str:
    """host:pid of a process: which machine and worker ran a trial (trials.csv's `worker` column)."""
    return f"{socket.gethostname()}:{pid or os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def reap_lost_local_trials(study) -> list[int]:
    """Fail and retry RUNNING trials whose worker was a process on this machine that no longer exists.

    The heartbeat would fail them too, but only after its grace period (30 s); a worker on this machine can
    tell at once that the pid is gone (a killed worker, or a whole tune run killed and started again).
    """
    host, me = socket.gethostname(), os.getpid()
    lost = []
    for trial in study.get_trials(deepcopy=False):
        owner = str(trial.user_attrs.get("worker", ""))
        name, _, pid = owner.rpartition(":")
        if _running(trial) and name == host and pid.isdigit() and int(pid) != me and not _alive(int(pid)):
            if fail_lost_trial(study, trial, f"worker lost: process {owner} is gone (killed mid-trial); retried"):
                lost.append(trial.number)
    return lost


def fail_trials_of(study, owner: str, reason: str) -> list[int]:
    """Fail and retry the RUNNING trials of worker `owner` (host:pid), e.g. one that its parent saw die."""
    return [t.number for t in study.get_trials(deepcopy=False)
            if _running(t) and t.user_attrs.get("worker") == owner and fail_lost_trial(study, t, reason)]


def fail_lost_trial(study, trial, reason: str) -> bool:
    """Mark a lost trial FAIL with its reason and enqueue its retry (once, as the heartbeat would); False when
    another process got there first."""
    import copy

    import optuna

    storage = study._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, "reason", reason)
        if not storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:  # finished meanwhile, or failed by another worker
        return False
    log.warning("tune: trial %d: %s", trial.number, reason)
    retry = storage.get_heartbeat_stale_trial_callback() if hasattr(storage, "get_heartbeat_stale_trial_callback") else None
    if retry is not None:  # RetryHeartbeatStaleTrialCallback: the same params enqueued as a WAITING trial
        retry(study, copy.deepcopy(storage.get_trial(trial._trial_id)))
    return True
