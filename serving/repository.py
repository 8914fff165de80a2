"""Read-only view of the model registry (every model name in it), with the server's own checksum verification.

The layout (models, folders, version ids, card and alias files) is core/registry_layout.py, shared with
the registry's only writer, tasks/ship/registry.py; this module never writes. A registry in the old
single-model layout is read as the model its cards name, and keeps being read correctly while the writer
moves it under models/<name>/ (each path is resolved afresh on every call).

The bytes that pass the sha256 check are the bytes handed to ONNX Runtime, so a file swapped between the
check and the load cannot slip through.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from tuneline.serving.errors import LoadError, NotFound
from tuneline.core.registry_layout import LayoutError, RegistryLayout, RegistryTree


@dataclass(frozen=True)
class VerifiedModel:
    version: str
    card: dict
    filename: str
    data: bytes  # the model file, checked against the card's sha256 and size


def model_names(root: Path) -> list[str]:
    """Every model name in the registry folder, sorted (none when the folder does not exist yet)."""
    return RegistryTree(Path(root)).names()


class RegistryReader:
    """One model of a registry folder, read only: versions, aliases, cards and checksum-verified model bytes."""

    def __init__(self, root: Path, name: str | None = None):
        """`name` None: the registry's only model (an error when it holds several)."""
        self.root, self._name = Path(root), name
        self.tree = RegistryTree(self.root)

    @property
    def name(self) -> str:
        if self._name is not None:
            return self._name
        names = self.tree.names()
        if len(names) > 1:
            raise NotFound(f"registry {self.root} holds several models ({', '.join(names)}): name one")
        return names[0] if names else "model"

    @property
    def layout(self) -> RegistryLayout:
        return self.tree.model(self.name)

    def versions(self) -> list[str]:
        """Version ids present, oldest first."""
        return self.layout.versions()

    def alias_path(self, alias: str) -> Path:
        return self.layout.alias_path(alias)

    def alias_signature(self, alias: str) -> tuple[int, int, int] | None:
        """(mtime_ns, size, inode) of the alias file, None if absent: cheap change detection for polling."""
        try:
            st = os.stat(self.alias_path(alias))
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def alias_version(self, alias: str) -> str | None:
        """The version an alias points to; None if the alias does not exist; LoadError if the file is corrupt."""
        try:
            record = self.layout.read_alias(alias)
        except LayoutError as exc:
            raise LoadError(str(exc), reason="alias") from None
        return None if record is None else record["version"]

    def card(self, version: str) -> dict:
        """The version's card.json; NotFound if the version does not exist, LoadError if the card is corrupt."""
        self._check_exists(version)
        try:
            return self.layout.read_card(version)
        except LayoutError as exc:
            raise LoadError(str(exc), reason="card") from None

    def read_verified(self, version: str, filename: str) -> VerifiedModel:
        """The model file's bytes, after checking size and sha256 against the card."""
        card = self.card(version)
        entry = card["files"].get(filename)
        if not isinstance(entry, dict) or "sha256" not in entry:
            raise LoadError(f"{version}: card.json lists no {filename!r} (has {sorted(card['files'])}); "
                            "set serve.model_file to one of them", reason="missing")
        path = self.layout.version_dir(version) / filename
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise LoadError(f"{path}: cannot read ({exc.strerror})", reason="missing") from None
        if "bytes" in entry and len(data) != entry["bytes"]:
            raise LoadError(f"{path}: {len(data)} bytes, card.json says {entry['bytes']}: the file is truncated or "
                            "replaced; re-register the version", reason="checksum")
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"]:
            raise LoadError(f"{path}: sha256 {digest[:12]}… does not match card.json ({str(entry['sha256'])[:12]}…): "
                            "the file is corrupt or replaced; re-register the version", reason="checksum")
        return VerifiedModel(version=version, card=card, filename=filename, data=data)

    def _check_exists(self, version: str) -> None:
        if not self.layout.has_version(version):
            raise NotFound(f"model {self.name!r} has no version {version!r} in the registry {self.root} "
                           f"(versions: {', '.join(self.versions()) or 'none'})")
