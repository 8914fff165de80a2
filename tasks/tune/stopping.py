"""Study-level early stopping: end the study when its best has not improved for `tune.patience` trials.

Optuna has no such stop built in (optuna#4292); users write a callback that calls study.stop(). Here the
rule is a pure function of the study's trials, so every worker, a rerun and the final report agree on it.
"""

from __future__ import annotations


def patience_reason(trials, patience: int) -> str | None:
    """Why the study should stop — its best value unimproved by the last `patience` finished trials — or None.

    Finished = COMPLETE or PRUNED, in the order they finished (several workers finish out of number order).
    A pruned trial never improves the best; a tie is not an improvement.
    """
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    finished = sorted((t for t in trials if t.state in states and t.datetime_complete is not None),
                      key=lambda t: (t.datetime_complete, t.number))
    best, best_number, since = None, None, []
    for trial in finished:
        if trial.state == optuna.trial.TrialState.COMPLETE and (best is None or trial.value > best):
            best, best_number, since = trial.value, trial.number, []
        else:
            since.append(trial.number)
    if best is None or len(since) < patience:
        return None
    return (f"best val_accuracy {best:.4f} (trial {best_number}) not improved by the {len(since)} trials finished "
            f"since (trials {', '.join(map(str, since))}); tune.patience={patience}")
