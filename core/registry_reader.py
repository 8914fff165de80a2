"""The one reader of the model registry: model names, versions, aliases, cards, and a model file's bytes checked
against its card. The pipeline's writer (tasks/ship/registry.py) and the server (serving/repository.py) both read
through it; the folders and files are core/registry_layout.py's.

Reads take no lock: every write is a rename, so a reader sees a file whole or not at all. Paths are resolved
afresh on every call, so a registry of the old single-model layout keeps reading right while the writer moves
it under models/<name>/.

Every refusal is a RegistryReadError with a `reason` (REASONS). Each side turns it into its own error in one
place, by overriding `RegistryReader.translate`: the pipeline's RegistryError, the server's NotFound (404) or
LoadError (400).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from tuneline.core.errors import InputError
from tuneline.core.registry_layout import (ALIASES, EventLog, LayoutError, RegistryLayout, RegistryTree, check_model_name,
                                           read_events)

# not_found: no such version, or an alias not set; ambiguous: several models and none named; alias: an unknown
# alias name or an unreadable alias file; card: an unreadable card; missing: a file the card lists (or that was
# asked for) is not there; checksum: a file's size or sha256 differs from its card's.
REASONS = ("not_found", "ambiguous", "alias", "card", "missing", "checksum")
RESTORE = "restore the registry (`dvc checkout`) or register the version again"


class RegistryReadError(InputError):
    """The registry cannot give what was asked; `reason` is one of REASONS, the message names the file."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class VerifiedModel:
    version: str
    card: dict
    filename: str
    data: bytes  # the file's bytes, the very ones whose size and sha256 matched the card


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_names(root: Path) -> list[str]:
    """Every model name in the registry folder, sorted (an old single-model registry's included; none when the
    folder does not exist yet)."""
    return RegistryTree(Path(root)).names()


def registry_events(root: Path, name: str | None = None) -> EventLog:
    """The registry's alias moves, oldest first (only model `name`'s when given): its events.jsonl read back."""
    log = read_events(RegistryTree(Path(root)).events_path)
    if name is None:
        return log
    return EventLog([event for event in log.events if event.model == name], log.skipped)


