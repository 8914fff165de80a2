"""params.yaml's comments and docs/configuration.md's knob table, generated from core/config/.

The typed config is the one place a default and its description live. `tuneline config-docs` rewrites
params.yaml (keeping the project's values, with each key's description as its comment, in the config's
order) and the table between the `<!-- knobs:begin -->` / `<!-- knobs:end -->` markers of
docs/configuration.md; `tuneline config-docs --check` and the test suite fail when either is stale.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from tuneline.flows.environment import VARIABLES
from tuneline.core.atomic import write_bytes_atomic
from tuneline.core.config.params import Params, read_params_file

DOC_FILE = "docs/configuration.md"
BEGIN, END = "<!-- knobs:begin -->", "<!-- knobs:end -->"
COMMENT_COLUMN = 32

PARAMS_HEADER = """\
# GENERATED comments: each key's description comes from core/config/ (`tuneline config-docs` rewrites
# them; the values are this project's choices). One section per stage. `tuneline run -S train.lr=0.01`
# and the Prefect flow's `overrides` parameter override these keys; dvc.yaml templates its paths from `paths`.
"""


def _scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _section_doc(model: type[BaseModel]) -> str:
    doc = inspect.getdoc(model) or ""
    return "" if doc == inspect.getdoc(BaseModel) or doc.startswith("!!! abstract") else doc


def _line(indent: str, key: str, value: str, comment: str) -> str:
    text = f"{indent}{key}: {value}"
    return f"{text.ljust(COMMENT_COLUMN - 1)} # {comment}" if comment else text


def render_params(values: dict[str, Any]) -> str:
    """params.yaml text: `values` (plain data, as read from the file), defaults where a key is missing."""
    params = Params.model_validate(values)  # fails on a bad file before anything is written
    data = params.model_dump(mode="json")
    out = [PARAMS_HEADER.rstrip("\n")]
    for section, field in Params.model_fields.items():
        model = field.annotation
        doc = _section_doc(model)
        out.append("")
        out.extend(f"# {line}" if line else "#" for line in doc.splitlines())
        out.append(f"{section}:")
        for key, sub in model.model_fields.items():
            value = data[section][key]
            if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
                # tune.space: one flow-style mapping per dimension
                out.append(_line("  ", key, "", sub.description or ""))
                for name, dim in value.items():
                    shown = {k: v for k, v in dim.items() if v not in (None, False)}
                    out.append(f"    {name}: {_scalar(shown)}")
            else:
                out.append(_line("  ", key, _scalar(value), sub.description or ""))
    return "\n".join(out) + "\n"


def _default(field) -> str:
    if field.default_factory is not None:
        return "(see params.yaml)"
    return f"`{_scalar(field.default)}`"


def render_knob_table() -> str:
    """Markdown: one table per section, every key with its default and description."""
    out = []
    for section, field in Params.model_fields.items():
        model = field.annotation
        out += ["", f"### `{section}`", ""]
        if doc := _section_doc(model):
            out += [doc.replace("\n", " "), ""]
        out += ["| key | default | description |", "|---|---|---|"]
        for key, sub in model.model_fields.items():
            description = (sub.description or "").replace("|", "\\|")
            out.append(f"| `{section}.{key}` | {_default(sub).replace('|', chr(92) + '|')} | {description} |")
    out += ["", "### Environment variables", "", "Read once, at the entry points (flows/environment.py); stage code "
            "never reads the environment.", "", "| variable | meaning |", "|---|---|"]
    out += [f"| `{var.name}` | {var.meaning} |" for var in VARIABLES]
    return "\n".join(out) + "\n"


def _doc_with_table(text: str, path: Path) -> str:
    if BEGIN not in text or END not in text:
        from tuneline.core.config.base import ConfigError

        raise ConfigError(f"{path}: the markers {BEGIN} and {END} are missing: put them where the knob table goes")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{render_knob_table()}{END}{tail}"


def _wanted(root: Path) -> dict[Path, str]:
    root = Path(root)
    wanted = {root / "params.yaml": render_params(read_params_file(root / "params.yaml"))}
    doc = root / DOC_FILE
    if doc.is_file():
        wanted[doc] = _doc_with_table(doc.read_text(), doc)
    return wanted


def stale_files(root: Path) -> list[Path]:
    return [path for path, text in _wanted(root).items() if path.read_text() != text]


def write(root: Path) -> list[Path]:
    written = []
    for path, text in _wanted(root).items():
        if path.read_text() != text:
            write_bytes_atomic(path, text.encode())
            written.append(path)
    return written
