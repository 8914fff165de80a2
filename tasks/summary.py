"""The run summary: one markdown page saying what ran, on which data, with which result."""

from __future__ import annotations

import csv
from pathlib import Path

from tasks.config import Params
from tasks.gate import GateVerdict, markdown_table


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
        f"- **stages**: " + ", ".join(f"{k} {v}" for k, v in summary["stages"].items()),
        f"- {pushed}",
        "",
        "## Gates",
        "",
        markdown_table(verdicts),
        "",
        "## Parameters",
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
