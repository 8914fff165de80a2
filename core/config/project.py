"""project: what this project's models are called (the registry and the server name them so)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from tuneline.core.config.base import ARCHIVE_SUFFIXES, MODEL_NAME_PATTERN, Section, safe_model_name


class ProjectConfig(Section):
    """What this project's models are called in the registry and the server (one champion per name)."""

    name: str | None = Field(None, pattern=f"^{MODEL_NAME_PATTERN}$", description="the registry/server model name; null = the data set's: mnist, the image folder's (or archive's) stem, the user loader's module, data.capture_model for captured traffic")

    def resolve_name(self, data: Any) -> str:
        """The model name: project.name, else derived from the data source (the one place this rule lives)."""
        if self.name:
            return self.name
        source = str(data.source)
        folder = getattr(data, "image_folder", None) or getattr(data, "path", None)
        if source == "imagefolder" and folder:
            derived = Path(str(folder).rstrip("/\\")).name
            for suffix in ARCHIVE_SUFFIXES:
                if derived.lower().endswith(suffix):
                    derived = derived[: -len(suffix)]
                    break
        elif source == "capture" and getattr(data, "capture_model", None):  # retrained on its own live traffic
            derived = data.capture_model
        elif ":" in source:  # a user loader, mypkg.data:load -> mypkg.data
            derived = source.split(":", 1)[0]
        else:
            derived = source
        return safe_model_name(derived)

