"""Study-level early stopping: end the study when its best has not improved for `tune.patience` trials.

Optuna has no such stop built in (optuna#4292); users write a callback that calls study.stop(). Here the
rule is a pure function of the study's trials, so every worker, a rerun and the final report agree on it.

In a multi-objective study (tune.objectives) "improved" means a trial joined the Pareto front: no trial finished
before it is at least as accurate and at least as cheap in every cost. With accuracy alone that is the same rule
as a new best.
"""

from __future__ import annotations


def _oriented(trial) -> tuple[float, ...]:
    # Larger is better in every place: accuracy is maximised, the serving costs after it minimised
    # (tasks/tune/study.py DIRECTIONS).
    return (trial.values[0], *(-value for value in trial.values[1:]))


def _improves(point: tuple[float, ...], before: list[tuple[float, ...]]) -> bool:
    """Not weakly dominated by any earlier point (a tie with one is no improvement)."""
    return not any(all(b >= p for b, p in zip(earlier, point)) for earlier in before)


def patience_reason(trials, patience: int) -> str | None:
    """Why the study should stop — its best value (or Pareto front) unimproved by the last `patience` finished trials —
    or None.

    Finished = COMPLETE or PRUNED, in the order they finished (several workers finish out of number order).
    A pruned trial never improves the best; a tie is not an improvement.
    """
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    finished = sorted((t for t in trials if t.state in states and t.datetime_complete is not None),
                      key=lambda t: (t.datetime_complete, t.number))
    points, last, since = [], None, []
    for trial in finished:
        if trial.state == optuna.trial.TrialState.COMPLETE and _improves(_oriented(trial), points):
            last, since = trial, []
        else:
            since.append(trial.number)
        if trial.state == optuna.trial.TrialState.COMPLETE:
            points.append(_oriented(trial))
    if last is None or len(since) < patience:
        return None
    trials_since = f"the {len(since)} trials finished since (trials {', '.join(map(str, since))}); tune.patience={patience}"
    if len(last.values) > 1:
        return f"Pareto front unchanged since trial {last.number} joined it, by {trials_since}"
    best = max(point[0] for point in points)
    return f"best val_accuracy {best:.4f} (trial {last.number}) not improved by {trials_since}"
