"""A file-based model registry: models by name, each with versions, model cards and aliases (champion,
challenger) that move atomically.

The on-disk layout is core/registry_layout.py, and every read (names, versions, cards, aliases, checksums) is
core/registry_reader.py's, the reader the server uses too; `Registry` adds the writes and the ONNX check. It is
the only writer: registrations, alias changes and the one-time move of a single-model registry under
models/<name>/ are serialised between processes by the registry's `.lock`. Versions are never modified or
deleted, so an alias, which only ever names a version that verified under the lock, never points at a missing
or partial model. Every file is checked (valid ONNX, size and sha256 of its card) when registered and when loaded.

Every alias move (a run's promotion, `tuneline models promote|rollback`, `promote --live`) appends one line to the
registry's events.jsonl under the same lock, after the alias file is in place: who moved it, from which version to
which, why, and the numbers that decided (core/registry_layout.py: RegistryEvent).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

from tuneline.core.atomic import make_staging_dir, staged_file
from tuneline.core.errors import StageFailed
from tuneline.core.registry_layout import (CARD_FILE, EVENT_SOURCES, MODEL_FILE, MODEL_FILES, STAGING_PREFIX,
                                           RegistryEvent, check_model_name)
from tuneline.core.registry_reader import RegistryReader, RegistryReadError, sha256_file

LOCK_TIMEOUT_S = 120.0  # registrations hold the lock for seconds (a copy and a rename), never minutes


class RegistryError(StageFailed, RuntimeError):
    """The registry refused an operation; the message says which file or alias and what to do."""


def check_onnx(path: Path) -> None:
    """Raise RegistryError unless `path` is a model that onnx.checker accepts."""
    import onnx

    try:
        onnx.checker.check_model(onnx.load(str(path), load_external_data=False), full_check=True)
    except Exception as exc:  # protobuf DecodeError, ValidationError, ...: all mean "not a usable model"
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RegistryError(f"{path}: not a valid ONNX model ({detail}): re-export it") from None


def _link_or_copy(source: str, target: str) -> None:
    """A hard link (versions are immutable, so sharing their bytes is safe), a copy where links are refused."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def append_line(path: Path, line: str) -> None:
    """Append one whole line to `path` atomically: O_APPEND, a single write, fsync.

    A reader never sees half of a line that was written whole; if a crash once cut the file's last line short,
    this line starts on a new line of its own, so the fragment stays one unreadable line (skipped by the reader)
    and this event stays readable."""
    data = line.encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        written = os.write(fd, data)
        if written != len(data):  # a full disk, for one: say so rather than leave a torn line unannounced
            raise RegistryError(f"{path}: appended {written} of {len(data)} bytes of an event: free disk space; the "
                                "alias has moved, its event line is incomplete")
        os.fsync(fd)
    finally:
        os.close(fd)


