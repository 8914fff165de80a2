"""The run summary: one markdown page saying what ran, on which data, with which result.

It is rendered twice from the same facts: the file (paths.summary, links relative to its folder) and the
Prefect artifact (absolute paths, pictures embedded; see `Links`).
"""

from __future__ import annotations

import base64
import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from tuneline.core.registry_layout import RegistryTree
from tuneline.tasks.data.capture import CaptureReport
from tuneline.tasks.evaluate.gate import GateVerdict, markdown_table
from tuneline.tasks.tune.pareto import pareto_markdown

if TYPE_CHECKING:  # the root schema: not a code dep of this stage (core/config/params.py)
    from tuneline.core.config.params import Params
    from tuneline.core.config.paths import ProjectPaths

# A picture larger than this is named, not embedded: the artifact is stored in the Prefect database on every run.
MAX_INLINE_BYTES = 2_000_000


@dataclass(frozen=True)
class Links:
    """How the summary points at files.

    The markdown file (`report_dir` set): links relative to its folder, so they resolve wherever the project
    is opened (an editor's preview, GitHub, a browser on the file), and pictures as relative image links.
    The Prefect artifact (`report_dir` None): the UI is a web page that cannot open local files, so a file is
    named by its path, and a picture is embedded as a data: URI. The UI's markdown renderer draws an image as
    `<img src=…>` with the URL as written, so the picture shows inside the summary itself; an image artifact
    (create_image_artifact) would print its URL under the picture, here the whole base64 text.
    """

    report_dir: Path | None = None

    def _relative(self, path: Path) -> str:
        return Path(os.path.relpath(path.resolve(), Path(self.report_dir).resolve())).as_posix()

    def file(self, path: str | Path, text: str | None = None) -> str:
        """A link to `path` (the path as code where no link would resolve: the artifact, a file not there)."""
        path = Path(path)
        if self.report_dir is None or not path.exists():
            return f"`{path}`"
        relative = self._relative(path)
        return f"[{text or relative}]({quote(relative)})"

    def image(self, path: str | Path, alt: str) -> list[str]:
        """Markdown lines showing the PNG at `path`; none when it is missing."""
        path = Path(path)
        if not path.is_file():
            return []
        if self.report_dir is not None:
            return [f"![{alt}]({quote(self._relative(path))})", ""]
        if path.stat().st_size > MAX_INLINE_BYTES:
            return [f"{alt}: `{path}`", ""]
        return [f"![{alt}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})", ""]


def number(value: float, digits: int = 4) -> str:
    """`digits` significant digits, no trailing zeros: 0.002673375196167578 -> 0.002673."""
    return f"{value:.{digits}g}"


