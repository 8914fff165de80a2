"""A multi-objective study's result: its Pareto front (table and plot) and the rule that picks the trial train uses.

tune.objectives = [accuracy, latency_p99_ms and/or size_mb] makes the study multi-objective: no single best, but a
front of trials none of which is both more accurate and cheaper than another. tune.pick chooses one:

- most_accurate_within_gates (the default): the most accurate front trial whose measured costs are within the
  serving gates the export stage will apply (gate.max_latency_p99_ms, gate.max_size_mb; only the costs that are
  objectives are checked); ties go to the cheaper. None within: NoTrialWithinGates, a one-line error — the model
  train would build would fail the export gate anyway.
- most_accurate: the most accurate front trial, whatever its cost.
"""

from __future__ import annotations

from pathlib import Path

from tuneline.core.atomic import staged_file
from tuneline.core.config.gate import GateConfig
from tuneline.core.config.tune import TuneConfig
from tuneline.core.errors import StageFailed

PARETO_PLOT = "pareto.html"
# objective -> (the gate that bounds it, the gate's key in params.yaml)
GATES = {"latency_p99_ms": ("max_latency_p99_ms", "gate.max_latency_p99_ms"), "size_mb": ("max_size_mb", "gate.max_size_mb")}


class NoTrialWithinGates(StageFailed, RuntimeError):
    """tune.pick=most_accurate_within_gates and no Pareto trial is within the serving gates."""


def front_rows(study, objectives: list[str]) -> list[dict]:
    """The non-dominated COMPLETE trials, most accurate first: number, one column per objective, then params."""
    rows = [{"number": t.number, **dict(zip(objectives, t.values)), **t.params} for t in study.best_trials]
    return sorted(rows, key=front_order(objectives))


def front_order(objectives: list[str]):
    """Sort key: accuracy descending, then each cost ascending."""
    return lambda row: (-row["accuracy"], *(row[name] for name in objectives[1:]))


def over_gates(row: dict, objectives: list[str], gate: GateConfig) -> list[str]:
    """The gates `row` is over, e.g. ['latency_p99_ms 61.2 > gate.max_latency_p99_ms 50']; empty: within all."""
    over = []
    for name in objectives[1:]:
        field, key = GATES[name]
        if row[name] > getattr(gate, field):
            over.append(f"{name} {row[name]:g} > {key} {getattr(gate, field):g}")
    return over


def pick_trial(front: list[dict], cfg: TuneConfig, gate: GateConfig, study_name: str) -> dict:
    """{"rule", "trial", "why"} for the front trial tune.pick chooses (front sorted by front_order)."""
    objectives = cfg.objectives
    costs = ", ".join(f"{name} {front[0][name]:g}" for name in objectives[1:])
    if cfg.pick == "most_accurate":
        return {"rule": cfg.pick, "trial": front[0]["number"],
                "why": f"most accurate of the {len(front)} Pareto trials (val accuracy {front[0]['accuracy']:.4f}, {costs})"}
    within = [row for row in front if not over_gates(row, objectives, gate)]
    if not within:
        cheapest = min(front, key=lambda row: tuple(row[name] for name in objectives[1:]))
        raise NoTrialWithinGates(
            f"tune: study {study_name}: none of its {len(front)} Pareto trials is within the serving gates (the "
            f"cheapest, trial {cheapest['number']}: {'; '.join(over_gates(cheapest, objectives, gate))}); search "
            "cheaper models in tune.space, raise the gate, or set tune.pick=most_accurate")
    chosen = within[0]
    skipped = front.index(chosen)
    costs = ", ".join(f"{name} {chosen[name]:g}" for name in objectives[1:])
    gates = ", ".join(f"{GATES[name][1]} {getattr(gate, GATES[name][0]):g}" for name in objectives[1:])
    return {"rule": cfg.pick, "trial": chosen["number"],
            "why": f"most accurate Pareto trial within the serving gates ({gates}): val accuracy {chosen['accuracy']:.4f}, "
                   f"{costs}" + (f"; {skipped} more accurate Pareto trials are over a gate" if skipped else "")}


def write_pareto_plot(study, cfg: TuneConfig, tuning_dir: Path) -> Path:
    """Optuna's Pareto-front plot (2 or 3 objectives) as one self-contained HTML file (plotly inlined)."""
    from optuna import visualization

    figure = visualization.plot_pareto_front(study, target_names=["val accuracy", *cfg.objectives[1:]])
    path = Path(tuning_dir) / PARETO_PLOT
    with staged_file(path) as tmp:
        figure.write_html(str(tmp), include_plotlyjs=True, full_html=True)
    return path


def pareto_markdown(tuning: dict) -> list[str]:
    """Markdown lines for a multi-objective tuning summary (tasks/tune/results.tuning_summary): the pick and the
    front as a table; empty for a single-objective study."""
    front, pick = tuning.get("pareto") or [], tuning.get("pick") or {}
    if not front:
        return []
    objectives = tuning.get("objectives") or ["accuracy"]
    keys = ["number", *objectives, *sorted({k for row in front for k in row} - {"number", *objectives})]
    lines = [f"**Pareto front** of objectives {objectives}: {len(front)} trials, none beaten on every objective by "
             f"another. Train uses trial {pick.get('trial')} (`tune.pick={pick.get('rule')}`): {pick.get('why')}.", "",
             "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in front:
        mark = " ←" if row["number"] == pick.get("trial") else ""
        lines.append("| " + " | ".join(_cell(row.get(k)) + (mark if k == "number" else "") for k in keys) + " |")
    return [*lines, ""]


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
