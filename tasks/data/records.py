"""Fetch for speech and text: clips or sentences -> raw records in the shard format (tasks/data/shards.py).

Audio (`data.source: audio`): a folder or archive (.tar/.tar.gz/.zip, local or a URL) of WAV/FLAC/OGG clips,
labelled by their class folder (optionally under train/ val/ test/), by a file-name pattern
(`data.label_pattern`, with an optional split rule `data.test_rule`: FSDD's `{label}_{speaker}_{index}`, index
< 5 is test), or by a CSV/TSV manifest inside the tree (`data.labels_file`: columns file, label, optional split).
Each clip is decoded, mixed down to mono and resampled to `data.sample_rate` here (core/audio.py, as the server
does it), and stored at its own length as float32: prepare fits the length.

Text (`data.source: text`): TSV/CSV/JSONL with a label column and a text column (`data.text_column`, or the one
other column; a list of names when files disagree, as SST-2's train and dev do). Each text is stored as its UTF-8
bytes; prepare trains the tokenizer on the training split and encodes every split.

The raw folder holds `records.json` (the record layout, the splits' shards and checksums, the classes) beside
`classes.json` and `source.json`, like every other source. Records are read in one pass; a split's records are
written in shards of at most `data.shard_mb`, so memory holds one shard's worth at a time.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tuneline.core.audio import AUDIO_SUFFIXES, AudioError, load_clip
from tuneline.core.config.data import DataConfig
from tuneline.tasks.data.archive import is_archive, members, source_kind
from tuneline.tasks.data.idx import DataError
from tuneline.tasks.data.remote import is_url
from tuneline.tasks.data.shards import FORMAT, RecordLayout, Shard, split_entry, write_shard

log = logging.getLogger(__name__)

RECORDS_FILE = "records.json"
SPLITS = ("train", "val", "test", "all")
TEXT_SUFFIXES = (".tsv", ".csv", ".jsonl")
TEXT_SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "dev": "test", "test": "test"}
_RULE = re.compile(r"\s*(\w+)\s*(<=|>=|==|!=|<|>)\s*(\S+)\s*")


@dataclass
class SplitWriter:
    """One split's records, written a shard at a time (ragged: each record keeps its own length)."""

    split: str
    staging: Path
    layout: RecordLayout
    shard_bytes: float
    records: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    shards: list[Shard] = field(default_factory=list)
    pending: int = 0

    def add(self, record: np.ndarray, label: str) -> None:
        self.records.append(record)
        self.labels.append(label)
        self.pending += record.nbytes
        if self.pending >= self.shard_bytes:
            self.flush()

    def flush(self, classes: list[str] | None = None) -> None:
        if not self.records and (self.shards or classes is None):
            return
        # Labels stay strings until every class is known (the class index is its rank among them): a shard's
        # labels are written as positions in `names_seen`, fixed up by finish().
        self.shards.append(write_shard(self.staging, self.split, len(self.shards), self.records,
                                       np.zeros(len(self.labels), np.int64), self.layout))
        self._labels_of.append(list(self.labels))
        self.records, self.labels, self.pending = [], [], 0

    def __post_init__(self) -> None:
        self._labels_of: list[list[str]] = []

    def finish(self, classes: list[str]) -> dict:
        """Write the last shard, then every shard's labels as class indices; the split's manifest entry."""
        self.flush(classes)
        index = {name: i for i, name in enumerate(classes)}
        shards = []
        for shard, labels in zip(self.shards, self._labels_of):
            y = np.array([index[label] for label in labels], dtype=np.int64)
            path = self.staging / shard.files["y"]
            np.save(path, y, allow_pickle=False)
            from tuneline.tasks.data.shards import sha256_file

            shards.append(Shard(count=shard.count, files=shard.files, sha256={**shard.sha256, "y": sha256_file(path)}))
        return split_entry(shards)


def class_order(labels) -> list[str]:
    """Class names in a stable order: numerically when every label is an integer (2 before 10), else by name."""
    names = sorted(set(labels))
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return names


