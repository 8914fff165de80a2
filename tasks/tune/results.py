"""What the tune stage found and its files: TuneResult, trials.csv, best_params.json, plots, and their readers."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.atomic import staged_file, write_bytes_atomic
from tasks.config import Params, TuneConfig, build_params

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


def write_disabled(tuning_dir: Path) -> TuneResult:
    """tune.enabled=false: best_params.json says so (no params) and trials.csv has only its header."""
    best_path = tuning_dir / "best_params.json"
    write_bytes_atomic(best_path, (json.dumps({"format": BEST_FORMAT, "enabled": False, "params": {}}, indent=2) + "\n").encode())
    write_trials_csv(tuning_dir / "trials.csv", [], [])
    return TuneResult("", {}, None, {}, best_path, tuning_dir / "trials.csv", [])


def _trial_rows(study) -> tuple[list[dict], list[str]]:
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
        rows.append({"number": t.number, "state": t.state.name, "value": t.value,
                     "duration_s": round(duration, 2) if duration is not None else None,
                     "epochs_run": t.user_attrs.get("epochs_run", len(t.intermediate_values)),
                     "reason": reason, "worker": t.user_attrs.get("worker", ""),
                     **{k: t.params.get(k) for k in keys}})
    return rows, keys


def write_trials_table(study, tuning_dir: Path) -> None:
    """trials.csv alone (a study that stopped on its failures has no best to write)."""
    rows, keys = _trial_rows(study)
    write_trials_csv(Path(tuning_dir) / "trials.csv", rows, keys)


def write_trials_csv(path: Path, rows: list[dict], keys: list[str]) -> None:
    """One row per trial: number, state, value, duration, epochs run, failure reason, worker, then its params."""
    fields = ["number", "state", "value", "duration_s", "epochs_run", "reason", "worker", *keys]
    with staged_file(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def write_results(study, cfg: TuneConfig, tuning_dir: Path, seconds: float, stopped: str | None = None) -> TuneResult:
    """trials.csv, best_params.json and the plots for `study`; a RuntimeError when no trial completed."""
    import optuna

    rows, keys = _trial_rows(study)
    write_trials_csv(tuning_dir / "trials.csv", rows, keys)
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
               "value": best.value, "params": best.params, "states": states, "seconds": round(seconds, 1),
               "stopped": stopped}
    write_bytes_atomic(tuning_dir / "best_params.json", (json.dumps(payload, indent=2) + "\n").encode())
    _write_plots(study, tuning_dir, len(complete))
    log.info("tune: study %s: best val_accuracy %.4f (trial %d) %s; trials %s", study.study_name, best.value,
             best.number, best.params, states)
    return TuneResult(study.study_name, best.params, best.value, states, tuning_dir / "best_params.json",
                      tuning_dir / "trials.csv", top, stopped)


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