class RegistryReader:
    """One model of a registry folder, read only: versions, aliases, cards and checksum-verified files."""

    def __init__(self, root: Path, name: str | None = None):
        """`name` None: the registry's only model (an error when it holds several)."""
        self.root = Path(root)
        self.tree = RegistryTree(self.root)
        self.named = check_model_name(name) if name is not None else None  # ValueError for "../x"

    def translate(self, error: RegistryReadError) -> Exception:
        """The exception raised for `error`. Override this one method to raise your own type."""
        return error

    def _fail(self, message: str, reason: str) -> NoReturn:
        raise self.translate(RegistryReadError(message, reason)) from None

    @property
    def name(self) -> str | None:
        """This model's name; unnamed, the registry's only model (None while the registry is empty)."""
        if self.named is not None:
            return self.named
        names = self.tree.names()
        if len(names) > 1:
            self._fail(f"registry {self.root} holds several models ({', '.join(names)}): name one "
                       "(--name, project.name, serve.model)", "ambiguous")
        return names[0] if names else None

    @property
    def layout(self) -> RegistryLayout:
        """This model's folders (the old top-level layout until the writer migrates it)."""
        name = self.name
        if name is None:  # an empty registry, unnamed: a folder no model name can be, so nothing is found
            return RegistryLayout(self.tree.models_dir / ".none")
        return self.tree.model(name)

    # ----- versions and cards ------------------------------------------------------------------------------

    def versions(self) -> list[str]:
        """Version ids in registration order (staging folders and anything else are ignored)."""
        return self.layout.versions()

    def card(self, version: str) -> dict:
        """The version's card.json (not_found: no such version; card: unreadable)."""
        if not self.layout.has_version(version):  # also refuses "../x", "latest": no path is built from them
            known = ", ".join(self.versions()) or "none yet"
            self._fail(f"registry {self.root}: model {self.name!r} has no version {version!r} (versions: {known})",
                       "not_found")
        try:
            return self.layout.read_card(version)
        except LayoutError as exc:
            self._fail(f"{exc}: {RESTORE}", "card")

    # ----- aliases -----------------------------------------------------------------------------------------

    def alias_path(self, alias: str) -> Path:
        if alias not in ALIASES:
            self._fail(f"unknown alias {alias!r}: choose one of {', '.join(ALIASES)}", "alias")
        return self.layout.alias_path(alias)

    def alias(self, alias: str) -> dict | None:
        """The alias record ({"version", "previous", "updated"}), None when the alias was never set."""
        self.alias_path(alias)  # refuses an unknown alias name
        try:
            return self.layout.read_alias(alias)
        except LayoutError as exc:
            self._fail(f"{exc}: restore it (`dvc checkout`) or promote again", "alias")

    def alias_version(self, alias: str) -> str | None:
        """The version an alias names; None when it was never set."""
        record = self.alias(alias)
        return None if record is None else record["version"]

    def alias_signature(self, alias: str) -> tuple[int, int, int] | None:
        """(mtime_ns, size, inode) of the alias file, None if absent: cheap change detection for polling."""
        try:
            st = os.stat(self.alias_path(alias))
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def aliases_of(self, version: str) -> list[str]:
        return [alias for alias in ALIASES if self.alias_version(alias) == version]

    def resolve(self, ref: str) -> str:
        """A version id from a version id or an alias name (not_found when neither exists)."""
        if ref in ALIASES:
            version = self.alias_version(ref)
            if version is None:
                self._fail(f"registry {self.root}: alias {ref!r} of model {self.name!r} is not set: promote a "
                           "version first", "not_found")
            return version
        self.card(ref)  # not_found, with the list of versions
        return ref

    # ----- checksums ---------------------------------------------------------------------------------------

    def read_verified(self, version: str, filename: str) -> VerifiedModel:
        """A file's bytes, read once and checked against the card's size and sha256: hand these very bytes to
        whatever loads the model, so a file swapped after the check cannot slip through."""
        card = self.card(version)
        entry = self._entry(version, card, filename)
        path = self.layout.version_dir(version) / filename
        try:
            data = path.read_bytes()
        except OSError as exc:
            self._fail(f"{path}: listed in {version}/card.json but cannot be read ({exc.strerror}): {RESTORE}",
                       "missing")
        self._compare(path, entry, len(data), hashlib.sha256(data).hexdigest())
        return VerifiedModel(version=version, card=card, filename=filename, data=data)

    def verify(self, version: str) -> dict:
        """Check every file the version's card lists (there, size, sha256), hashing as it reads; the card."""
        card = self.card(version)
        folder = self.layout.version_dir(version)
        for filename in card["files"]:
            entry = self._entry(version, card, filename)
            path = folder / filename
            if not path.is_file():
                self._fail(f"{path}: missing but listed in {version}/card.json: {RESTORE}", "missing")
            self._compare(path, entry, path.stat().st_size, sha256_file(path))
        return card

    def _entry(self, version: str, card: dict, filename: str) -> dict:
        entry = card["files"].get(filename)
        if entry is None:
            self._fail(f"registry {self.root}: {self.name} {version}: card.json lists no {filename!r} (it has "
                       f"{', '.join(sorted(card['files'])) or 'none'}): ask for one of those", "missing")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            self._fail(f"{self.layout.card_path(version)}: the entry of {filename!r} has no sha256: {RESTORE}",
                       "card")
        return entry

    def _compare(self, path: Path, entry: dict, size: int, digest: str) -> None:
        wrong = []
        if digest != entry["sha256"]:
            wrong.append(f"sha256 {digest[:12]}… does not match its card ({entry['sha256'][:12]}…)")
        if "bytes" in entry and size != entry["bytes"]:
            wrong.append(f"{size} bytes, card.json says {entry['bytes']}")
        if wrong:
            self._fail(f"{path}: {'; '.join(wrong)}: the file was truncated or altered; {RESTORE}", "checksum")
