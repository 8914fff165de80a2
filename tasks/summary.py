"""The run summary: one markdown page saying what ran, on which data, with which result."""

from __future__ import annotations

from typing import TYPE_CHECKING

import csv
from pathlib import Path

from tuneline.tasks.evaluate.gate import GateVerdict, markdown_table
from tuneline.tasks.tune.pareto import pareto_markdown

if TYPE_CHECKING:  # the root schema: not a code dep of this stage (core/config/params.py)
    from tuneline.core.config.params import Params


def _promotion_lines(summary: dict) -> list[str]:
    if not summary.get("version"):
        return []
    return [f"- **registry** (`{summary.get('registry_path', '')}`): version `{summary['version']}`, champion "
            f"`{summary.get('champion')}` — {summary.get('promotion', '')}",
            f"- **model card**: `{summary['registry_path']}/versions/{summary['version']}/card.json`"]


def _evaluation_lines(summary: dict) -> list[str]:
    lines = []
    if summary.get("macro_f1") is not None:
        lines.append(f"- **macro-F1** {summary['macro_f1']:.4f}, **ECE** {summary['ece']:.4f}")
    serving = summary.get("serving")
    if serving:
        lines.append(f"- **ONNX Runtime** ({serving['provider']}): p50 {serving['latency_p50_ms']:.3f} ms, p99 "
                     f"{serving['latency_p99_ms']:.3f} ms at batch 1; {serving['throughput_images_per_s']:.0f} images/s "
                     f"at batch {serving['throughput_batch']}; model.onnx {serving['size_bytes'] / 1e6:.2f} MB")
    for name, variant in (summary.get("variants") or {}).items():
        lines.append(f"- **{name} variant**: test accuracy {variant['accuracy']:.4f}, drop {variant['drop']:+.4f} vs fp32, "
                     f"{variant['size_bytes'] / 1e6:.2f} MB — {'kept' if variant['kept'] else 'REJECTED'}")
    return lines


def _tuning_lines(tuning: dict) -> list[str]:
    if not tuning.get("enabled"):
        return ["## Tuning", "", "Off (`tune.enabled=false`): trained with params.yaml as given.", ""]
    used = "picked trial's" if tuning.get("pick") else "best"
    lines = ["## Tuning", "",
             f"Study `{tuning['study']}`: trials {tuning['states']}; {used} val accuracy {tuning['best_value']:.4f} "
             f"with `{tuning['best_params']}`.", "", *tuning_links(tuning), *pareto_markdown(tuning)]
    top = tuning.get("top_trials") or []
    if top:
        keys = [k for k in top[0] if k not in ("state", "reason")]
        lines += ["**Top trials** by val accuracy:", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(str(row[k]) for k in keys) + " |" for row in top]
        lines.append("")
    return lines


def tuning_links(tuning: dict) -> list[str]:
    """Where to look further: the live dashboard (command and page) and the Pareto plot file."""
    lines = []
    if tuning.get("dashboard"):
        lines.append(f"- **dashboard**: `{tuning['dashboard']['command']}` serves the study at {tuning['dashboard']['url']}")
    for name, path in (tuning.get("plots") or {}).items():
        lines.append(f"- **{name} plot**: [{path}]({Path(path).resolve().as_uri()})")
    return [*lines, ""] if lines else []


def render_summary(params: Params, summary: dict, verdicts: list[GateVerdict], history_path: Path, pushed: str) -> str:
    """Markdown for the Prefect artifact and reports/run_summary.md."""
    history = list(csv.DictReader(open(history_path))) if Path(history_path).is_file() else []
    lines = [
        "# Tuneline run",
        "",
        f"- **test accuracy**: {summary['accuracy']:.4f} — gates {'passed' if summary['gates_passed'] else 'FAILED'}",
        f"- **data version** (DVC md5 of `{params.paths.raw}`): `{summary['data_version']}`",
        f"- **params hash**: `{summary['params_hash']}` — **git commit**: `{summary['git_commit']}`",
        f"- **ONNX model**: `{summary['onnx_path']}`",
        "- **stages**: " + ", ".join(f"{k} {v}" for k, v in summary["stages"].items()),
        *([f"- **experiment**: `{summary['experiment']}` (a run with overrides, in its own workspace: `dvc exp "
           f"show` lists it, `dvc exp apply {summary['experiment']}` applies it to the checkout)"]
          if summary.get("experiment") else []),
        f"- {pushed}",
        *_promotion_lines(summary),
        *_evaluation_lines(summary),
        "",
        "## Gates",
        "",
        markdown_table(verdicts),
        "",
        *_tuning_lines(summary.get("tuning") or {}),
        "## Parameters (effective: params.yaml + tuned values)",
        "",
        f"`model`: {params.model.model_dump()}",
        "",
        f"`train`: {params.train.model_dump()}",
        "",
    ]
    if history:
        lines += ["## Training history", "", "| " + " | ".join(history[0]) + " |", "|" + "---|" * len(history[0])]
        lines += ["| " + " | ".join(row.values()) + " |" for row in history]
    return "\n".join(lines) + "\n"
