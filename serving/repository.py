"""Read-only view of the model registry, with the server's own checksum verification.

Layout (written by tasks/ship/registry.py; this module never writes):

    <registry>/versions/<version>/model.onnx, card.json   version ids v0001, v0002, …; a folder appears whole
    <registry>/aliases/champion.json                       {"version": "v0003", "previous": [...], "updated": ...}

The bytes that pass the sha256 check are the bytes handed to ONNX Runtime, so a file swapped between the
check and the load cannot slip through.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from serving.errors import LoadError, NotFound

VERSION_ID = re.compile(r"^v\d+$")  # also keeps "..", "/" and staging folders out of every path built here


@dataclass(frozen=True)
class VerifiedModel:
    version: str
    card: dict
    filename: str
    data: bytes  # the model file, checked against the card's sha256 and size


class Registry:
    def __init__(self, root: Path):
        self.root = Path(root)

    def versions(self) -> list[str]:
        """Version ids present, oldest first."""
        folder = self.root / "versions"
        if not folder.is_dir():
            return []
        return sorted((p.name for p in folder.iterdir() if VERSION_ID.match(p.name) and p.is_dir()),
                      key=lambda v: int(v[1:]))

    def alias_path(self, alias: str) -> Path:
        return self.root / "aliases" / f"{alias}.json"

    def alias_signature(self, alias: str) -> tuple[int, int, int] | None:
        """(mtime_ns, size, inode) of the alias file, None if absent: cheap change detection for polling."""
        try:
            st = os.stat(self.alias_path(alias))
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def alias_version(self, alias: str) -> str | None:
        """The version an alias points to; None if the alias does not exist; LoadError if the file is corrupt."""
        path = self.alias_path(alias)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise LoadError(f"{path}: unreadable alias file ({exc})", reason="alias") from None
        version = data.get("version") if isinstance(data, dict) else None
        if not isinstance(version, str) or not VERSION_ID.match(version):
            raise LoadError(f"{path}: expected {{\"version\": \"v0001\", ...}}, got {str(data)[:80]!r}", reason="alias")
        return version

    def card(self, version: str) -> dict:
        """The version's card.json; NotFound if the version does not exist, LoadError if the card is corrupt."""
        folder = self._folder(version)
        path = folder / "card.json"
        try:
            card = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise LoadError(f"{path}: unreadable model card ({exc})", reason="card") from None
        if not isinstance(card, dict) or not isinstance(card.get("files"), dict):
            raise LoadError(f"{path}: model card lacks a 'files' table", reason="card")
        return card

    def read_verified(self, version: str, filename: str) -> VerifiedModel:
        """The model file's bytes, after checking size and sha256 against the card."""
        card = self.card(version)
        entry = card["files"].get(filename)
        if not isinstance(entry, dict) or "sha256" not in entry:
            raise LoadError(f"{version}: card.json lists no {filename!r} (has {sorted(card['files'])}); "
                            "set serve.model_file to one of them", reason="missing")
        path = self._folder(version) / filename
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

    def _folder(self, version: str) -> Path:
        folder = self.root / "versions" / version
        if not VERSION_ID.match(version) or not folder.is_dir():
            raise NotFound(f"model version {version!r} is not in the registry {self.root} "
                           f"(versions: {', '.join(self.versions()) or 'none'})")
        return folder
