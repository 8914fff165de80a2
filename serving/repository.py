"""The server's view of the model registry: core/registry_reader.py's reader (read only, checksum-verified bytes),
with its refusals turned into HTTP answers here and nowhere else.

    not_found, ambiguous                 -> NotFound (404): no such version, or several models and none named
    alias, card, missing, checksum       -> LoadError (400), its reason the metric's label
"""

from __future__ import annotations

from tuneline.core import registry_reader
from tuneline.core.registry_reader import RegistryReadError, VerifiedModel, model_names
from tuneline.serving.errors import LoadError, NotFound, ServingError

__all__ = ["RegistryReader", "VerifiedModel", "model_names", "served_error"]


def served_error(error: RegistryReadError) -> ServingError:
    """The serving error (and so the HTTP status) for a registry refusal."""
    if error.reason in ("not_found", "ambiguous"):
        return NotFound(str(error))
    return LoadError(str(error), reason=error.reason)


class RegistryReader(registry_reader.RegistryReader):
    """One model of a registry folder, read only; raises NotFound / LoadError."""

    def translate(self, error: RegistryReadError) -> Exception:
        return served_error(error)