def write_records(staging: Path, kind: str, writers: dict[str, SplitWriter], extra: dict,
                   class_names: dict[str, str] | None, label_values: list[str] | None = None,
                   source: str | None = None) -> tuple[dict[str, int], list[str]]:
    """records.json, classes.json and source.json (`source`, default `kind`); `label_values` fixes the classes and
    their order (a captured model's, tasks/data/capture_records.py), else they are the labels seen."""
    labels = [label for w in writers.values() for labels in (*w._labels_of, w.labels) for label in labels]
    if not labels:
        raise DataError(f"{kind}: no records found")
    values = list(label_values) if label_values is not None else class_order(labels)
    if len(values) < 2:
        raise DataError(f"{kind}: every record has the label {values[0]!r}: a classifier needs at least 2 classes")
    if class_names:
        missing = [v for v in values if v not in class_names]
        if missing:
            raise DataError(f"data.class_names: no name for label(s) {missing[:5]}: name every label value "
                            f"({', '.join(values[:10])})")
    splits = {split: w.finish(values) for split, w in writers.items() if w.shards or w.records or w.labels}
    names = [class_names[v] if class_names else v for v in values]
    manifest = {"format": FORMAT, "kind": kind, "record": next(iter(writers.values())).layout.to_dict(),
                "classes": names, "label_values": values, "splits": splits, **extra}
    (staging / RECORDS_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    (staging / "classes.json").write_text(json.dumps(names))
    (staging / "source.json").write_text(json.dumps({"source": source or kind}) + "\n")
    return {split: entry["count"] for split, entry in splits.items()}, names


# --- audio ----------------------------------------------------------------------------------------------------------


def pattern_regex(pattern: str) -> tuple[re.Pattern, list[str]]:
    """'{label}_{speaker}_{index}' -> a regex with one named group per field (a field matches no '_' or '/')."""
    fields = re.findall(r"\{(\w+)\}", pattern)
    if "label" not in fields:
        raise DataError(f"data.label_pattern {pattern!r}: needs a {{label}} field, e.g. '{{label}}_{{speaker}}_{{index}}'")
    regex, last = "", 0
    for match in re.finditer(r"\{(\w+)\}", pattern):
        regex += re.escape(pattern[last:match.start()]) + f"(?P<{match.group(1)}>[^_/]+)"
        last = match.end()
    return re.compile(regex + re.escape(pattern[last:])), fields


def parse_rule(rule: str, fields: list[str]):
    """'index < 5' -> a function of a match's fields that says whether the clip is test."""
    match = _RULE.fullmatch(rule)
    if match is None:
        raise DataError(f"data.test_rule {rule!r}: expected '<field> <op> <value>', e.g. 'index < 5'")
    name, op, value = match.groups()
    if name not in fields:
        raise DataError(f"data.test_rule {rule!r}: {name!r} is not a field of data.label_pattern ({', '.join(fields)})")
    numeric = re.fullmatch(r"-?\d+(\.\d+)?", value) is not None
    ops = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
           "==": lambda a, b: a == b, "!=": lambda a, b: a != b}

    def is_test(groups: dict[str, str]) -> bool:
        got = groups[name]
        if numeric:
            try:
                return ops[op](float(got), float(value))
            except ValueError:
                raise DataError(f"data.test_rule {rule!r}: field {name} is {got!r}, not a number") from None
        return ops[op](got, value)
    return is_test


class AudioLabeller:
    """(split, label) of a clip from its path inside the tree, as the config says; None: not in the labels file.

    A pattern reads the file name (a train/ val/ test/ folder right above it gives the split, unless a test rule
    decides); class folders give the label by the clip's folder and the split by a train/ val/ test/ folder above
    it; a labels file names clips by their path relative to its own folder. Any wrapping top folders are ignored.
    """

    def __init__(self, cfg: DataConfig, manifest: dict[str, tuple[str, str | None]] | None, manifest_dir: str = ""):
        self.manifest, self.manifest_dir = manifest, manifest_dir
        self.pattern = pattern_regex(cfg.label_pattern) if cfg.label_pattern else None
        self.rule = parse_rule(cfg.test_rule, self.pattern[1]) if cfg.test_rule and self.pattern else None

    def __call__(self, parts: list[str]) -> tuple[str, str] | None:
        name = "/".join(parts)
        if self.manifest is not None:
            relative = name[len(self.manifest_dir):] if name.startswith(self.manifest_dir) else name
            if relative not in self.manifest:
                return None
            label, split = self.manifest[relative]
            return split or "all", label
        if self.pattern is not None:
            stem = os.path.splitext(parts[-1])[0]
            match = self.pattern[0].fullmatch(stem)
            if match is None:
                raise DataError(f"{name}: the file name does not match data.label_pattern "
                                f"({self.pattern[0].pattern}); rename it or fix the pattern")
            groups = match.groupdict()
            split = parts[-2] if len(parts) > 1 and parts[-2] in ("train", "val", "test") else "all"
            if self.rule is not None:
                split = "test" if self.rule(groups) else "train"
            return split, groups["label"]
        if len(parts) < 2 or parts[-2] in ("train", "val", "test"):
            raise DataError(f"{name}: a clip outside any class folder: put clips in one folder per class, or set "
                            "data.label_pattern or data.labels_file")
        split = parts[-3] if len(parts) > 2 and parts[-3] in ("train", "val", "test") else "all"
        return split, parts[-2]


