"""tune.patience: the study stops when its best has not improved for N finished trials (optuna#4292)."""

import optuna
import pytest

from tuneline.core.config.params import build_params
from tuneline.tasks.tune.budget import next_step
from tuneline.tasks.tune.stopping import patience_reason

COMPLETE, PRUNED, FAIL = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL


def study_with(*finished):
    """A real (in-memory) study holding trials that finished in the given order: (state, value)."""
    study = optuna.create_study(direction="maximize")
    for i, (state, value) in enumerate(finished):  # create_trial stamps each as finished now: in this order
        study.add_trial(optuna.trial.create_trial(
            state=state, value=value if state == COMPLETE else None,
            intermediate_values={1: value} if state == PRUNED else {}, params={}, distributions={}))
    return study


@pytest.mark.fast
def test_patience_counts_finished_trials_since_the_best():
    study = study_with((COMPLETE, 0.90), (COMPLETE, 0.95), (PRUNED, 0.5), (COMPLETE, 0.95), (FAIL, None), (COMPLETE, 0.94))
    # After the best (trial 1): trial 2 pruned, 3 ties (no improvement), 5 lower; the FAIL (4) does not count.
    assert patience_reason(study.trials, 4) is None
    reason = patience_reason(study.trials, 3)
    assert reason == ("best val_accuracy 0.9500 (trial 1) not improved by the 3 trials finished since "
                      "(trials 2, 3, 5); tune.patience=3")


@pytest.mark.fast
def test_an_improvement_restarts_the_count_and_a_study_without_a_result_never_stops():
    assert patience_reason(study_with((COMPLETE, 0.9), (COMPLETE, 0.8), (COMPLETE, 0.91)).trials, 1) is None
    assert patience_reason(study_with((PRUNED, 0.1), (PRUNED, 0.2)).trials, 1) is None


@pytest.mark.fast
def test_a_worker_stops_on_patience_before_the_budget_is_spent():
    study = study_with((COMPLETE, 0.95), (COMPLETE, 0.93), (PRUNED, 0.4))
    cfg = build_params({}, {"tune.n_trials": 10, "tune.patience": 2}).tune
    step = next_step(study, cfg, first_number=0)
    assert (step.action, step.kind) == ("stop", "patience") and "(trial 0)" in step.reason
    assert next_step(study, cfg.model_copy(update={"patience": 3}), 0).action == "run"
