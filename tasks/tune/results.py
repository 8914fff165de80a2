"""What the tune stage found and its files: TuneResult, trials.csv, best_params.json, plots, and their readers."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TYPE_CHECKING

from tuneline.core.atomic import staged_file, write_bytes_atomic
from tuneline.core.config.gate import GateConfig
from tuneline.core.config.tune import TuneConfig
from tuneline.core.config.overrides import with_overrides

if TYPE_CHECKING:  # the root schema: not a code dep of this stage (core/config/params.py)
    from tuneline.core.config.params import Params

log = logging.getLogger(__name__)

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
    stopped: str | None = None  # why the study stopped before n_trials (tune.patience), if it did
    pareto: list[dict] | None = None  # multi-objective: the front, most accurate first (tasks/tune/pareto.py)
    pick: dict | None = None          # multi-objective: {"rule", "trial", "why"}: the front trial train uses


def write_disabled(tuning_dir: Path) -> TuneResult:
    """tune.enabled=false: best_params.json says so (no params) and trials.csv has only its header."""
    best_path = tuning_dir / "best_params.json"
    write_bytes_atomic(best_path, (json.dumps({"format": BEST_FORMAT, "enabled": False, "params": {}}, indent=2) + "\n").encode())
    write_trials_csv(tuning_dir / "trials.csv", [], [])
    return TuneResult("", {}, None, {}, best_path, tuning_dir / "trials.csv", [])


def _trial_rows(study, objectives: list[str] | tuple[str, ...] = ("accuracy",)) -> tuple[list[dict], list[str]]:
    """One dict per trial; `value` is the accuracy, and each further objective (a serving cost) has a column."""
    trials = study.trials
    keys = sorted({k for t in trials for k in t.params})
    # A trial failed by Optuna's heartbeat (a worker on another machine went silent) carries no reason of its
    # own; its retry names it in system attr failed_trial.
    retried_as = {t.system_attrs["failed_trial"]: t.number for t in trials if "failed_trial" in t.system_attrs}
    rows = []
    for t in trials:
        duration = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        reason = t.user_attrs.get("reason", "")
        if not reason and t.state.name == "FAIL" and t.number in retried_as:
            reason = f"worker lost: no heartbeat within the grace period; retried as trial {retried_as[t.number]}"
        values = list(t.values or [None] * len(objectives))  # FrozenTrial.value raises in a multi-objective study
        rows.append({"number": t.number, "state": t.state.name, "value": values[0],
                     **dict(zip(objectives[1:], values[1:])),
                     "duration_s": round(duration, 2) if duration is not None else None,
                     "epochs_run": t.user_attrs.get("epochs_run", len(t.intermediate_values)),
                     "reason": reason, "worker": t.user_attrs.get("worker", ""),
                     **{k: t.params.get(k) for k in keys}})
    return rows, keys


def write_trials_table(study, tuning_dir: Path, objectives: list[str] | tuple[str, ...] = ("accuracy",)) -> None:
    """trials.csv alone (a study that stopped on its failures has no best to write)."""
    rows, keys = _trial_rows(study, objectives)
    write_trials_csv(Path(tuning_dir) / "trials.csv", rows, keys, objectives)


def write_trials_csv(path: Path, rows: list[dict], keys: list[str],
                     objectives: list[str] | tuple[str, ...] = ("accuracy",)) -> None:
    """One row per trial: number, state, value (accuracy), each serving-cost objective, duration, epochs run, failure
    reason, worker, then its params."""
    fields = ["number", "state", "value", *objectives[1:], "duration_s", "epochs_run", "reason", "worker", *keys]
    with staged_file(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def write_results(study, cfg: TuneConfig, tuning_dir: Path, seconds: float, stopped: str | None = None,
                  gate: GateConfig | None = None) -> TuneResult:
    """trials.csv, best_params.json and the plots for `study`; a RuntimeError when no trial completed.

    A multi-objective study writes its Pareto front and the trial tune.pick chose (checked against `gate`) instead
    of one best.
    """
    import optuna

    rows, keys = _trial_rows(study, cfg.objectives)
    write_trials_csv(tuning_dir / "trials.csv", rows, keys, cfg.objectives)
    states: dict[str, int] = {}
    for row in rows:
        states[row["state"]] = states.get(row["state"], 0) + 1
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise RuntimeError(f"tune: no trial of study {study.study_name} completed ({states}); see "
                           f"{tuning_dir / 'trials.csv'} for each trial's reason, then widen or fix tune.space")
    plots = _write_plots(study, tuning_dir)
    extra: dict[str, Any] = {}
    if len(cfg.objectives) > 1:
        chosen, extra = _pick_from_front(study, cfg, gate or GateConfig(), tuning_dir)
        plots = {"pareto": extra.pop("plot"), **plots}
    else:
        chosen = study.best_trial
    value = chosen.values[0]  # accuracy: the first objective of every study
    top = sorted((r for r in rows if r["state"] == "COMPLETE"), key=lambda r: -r["value"])[:5]
    payload = {"format": BEST_FORMAT, "enabled": True, "study": study.study_name, "best_trial": chosen.number,
               "value": value, "params": chosen.params, "states": states, "seconds": round(seconds, 1),
               "stopped": stopped, "dashboard": dashboard_hint(study), "plots": plots, **extra}
    write_bytes_atomic(tuning_dir / "best_params.json", (json.dumps(payload, indent=2) + "\n").encode())
    log.info("tune: study %s: %s val_accuracy %.4f (trial %d) %s; trials %s", study.study_name,
             "picked" if extra else "best", value, chosen.number, chosen.params, states)
    return TuneResult(study.study_name, chosen.params, value, states, tuning_dir / "best_params.json",
                      tuning_dir / "trials.csv", top, stopped, pareto=extra.get("pareto"), pick=extra.get("pick"))


def _pick_from_front(study, cfg: TuneConfig, gate: GateConfig, tuning_dir: Path):
    """Multi-objective: (the trial tune.pick chose, best_params.json's extra keys: objectives, pick, pareto, plot)."""
    from tuneline.tasks.tune.pareto import front_rows, pick_trial, write_pareto_plot

    front = front_rows(study, cfg.objectives)
    plot = write_pareto_plot(study, cfg, tuning_dir)  # before the pick: a failed pick still shows the front
    pick = pick_trial(front, cfg, gate, study.study_name)
    log.info("tune: study %s: %d Pareto trials of %s; train uses trial %d (tune.pick=%s): %s; front: %s",
             study.study_name, len(front), cfg.objectives, pick["trial"], cfg.pick, pick["why"], plot)
    chosen = next(t for t in study.best_trials if t.number == pick["trial"])
    return chosen, {"objectives": cfg.objectives, "pick": pick, "pareto": front, "plot": plot.name}


def dashboard_hint(study) -> dict:
    """How to watch the study live: the command and the page it serves on its default host and port."""
    from tuneline.tasks.tune.dashboard import DEFAULT_PORT, dashboard_url

    return {"command": "tuneline dashboard", "url": dashboard_url("127.0.0.1", DEFAULT_PORT, study._study_id)}


def _write_plots(study, tuning_dir: Path) -> dict[str, str]:
    """Optuna's own optimization history and parameter importances (of accuracy), as standalone HTML (plotly);
    {plot: file name in tuning_dir}."""
    import optuna
    from optuna import visualization

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    # A multi-objective study's plots need a target: accuracy, the objective every study has first.
    target = {} if len(study.directions) == 1 else {"target": lambda t: t.values[0], "target_name": "val accuracy"}
    figures = {"history": visualization.plot_optimization_history(study, **target)}
    if len(complete) >= 2 and len(complete[0].params) >= 2:  # importances need variation to explain
        # With a target, Optuna's default evaluator (PED-ANOVA) explains *low* target values, so accuracy goes in
        # negated (Optuna's documented way). fANOVA would need scikit-learn, which Tuneline does not install.
        negated = {"target": lambda t: -t.values[0], "target_name": "val accuracy"} if target else {}
        figures["importance"] = visualization.plot_param_importances(study, **negated)
    for name, figure in figures.items():
        with staged_file(tuning_dir / f"{name}.html") as tmp:
            figure.write_html(str(tmp), include_plotlyjs=True, full_html=True)
    return {name: f"{name}.html" for name in figures}


def apply_best_params(params: Params, best_params_path: Path) -> Params:
    """Params with the tuned values on top (as if given with -S); unchanged when tuning is off."""
    path = Path(best_params_path)
    if not params.tune.enabled or not path.is_file():
        return params
    best = json.loads(path.read_text())
    if not best.get("params"):
        return params
    return with_overrides(params, best["params"], source=str(path))


def tuning_summary(tuning_dir: Path, top: int = 5) -> dict:
    """What the last tune stage found: best params/value, trial states and the top trials (for reports)."""
    best_path, trials_path = Path(tuning_dir) / "best_params.json", Path(tuning_dir) / "trials.csv"
    if not best_path.is_file():
        return {"enabled": False}
    best = json.loads(best_path.read_text())
    rows = list(csv.DictReader(open(trials_path))) if trials_path.is_file() else []
    complete = sorted((r for r in rows if r["state"] == "COMPLETE"), key=lambda r: -float(r["value"]))
    return {"enabled": best.get("enabled", False), "study": best.get("study"), "best_value": best.get("value"),
            "best_params": best.get("params", {}), "states": best.get("states", {}), "top_trials": complete[:top],
            **{key: best[key] for key in ("objectives", "pick", "pareto", "dashboard") if key in best},
            # plots are named relative to the tuning folder (best_params.json is a DVC output: no absolute paths)
            "plots": {name: str(Path(tuning_dir) / file) for name, file in (best.get("plots") or {}).items()}}