def milliseconds(value: float) -> str:
    """Two or three significant digits, never an exponent: 0.1642 -> 0.164, 12.34 -> 12.3, 1234.5 -> 1234."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def cell(value) -> str:
    """A value as a table cell: floats (also as CSV text) to 4 significant digits; YAML spellings for the rest."""
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            try:
                value = float(value)
            except ValueError:
                return value.replace("|", "\\|")
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, float):
        return number(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {cell(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(cell(v) for v in value) + "]"
    return str(value).replace("|", "\\|")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def _promotion_lines(summary: dict, links: Links) -> list[str]:
    if not summary.get("version"):
        return []
    name, version = summary.get("model_name"), summary["version"]
    lines = [f"- **registry**: version `{version}`" + (f" of `{name}`" if name else "")
             + f", champion `{summary.get('champion')}` — {summary.get('promotion', '')}"]
    if name:
        card = RegistryTree(Path(summary["registry_path"])).model(name).card_path(version)
        lines.append(f"- **model card**: {links.file(card, f'{version}/card.json')}")
    return lines


def capture_lines(raw_dir: Path) -> list[str]:
    """The captured traffic a run trained and was tested on (data.source=capture): how many requests, how many
    labelled, from which model versions; nothing for any other source."""
    report = CaptureReport.read(raw_dir)
    if report is None:
        return []
    return [f"- **captured traffic**: {report.describe()}"]


def _evaluation_lines(summary: dict) -> list[str]:
    lines = []
    if summary.get("macro_f1") is not None:
        lines.append(f"- **macro-F1** {summary['macro_f1']:.4f}, **ECE** {summary['ece']:.4f}")
    serving = summary.get("serving")
    if serving:
        lines.append(f"- **ONNX Runtime** ({serving['provider']}): p50 {milliseconds(serving['latency_p50_ms'])} ms, "
                     f"p99 {milliseconds(serving['latency_p99_ms'])} ms at batch 1; "
                     f"{serving['throughput_images_per_s']:.0f} images/s at batch {serving['throughput_batch']}; "
                     f"model.onnx {serving['size_bytes'] / 1e6:.2f} MB")
    for name, variant in (summary.get("variants") or {}).items():
        lines.append(f"- **{name} variant**: test accuracy {variant['accuracy']:.4f}, drop {variant['drop']:+.4f} "
                     f"vs fp32, {variant['size_bytes'] / 1e6:.2f} MB — {'kept' if variant['kept'] else 'REJECTED'}")
    return lines


# How each training-history column is shown: per-epoch accuracies and losses to 4 decimals, the learning rate to
# 4 significant digits, seconds to 3, throughput whole. A column not listed gets 4 significant digits.
HISTORY_FORMATS = {"epoch": "{:.0f}", "lr": "{:.4g}", "seconds": "{:.3g}", "images_per_s": "{:.0f}"}


def _history_cell(column: str, text: str) -> str:
    try:
        value = float(text)
    except ValueError:
        return text
    if column in HISTORY_FORMATS:
        return HISTORY_FORMATS[column].format(value)
    return f"{value:.4f}" if "loss" in column or "accuracy" in column else number(value)


def _training_lines(history_path: Path, curves_png: Path, links: Links) -> list[str]:
    history = list(csv.DictReader(open(history_path))) if Path(history_path).is_file() else []
    if not history:
        return []
    columns = list(history[0])
    return ["## Training", "", *links.image(curves_png, "loss and accuracy per epoch"),
            *_table(columns, [[_history_cell(c, row[c]) for c in columns] for row in history])]


def _trial_states(states: dict) -> str:
    total = sum(states.values())
    return f"{total} trials" + (": " + ", ".join(f"{n} {s.lower()}" for s, n in states.items()) if states else "")


def _tuning_lines(tuning: dict, links: Links) -> list[str]:
    if not tuning.get("enabled"):
        return ["## Tuning", "", "Off (`tune.enabled=false`): trained with params.yaml as given.", ""]
    used = "picked trial's" if tuning.get("pick") else "best"
    best = ", ".join(f"`{key}` {cell(value)}" for key, value in (tuning.get("best_params") or {}).items())
    lines = ["## Tuning", "",
             f"Study `{tuning['study']}`, {_trial_states(tuning.get('states') or {})}; {used} val accuracy "
             f"{tuning['best_value']:.4f} with {best or 'the values as given'}.", "",
             *tuning_links(tuning, links), *pareto_markdown(tuning)]
    top = tuning.get("top_trials") or []
    if top:
        keys = [k for k in top[0] if k not in ("state", "reason")]
        lines += ["**Top trials** by val accuracy:", "", *_table(keys, [[cell(row[k]) for k in keys] for row in top])]
    return lines


def tuning_links(tuning: dict, links: Links = Links()) -> list[str]:
    """Where to look further: the live dashboard (command and page) and the study's plot files."""
    lines = []
    if tuning.get("dashboard"):
        dashboard = tuning["dashboard"]
        lines.append(f"- **dashboard**: `{dashboard['command']}` serves the study at {dashboard['url']}")
    for name, path in (tuning.get("plots") or {}).items():
        lines.append(f"- **{name} plot**: {links.file(path)}")
    return [*lines, ""] if lines else []


def _params_lines(params: Params, tuned: set[str]) -> list[str]:
    lines = ["## Parameters", "",
             "What the model was trained with: params.yaml, with the tuned values (**bold**) from the study.", ""]
    for section in ("model", "train"):
        rows = []
        for key, value in getattr(params, section).model_dump(mode="json").items():
            dotted = f"{section}.{key}"
            was_tuned = any(t == dotted or t.startswith(dotted + ".") for t in tuned)
            rows.append([f"`{key}`", f"**{cell(value)}** (tuned)" if was_tuned else cell(value)])
        lines += [f"**{section}**", "", *_table(["key", "value"], rows)]
    return lines


def render_summary(params: Params, summary: dict, verdicts: list[GateVerdict], paths: ProjectPaths, pushed: str,
                   inline_images: bool = False) -> str:
    """Markdown for paths.summary (links relative to its folder) or, with `inline_images`, for the Prefect
    artifact (pictures embedded, files named by their paths)."""
    links = Links() if inline_images else Links(Path(paths.summary).parent)
    tuning = summary.get("tuning") or {}
    confusion = links.image(paths.confusion_png, "confusion matrix: rows actual, columns predicted")
    lines = [
        "# Tuneline run",
        "",
        f"- **test accuracy**: {summary['accuracy']:.4f} — gates {'passed' if summary['gates_passed'] else 'FAILED'}",
        f"- **data version** (DVC md5 of `{params.paths.raw}`): `{summary['data_version']}`",
        *capture_lines(paths.raw),
        f"- **params hash**: `{summary['params_hash']}` — **git commit**: `{summary['git_commit']}`",
        f"- **ONNX model**: {links.file(summary['onnx_path'])}",
        "- **stages**: " + ", ".join(f"{k} {v}" for k, v in summary["stages"].items()),
        *([f"- **experiment**: `{summary['experiment']}` (a run with overrides, in its own workspace: `dvc exp "
           f"show` lists it, `dvc exp apply {summary['experiment']}` applies it to the checkout)"]
          if summary.get("experiment") else []),
        f"- {pushed}",
        *_promotion_lines(summary, links),
        *_evaluation_lines(summary),
        "",
        "## Gates",
        "",
        markdown_table(verdicts),
        "",
        *(["## Confusion matrix (test set)", "", *confusion] if confusion else []),
        *_training_lines(paths.history, paths.train_curves_png, links),
        *_tuning_lines(tuning, links),
        *_params_lines(params, set(tuning.get("best_params") or {}) if tuning.get("enabled") else set()),
    ]
    return "\n".join(lines).rstrip("\n") + "\n"