class Registry(RegistryReader):
    """One model of a registry folder, by name: core's reader plus the writes. Reads need no lock (every write is
    a rename); writes take `.lock`.

    `name` None means the registry's only model (what a single-model caller wants); it is an error when the
    registry holds several. A registry still in the old single-model layout is read as it is, and moved under
    models/<name>/ by the first write (under the lock, so no writer sees it half-moved; readers see either
    layout whole: the copy is renamed into place before the old folders go).
    """

    def __init__(self, root: Path, name: str | None = None, lock_timeout: float = LOCK_TIMEOUT_S):
        super().__init__(root, name)
        self._lock = FileLock(str(self.tree.lock_path), timeout=lock_timeout)  # re-entrant in this object

    def translate(self, error: RegistryReadError) -> Exception:
        """Every refusal of a read is the pipeline's RegistryError (exit 1)."""
        return RegistryError(str(error))

    # ----- reading (core's, plus the ONNX check) ----------------------------------------------------------

    def find(self, sha256: str) -> str | None:
        """The version whose model.onnx has this sha256, if any (re-registering the same file is a no-op)."""
        for version in self.versions():
            if self.card(version)["files"].get(MODEL_FILE, {}).get("sha256") == sha256:
                return version
        return None

    def verify(self, version: str) -> dict:
        """Check every file of a version against its card (exists, size, sha256) and as ONNX; returns the card."""
        card = super().verify(version)
        for name in card["files"]:
            check_onnx(self.layout.version_dir(version) / name)
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
        """Hold the registry's inter-process lock (re-entrant within this Registry object); an old single-model
        layout is migrated first, so every write lands under models/<name>/."""
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            with self._lock:
                self._migrate_legacy()
                yield
        except Timeout:
            raise RegistryError(f"{self.root / '.lock'}: another process held the registry lock for "
                                f"{self._lock.timeout:.0f} s: wait for it to finish (a lock of a dead process is "
                                "released by the OS)") from None

    def _migrate_legacy(self) -> None:
        """Move an old single-model registry (versions/, aliases/ at the top) under models/<its name>/ (under the
        lock). Copied (hard links where the file system allows) into a staging folder that is renamed into place,
        then the old folders are removed: a reader sees the old layout or the new one, whole, never neither."""
        legacy = self.tree.legacy()
        if legacy is None:
            return
        name = self.tree.legacy_name()
        target = self.tree.model_dir(name)
        if not target.exists():
            self.tree.models_dir.mkdir(parents=True, exist_ok=True)
            staging = make_staging_dir(self.tree.models_dir, STAGING_PREFIX)
            try:
                for folder in (legacy.versions_dir, legacy.aliases_dir):
                    if folder.is_dir():
                        shutil.copytree(folder, staging / folder.name, copy_function=_link_or_copy,
                                        ignore=shutil.ignore_patterns(f"{STAGING_PREFIX}*", ".*.tmp"))
                os.rename(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        for folder in (legacy.versions_dir, legacy.aliases_dir):
            shutil.rmtree(folder, ignore_errors=True)

    def register(self, files: dict[str, Path], *, name: str | None = None, metrics: dict, gates: list[dict],
                 lineage: dict, run_id: str | None) -> str:
        """Copy the files into a new version of this model, with its card; returns the new version id.

        `name` (the card's name) defaults to the Registry's; an unnamed Registry registers under `name`."""
        if MODEL_FILE not in files:
            raise RegistryError(f"register: {MODEL_FILE} is required (got {', '.join(files)})")
        unknown = set(files) - set(MODEL_FILES)
        if unknown:
            raise RegistryError(f"register: unexpected file name(s) {sorted(unknown)}: use {', '.join(MODEL_FILES)}")
        for source in files.values():
            check_onnx(Path(source))  # refuse before copying anything
        if self.named is not None and name is not None and name != self.named:
            raise RegistryError(f"register: card name {name!r} differs from the model {self.named!r} it is "
                                "registered as")
        if self.named is None:
            self.named = check_model_name(name or self.name or "model")
        name = self.named
        with self.locked():  # migrates an old layout first, so the staging folder lands in the final model folder
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

    def _record_event(self, alias: str, source: str | None, target: str, updated: str, by: str, reason: str,
                      numbers: dict | None) -> None:
        """Append the alias move to events.jsonl (call it under the lock, after the alias file is written)."""
        if by not in EVENT_SOURCES:
            raise ValueError(f"unknown event source {by!r}: choose one of {', '.join(EVENT_SOURCES)}")
        event = RegistryEvent(time=updated, model=self.name, alias=alias, from_version=source, to_version=target,
                              by=by, reason=reason, numbers=dict(numbers or {}))
        append_line(self.tree.events_path, event.to_line())

    def promote(self, ref: str, alias: str = "champion", *, by: str = "cli", reason: str | None = None,
                numbers: dict | None = None) -> dict:
        """Point `alias` at a verified version; the version it named before goes first in `previous`. The move is
        recorded in events.jsonl with `by`, `reason` (one line) and `numbers`; no move, no event."""
        with self.locked():
            version = self.resolve(ref)
            self.verify(version)
            current = self.alias(alias)
            if current is not None and current["version"] == version:
                return current
            previous = [current["version"], *current.get("previous", [])] if current else []
            record = {"version": version, "previous": previous, "updated": _now()}
            self._write_alias(alias, record)
            self._record_event(alias, current["version"] if current else None, version, record["updated"], by,
                               reason or f"{alias} set to {version}" + (f" (was {current['version']})" if current else ""),
                               numbers)
            return record

    def rollback(self, alias: str = "champion", *, by: str = "cli", reason: str | None = None) -> dict:
        """Point `alias` back at the version it named before (first of `previous`), verified; recorded as a move."""
        with self.locked():
            current = self.alias(alias)
            if current is None or not current.get("previous"):
                raise RegistryError(f"registry {self.root}: alias {alias!r} has no previous version to roll back to "
                                    f"(now: {current['version'] if current else 'not set'})")
            target, *rest = current["previous"]
            self.verify(target)
            record = {"version": target, "previous": rest, "updated": _now()}
            self._write_alias(alias, record)
            self._record_event(alias, current["version"], target, record["updated"], by,
                               reason or f"rolled back from {current['version']} to {target}", None)
            return record
