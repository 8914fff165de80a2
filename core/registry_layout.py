"""The model registry on disk: the one contract between its writer (tasks/ship/registry.py) and its one reader
(core/registry_reader.py, which the server uses too). Both find models, folders, version ids, cards and aliases here.

A registry holds several models, each under its name (project.name: a data set and its input contract),
each with its own versions and its own champion:

    <registry>/
      models/<name>/
        versions/<vNNNN>/     model.onnx (+ model.fp16.onnx, model.int8.onnx) and card.json; a version folder
                              is staged under a dot name and renamed into place whole
        aliases/<alias>.json  {"version": "v0003", "previous": ["v0002", ...], "updated": iso8601}, replaced
                              with os.replace of a temp file
      events.jsonl            every alias move of every model, appended one JSON line at a time (RegistryEvent):
                              when, which alias, from which version to which, by whom, why, with the numbers
      .lock                   the writer's inter-process lock (one for the whole registry)

A registry written before names existed holds one model at its top (<registry>/versions/, <registry>/aliases/).
Readers see it as the model its newest card names (cards always carried the name: the data set's, which is
also project.name's default); the writer moves it under models/<name>/ on its first write (RegistryTree.legacy).

A version id is "v" and its number zero-padded to at least four digits (v0001, v0042, v12345), exactly as
format_version writes it; anything else in versions/ (staging folders, "v1", "v00001", "V0001") is not a
version. The id is also what keeps "..", "/" and other path tricks out of every path built from it.
Nothing here imports PyTorch or ONNX: the serving image has neither of the first, and the reader needs no ONNX.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from tuneline.core.config.base import MODEL_NAME_PATTERN, safe_model_name

MODELS_DIR = "models"
VERSIONS_DIR = "versions"
ALIASES_DIR = "aliases"
LOCK_FILE = ".lock"
EVENTS_FILE = "events.jsonl"
EVENT_SOURCES = ("pipeline", "cli", "live")  # who moved an alias: a run's promote, `tuneline models`, promote --live
STAGING_PREFIX = ".staging-"  # a version folder being written (the dot keeps it out of versions())
CARD_FILE = "card.json"
MODEL_FILE = "model.onnx"
VARIANT_FILES = {"fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}  # quantized variant -> its file name
MODEL_FILES = (MODEL_FILE, *VARIANT_FILES.values())  # every file a version may hold besides its card
ALIASES = ("champion", "challenger")

_MODEL_NAME = re.compile(MODEL_NAME_PATTERN)
_VERSION_ID = re.compile(r"v(?:[0-9]{4}|[1-9][0-9]{4,})")  # fullmatch only: "$" would let "v0001\n" through


class LayoutError(ValueError):
    """A registry file is not what the layout says it is; the message names the file."""


def is_version_id(text: object) -> bool:
    """Whether `text` is a version id: what format_version writes, and nothing else."""
    return isinstance(text, str) and _VERSION_ID.fullmatch(text) is not None


def is_model_name(text: object) -> bool:
    """Whether `text` is a model name (project.name's pattern: a folder name and a URL segment, never "..")."""
    return isinstance(text, str) and _MODEL_NAME.fullmatch(text) is not None


def check_model_name(name: str) -> str:
    if not is_model_name(name):
        raise ValueError(f"not a model name: {name!r} (letters, digits, '.', '_', '-'; at most 64; set project.name)")
    return name


def format_version(number: int) -> str:
    """3 -> "v0003"."""
    return f"v{number:04d}"


def check_version_id(version: str) -> str:
    """`version` itself; ValueError for anything that is not a version id."""
    if not is_version_id(version):
        raise ValueError(f"not a registry version id: {version!r} (expected v0001, v0002, ...)")
    return version


def version_number(version: str) -> int:
    """"v0003" -> 3 (ValueError for anything that is not a version id)."""
    return int(check_version_id(version)[1:])


@dataclass(frozen=True)
class RegistryLayout:
    """Paths inside one model's folder (models/<name>/, or a single-model registry's top), and the readers of
    its two JSON files (cards and aliases)."""

    root: Path

    @property
    def versions_dir(self) -> Path:
        return self.root / VERSIONS_DIR

    @property
    def aliases_dir(self) -> Path:
        return self.root / ALIASES_DIR

    def versions(self) -> list[str]:
        """Version ids present, oldest first (staging folders and anything else are ignored)."""
        if not self.versions_dir.is_dir():
            return []
        found = [p.name for p in self.versions_dir.iterdir() if is_version_id(p.name) and p.is_dir()]
        return sorted(found, key=version_number)

    def next_version(self) -> str:
        """The id the next registration gets (call it under the writer's lock)."""
        existing = self.versions()
        return format_version(version_number(existing[-1]) + 1 if existing else 1)

    def has_version(self, version: str) -> bool:
        return is_version_id(version) and self.version_dir(version).is_dir()

    def version_dir(self, version: str) -> Path:
        """versions/<version>; ValueError for a string that is not a version id (no path is built from it)."""
        return self.versions_dir / check_version_id(version)

    def card_path(self, version: str) -> Path:
        return self.version_dir(version) / CARD_FILE

    def alias_path(self, alias: str) -> Path:
        if alias not in ALIASES:
            raise ValueError(f"unknown alias {alias!r}: choose one of {', '.join(ALIASES)}")
        return self.aliases_dir / f"{alias}.json"

    def read_card(self, version: str) -> dict:
        """The version's card; LayoutError if it is unreadable or has no 'files' table."""
        path = self.card_path(version)
        try:
            card = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise LayoutError(f"{path}: unreadable model card ({exc})") from None
        if not isinstance(card, dict) or not isinstance(card.get("files"), dict):
            raise LayoutError(f"{path}: model card lacks a 'files' table")
        return card

    def read_alias(self, alias: str) -> dict | None:
        """The alias record, None when the alias was never set; LayoutError if it does not name a version id."""
        path = self.alias_path(alias)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise LayoutError(f"{path}: unreadable alias file ({exc.strerror})") from None
        try:
            record = json.loads(text)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not is_version_id(record.get("version")):
            raise LayoutError(f"{path}: not an alias record: expected {{\"version\": \"v0001\", ...}}, "
                              f"got {text[:80]!r}")
        return record


@dataclass(frozen=True)
class RegistryTree:
    """A registry folder: its models by name, and a single-model registry of the old layout, if it is one."""

    root: Path

    @property
    def models_dir(self) -> Path:
        return self.root / MODELS_DIR

    @property
    def lock_path(self) -> Path:
        return self.root / LOCK_FILE

    @property
    def events_path(self) -> Path:
        return self.root / EVENTS_FILE

    def model_dir(self, name: str) -> Path:
        return self.models_dir / check_model_name(name)

    def legacy(self) -> RegistryLayout | None:
        """The old single-model layout at the top of the registry, if there is one."""
        top = RegistryLayout(self.root)
        return top if top.versions_dir.is_dir() or top.aliases_dir.is_dir() else None

    def legacy_name(self) -> str | None:
        """The name the old layout's model goes by: its newest card's name, made a valid model name."""
        top = self.legacy()
        if top is None:
            return None
        for version in reversed(top.versions()):
            try:
                name = top.read_card(version).get("name")
            except LayoutError:
                continue
            if isinstance(name, str) and name:
                return safe_model_name(name)
        return "model"

    def names(self) -> list[str]:
        """Model names present (a legacy model included, unless it has been migrated already), sorted."""
        found = set()
        if self.models_dir.is_dir():
            found = {p.name for p in self.models_dir.iterdir() if is_model_name(p.name) and p.is_dir()}
        legacy = self.legacy_name()
        if legacy is not None:
            found.add(legacy)
        return sorted(found)

    def model(self, name: str) -> RegistryLayout:
        """The layout of model `name`: models/<name>/, or the old top-level layout while it is not migrated."""
        folder = self.model_dir(name)
        if not folder.is_dir() and self.legacy_name() == name:
            return RegistryLayout(self.root)
        return RegistryLayout(folder)


@dataclass(frozen=True)
class RegistryEvent:
    """One alias move, as one line of events.jsonl: {"time", "model", "alias", "from", "to", "by", "reason",
    "numbers"}. `from` is None when the alias was not set before; `numbers` are the metrics that decided."""

    time: str                      # ISO 8601, UTC
    model: str
    alias: str
    from_version: str | None
    to_version: str
    by: str                        # one of EVENT_SOURCES
    reason: str                    # one line
    numbers: dict = field(default_factory=dict)

    def to_line(self) -> str:
        """The event as one JSON line, newline included (what the writer appends in a single write)."""
        record = {"time": self.time, "model": self.model, "alias": self.alias, "from": self.from_version,
                  "to": self.to_version, "by": self.by, "reason": " ".join(self.reason.split()),
                  "numbers": self.numbers}
        return json.dumps(record, sort_keys=False, default=str) + "\n"

    @classmethod
    def from_dict(cls, data: object) -> "RegistryEvent":
        """An event from its JSON object; LayoutError when a field is missing or of the wrong kind."""
        if not isinstance(data, dict):
            raise LayoutError(f"not an event object: {str(data)[:80]!r}")
        source = data.get("from")
        if not (is_version_id(data.get("to")) and (source is None or is_version_id(source))
                and isinstance(data.get("model"), str) and data.get("alias") in ALIASES
                and isinstance(data.get("time"), str)):
            raise LayoutError(f"not an event: {json.dumps(data)[:120]}")
        numbers = data.get("numbers")
        return cls(time=data["time"], model=data["model"], alias=data["alias"], from_version=source,
                   to_version=data["to"], by=str(data.get("by", "")), reason=str(data.get("reason", "")),
                   numbers=numbers if isinstance(numbers, dict) else {})


@dataclass(frozen=True)
class EventLog:
    """events.jsonl read back: the events in the order they were appended, and how many lines were unreadable."""

    events: list[RegistryEvent]
    skipped: int = 0   # lines that are not an event: a last line cut short by a crash mid-write, or damage


def read_events(path: Path) -> EventLog:
    """Every event of an events.jsonl (none when the file does not exist yet).

    A writer appends a whole line in one write, so a reader sees whole lines, and at worst a last line cut short
    by a crash; the next append starts on a new line, so such a fragment stays a line of its own. Either way an
    unreadable line is skipped and counted, never fatal: the log is a record, and one bad line must not hide
    the rest.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return EventLog([])
    events, skipped = [], 0
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            events.append(RegistryEvent.from_dict(json.loads(line)))
        except (ValueError, LayoutError):  # json's errors are ValueErrors; UnicodeDecodeError is one too
            skipped += 1
    return EventLog(events, skipped)