def _read_labels_file(data: bytes, where: str) -> dict[str, tuple[str, str | None]]:
    text = data.decode("utf-8-sig")
    dialect = "excel-tab" if "\t" in text.splitlines()[0] else "excel"
    rows = list(csv.DictReader(io.StringIO(text), dialect=dialect))
    if not rows or "label" not in rows[0] or not ({"file", "path"} & set(rows[0])):
        raise DataError(f"{where}: data.labels_file needs columns file (or path) and label, optionally split")
    key = "file" if "file" in rows[0] else "path"
    out = {}
    for row in rows:
        split = (row.get("split") or "").strip().lower() or None
        if split not in (None, "train", "val", "test"):
            raise DataError(f"{where}: split {split!r} for {row[key]}: expected train, val or test")
        out[row[key].strip().lstrip("./")] = (row["label"].strip(), split)
    return out


def _audio_files(source: str, kind: str):
    """(parts below the root, bytes) of every clip (and the labels file), in name order for folders and archive
    order for archives, with one wrapping top folder dropped."""
    if kind == "folder":
        root = Path(source)
        names = sorted(str(p.relative_to(root)).replace(os.sep, "/") for p in root.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
        for name in names:
            yield name, (root / name).read_bytes
    else:
        for _, name, is_dir, data in members(source, lambda ordinal, name: True):
            if not is_dir:
                yield name, (lambda data=data: data)


def fetch_audio(cfg: DataConfig, source: str, staging: Path) -> tuple[dict[str, int], list[str], list[str]]:
    """Every clip of `source` decoded, mixed down, resampled and written as raw float32 records by split."""
    if not is_url(source):
        source_kind(source)  # a clear error for a missing path
    kind = "folder" if not is_url(source) and Path(source).is_dir() else ("archive" if is_archive(source) else "folder")
    layout = RecordLayout("float32", (None,))
    writers = {split: SplitWriter(split, staging, layout, cfg.shard_mb * 1e6) for split in SPLITS}
    files = list(_audio_files(source, kind)) if cfg.labels_file else _audio_files(source, kind)
    manifest, manifest_dir = None, ""
    if cfg.labels_file:
        wanted = cfg.labels_file.strip("/")
        found = [(name, read) for name, read in files if name == wanted or name.endswith("/" + wanted)]
        if not found:
            raise DataError(f"{source}: data.labels_file {cfg.labels_file!r} not found inside it")
        name, read = found[0]
        manifest, manifest_dir = _read_labels_file(read(), f"{source}:{name}"), name[:len(name) - len(wanted)]
    labeller = AudioLabeller(cfg, manifest, manifest_dir)
    lengths, skipped, notes = [], 0, []
    for name, read in files:
        parts = name.split("/")
        if not name.lower().endswith(AUDIO_SUFFIXES) or any(p.startswith(".") or p == "__MACOSX" for p in parts):
            continue
        labelled = labeller(parts)
        if labelled is None:
            skipped += 1
            continue
        split, label = labelled
        try:
            clip = load_clip(read(), cfg.sample_rate, f"{source}:{name}" if kind == "archive" else str(Path(source) / name))
        except AudioError as exc:
            raise DataError(str(exc)) from None
        writers[split].add(clip, label)
        lengths.append(clip.size)
    if skipped:
        notes.append(f"{skipped} clip(s) not in data.labels_file were left out")
    if not lengths:
        raise DataError(f"{source}: no audio clips ({', '.join(AUDIO_SUFFIXES)}) found: set data.audio_folder to a "
                        "folder or archive of clips")
    seconds = np.array(lengths) / cfg.sample_rate
    notes.append(f"{len(lengths)} clips at {cfg.sample_rate} Hz, {seconds.min():.2f}-{seconds.max():.2f} s "
                 f"(median {np.median(seconds):.2f} s)")
    writers = {s: w for s, w in writers.items() if w.records or w.shards}
    counts, classes = write_records(staging, "audio", writers, {"sample_rate": cfg.sample_rate}, cfg.class_names)
    for note in notes:
        log.info("fetch: %s", note)
    return counts, classes, notes


# --- text -----------------------------------------------------------------------------------------------------------


def _text_rows(path: Path, cfg: DataConfig):
    """(text, label) rows of one TSV/CSV/JSONL file."""
    where = str(path)
    if path.suffix.lower() == ".jsonl":
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise DataError(f"{where}:{number}: not JSON ({exc})") from None
                yield _pick(row, cfg, f"{where}:{number}")
        return
    with open(path, encoding="utf-8", newline="") as handle:
        dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
        # SST-2's sentences hold quote characters that are text, not CSV quoting.
        reader = csv.DictReader(handle, dialect=dialect, quoting=csv.QUOTE_NONE if dialect == "excel-tab" else csv.QUOTE_MINIMAL)
        for number, row in enumerate(reader, 2):
            yield _pick(row, cfg, f"{where}:{number}")


def _pick(row: dict, cfg: DataConfig, where: str) -> tuple[str, str]:
    if cfg.label_column not in row:
        raise DataError(f"{where}: no column {cfg.label_column!r} (data.label_column); columns: {', '.join(map(str, row))}")
    names = [cfg.text_column] if isinstance(cfg.text_column, str) else cfg.text_column
    if names is None:
        others = [k for k in row if k != cfg.label_column]
        if len(others) != 1:
            raise DataError(f"{where}: columns {', '.join(map(str, row))}: set data.text_column to the text's column")
        names = others
    for name in names:
        if name in row:
            text, label = row[name], row[cfg.label_column]
            if text is None or label is None:
                raise DataError(f"{where}: a row with too few columns")
            return str(text), str(label).strip()
    raise DataError(f"{where}: none of the text columns {names} (data.text_column); columns: {', '.join(map(str, row))}")


def text_files(source: Path) -> dict[str, Path]:
    """split -> file: a single file is `all`; a folder's files are named by their split (train, val, dev = test)."""
    if source.is_file():
        return {"all": source}
    if not source.is_dir():
        raise DataError(f"{source}: data.text_files not found: set it to a TSV/CSV/JSONL file or a folder of them")
    found = {}
    for path in sorted(source.iterdir()):
        split = TEXT_SPLIT_NAMES.get(path.stem.lower())
        if split and path.suffix.lower() in TEXT_SUFFIXES:
            if split in found:
                raise DataError(f"{source}: two files for the {split} split ({found[split].name}, {path.name})")
            found[split] = path
    if "train" not in found:
        raise DataError(f"{source}: no train.tsv/.csv/.jsonl: name the files train.* and test.* (or dev.*)")
    return found


def fetch_text(cfg: DataConfig, source: str, staging: Path) -> tuple[dict[str, int], list[str], list[str]]:
    if is_url(source):
        raise DataError(f"{source}: data.text_files must be a local file or folder")
    layout = RecordLayout("uint8", (None,))
    writers = {}
    for split, path in text_files(Path(source)).items():
        writer = writers[split] = SplitWriter(split, staging, layout, cfg.shard_mb * 1e6)
        for text, label in _text_rows(path, cfg):
            writer.add(np.frombuffer(text.encode("utf-8"), dtype=np.uint8), label)
    counts, classes = write_records(staging, "text", writers, {}, cfg.class_names)
    notes = [f"{sum(counts.values())} texts in {len(classes)} classes"]
    return counts, classes, notes
