"""A file-based model registry: versions with model cards, and aliases (champion, challenger) that move atomically.

The on-disk layout (folders, version ids, card and alias files) is tasks/ship/registry_layout.py, the
contract the server's read-only reader shares. This module is the only writer: registrations and alias
changes are serialised between processes by the registry's `.lock`. Versions are never modified or deleted,
so an alias, which only ever names a version that verified under the lock, never points at a missing or
partial model. Every file is checked (valid ONNX, sha256 of its card) when registered and when loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

from tasks.atomic import make_staging_dir, staged_file
from tasks.errors import StageFailed
from tasks.ship.registry_layout import (ALIASES, CARD_FILE, MODEL_FILE, MODEL_FILES, STAGING_PREFIX, LayoutError,
                                        RegistryLayout)

LOCK_TIMEOUT_S = 120.0  # registrations hold the lock for seconds (a copy and a rename), never minutes


class RegistryError(StageFailed, RuntimeError):
    """The registry refused an operation; the message says which file or alias and what to do."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_onnx(path: Path) -> None:
    """Raise RegistryError unless `path` is a model that onnx.checker accepts."""
    import onnx

    try:
        onnx.checker.check_model(onnx.load(str(path), load_external_data=False), full_check=True)
    except Exception as exc:  # protobuf DecodeError, ValidationError, ...: all mean "not a usable model"
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RegistryError(f"{path}: not a valid ONNX model ({detail}): re-export it") from None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Registry:
    """One registry folder. Reads need no lock (every write is a rename); writes take `.lock`."""

    def __init__(self, root: Path, lock_timeout: float = LOCK_TIMEOUT_S):
        self.root = Path(root)
        self.layout = RegistryLayout(self.root)
        self._lock = FileLock(str(self.layout.lock_path), timeout=lock_timeout)  # re-entrant in this object

    # ----- reading -------------------------------------------------------------------------------------

    def versions(self) -> list[str]:
        """Version ids in registration order (staging folders and anything else are ignored)."""
        return self.layout.versions()

    def card(self, version: str) -> dict:
        if not self.layout.has_version(version):
            known = ", ".join(self.versions()) or "none yet"
            raise RegistryError(f"registry {self.root}: no version {version!r} (versions: {known})")
        try:
            return self.layout.read_card(version)
        except LayoutError as exc:
            raise RegistryError(f"{exc}: restore it from DVC (`dvc checkout`)") from None

    def alias(self, name: str) -> dict | None:
        """The alias record, or None when the alias was never set."""
        if name not in ALIASES:
            raise RegistryError(f"unknown alias {name!r}: choose one of {', '.join(ALIASES)}")
        try:
            return self.layout.read_alias(name)
        except LayoutError as exc:
            raise RegistryError(f"{exc}: restore it from DVC (`dvc checkout`) or promote again") from None

    def aliases_of(self, version: str) -> list[str]:
        return [name for name in ALIASES if (self.alias(name) or {}).get("version") == version]

    def resolve(self, ref: str) -> str:
        """A version id from a version id or an alias name."""
        if ref in ALIASES:
            record = self.alias(ref)
            if record is None:
                raise RegistryError(f"registry {self.root}: alias {ref!r} is not set: promote a version first")
            return record["version"]
        self.card(ref)  # raises with the list of versions when unknown
        return ref

    def find(self, sha256: str) -> str | None:
        """The version whose model.onnx has this sha256, if any (re-registering the same file is a no-op)."""
        for version in self.versions():
            if self.card(version)["files"].get(MODEL_FILE, {}).get("sha256") == sha256:
                return version
        return None

    def verify(self, version: str) -> dict:
        """Check every file of a version against its card (exists, sha256, valid ONNX); returns the card."""
        card = self.card(version)
        folder = self.layout.version_dir(version)
        for name, entry in card["files"].items():
            path = folder / name
            if not path.is_file():
                raise RegistryError(f"{path}: missing but listed in {version}/card.json: restore the registry "
                                    "(`dvc checkout`)")
            actual = sha256_file(path)
            if actual != entry["sha256"]:
                raise RegistryError(f"{path}: sha256 {actual[:12]}… does not match its card ({entry['sha256'][:12]}…): "
                                    "the file was altered; restore it (`dvc checkout`) or register a new version")
            check_onnx(path)
        return card

    def model_path(self, ref: str = "champion", file: str = MODEL_FILE) -> Path:
        """The verified path of one model file of a version or alias: what a loader must use."""
        version = self.resolve(ref)
        card = self.verify(version)
        if file not in card["files"]:
            raise RegistryError(f"registry {self.root}: {version} has no {file} (it has {', '.join(card['files'])})")
        return self.layout.version_dir(version) / file

    # ----- writing (under the lock) --------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the registry's inter-process lock (re-entrant within this Registry object)."""
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            with self._lock:
                yield
        except Timeout:
            raise RegistryError(f"{self.root / '.lock'}: another process held the registry lock for "
                                f"{self._lock.timeout:.0f} s: wait for it to finish (a lock of a dead process is "
                                "released by the OS)") from None

    def register(self, files: dict[str, Path], *, name: str, metrics: dict, gates: list[dict], lineage: dict,
                 run_id: str | None) -> str:
        """Copy the files into a new version folder with its card; returns the new version id."""
        if MODEL_FILE not in files:
            raise RegistryError(f"register: {MODEL_FILE} is required (got {', '.join(files)})")
        unknown = set(files) - set(MODEL_FILES)
        if unknown:
            raise RegistryError(f"register: unexpected file name(s) {sorted(unknown)}: use {', '.join(MODEL_FILES)}")
        for source in files.values():
            check_onnx(Path(source))  # refuse before copying anything
        self.layout.versions_dir.mkdir(parents=True, exist_ok=True)
        # Staged beside the final folder (same file system, so the rename is atomic); the dot hides it from versions().
        staging = make_staging_dir(self.layout.versions_dir, STAGING_PREFIX)  # the mode mkdir gives, not 0700
        try:
            entries = {}
            for target, source in files.items():
                shutil.copyfile(source, staging / target)
                entries[target] = {"sha256": sha256_file(staging / target), "bytes": (staging / target).stat().st_size}
            with self.locked():
                version = self.layout.next_version()
                card = {"name": name, "version": version, "created": _now(), "files": entries, "metrics": metrics,
                        "gates": gates, "lineage": lineage, "run_id": run_id}
                (staging / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
                os.rename(staging, self.layout.version_dir(version))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return version

    def _write_alias(self, alias: str, record: dict) -> None:
        with staged_file(self.layout.alias_path(alias)) as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n")

    def promote(self, ref: str, alias: str = "champion") -> dict:
        """Point `alias` at a verified version; the version it named before goes first in `previous`."""
        with self.locked():
            version = self.resolve(ref)
            self.verify(version)
            current = self.alias(alias)
            if current is not None and current["version"] == version:
                return current
            previous = [current["version"], *current.get("previous", [])] if current else []
            record = {"version": version, "previous": previous, "updated": _now()}
            self._write_alias(alias, record)
            return record

    def rollback(self, alias: str = "champion") -> dict:
        """Point `alias` back at the version it named before (first of `previous`), verified."""
        with self.locked():
            current = self.alias(alias)
            if current is None or not current.get("previous"):
                raise RegistryError(f"registry {self.root}: alias {alias!r} has no previous version to roll back to "
                                    f"(now: {current['version'] if current else 'not set'})")
            target, *rest = current["previous"]
            self.verify(target)
            record = {"version": target, "previous": rest, "updated": _now()}
            self._write_alias(alias, record)
            return record
