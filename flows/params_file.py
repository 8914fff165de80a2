"""Writing overrides back into params.yaml, keeping its comments and layout (as `dvc exp run -S` does)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from tuneline.core.atomic import write_bytes_atomic


def write_overrides(params_path: Path, overrides: dict[str, Any]) -> None:
    """Set each dotted key in params.yaml (already validated by tuneline.core.config) and replace the file atomically."""
    yaml = YAML()  # round-trip mode: comments and key order survive
    yaml.preserve_quotes = True
    document = yaml.load(params_path.read_text())
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        document.setdefault(section, {})[name] = value
    buffer = io.StringIO()
    yaml.dump(document, buffer)
    write_bytes_atomic(params_path, buffer.getvalue().encode())
