"""What every params section shares: strict validation, the one-line ConfigError, model names, the params hash.

The schema is one module per section (core/config/<section>.py) so that a stage's code deps cover the
sections it reads and nothing else: editing a server-only field reruns no stage (flows/code_deps.py).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict

from tuneline.core.errors import InputError


class ConfigError(InputError, ValueError):
    """A params file or an override is invalid; the message is one line that says what to fix."""


class Section(BaseModel):
    # Unknown keys are errors, and values are not silently coerced across types (e.g. "abc" -> lr).
    model_config = ConfigDict(extra="forbid", frozen=True)



MODEL_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"  # a registry folder and a URL path segment: no "/", no ".."
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")


def safe_model_name(text: str) -> str:
    """`text` made a valid model name: characters outside [A-Za-z0-9._-] become "-" ("model" if nothing is left)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", text).lstrip("._-")[:64]
    return cleaned or "model"



# Sections that shape no model: its name, where files go, how the server runs it, and what watches the server.
NOT_IN_PARAMS_HASH = frozenset({"project", "paths", "serve", "watch"})


def params_hash(params: BaseModel) -> str:
    """Short sha256 of everything that shapes the model (its name, paths and serving settings change nothing in it)."""
    payload: dict[str, Any] = params.model_dump(mode="json", exclude=set(NOT_IN_PARAMS_HASH))
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
