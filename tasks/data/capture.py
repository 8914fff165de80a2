"""Fetch for `data.source: capture`: the requests the inference server captured, with the labels fed back for them.

The server (serve.capture, docs/serving.md) writes into `data.capture_dir` (default `.tuneline/capture`):

    capture-*.jsonl    one request row per line: {"id": "<hex>", "time": iso8601, "model": "mnist", "version": "v0002",
                       "modality": "image", "input": [[[...]]], "shape": [1, 28, 28], "class": 7, "probability": 0.99}
    feedback-*.jsonl   one label per line: {"id": "<hex>", "label": 7} (the true class index of a captured request)

Rows of `data.capture_model` that have a feedback label are the data set (prepare carves val and test from it, as
for any source without splits); rows without a label are counted, not used. A line that does not parse (the last
line of a file the server was writing when it stopped, cut short) is skipped and counted; when a request has several
labels, the last one read wins (files in name order, lines in order).

Image, audio and text models are read. The contract (class names and order, input shape, sample rate and clip
length, tokenizer) comes from the captured version's input spec in the registry (the newest version the labelled
rows name; its ONNX metadata), so the retrained model keeps the served model's contract and challenges it. Every
labelled row must be of that contract; a row that states another modality than the model's, or rows of one model
name that state different modalities, are refused. The server captures what each model takes (serving/capture.py):

- image: float32 pixels 0..255 [C, H, W] as the graph received them (normalisation is inside the ONNX graph:
  clients send raw pixels, core/spec.py), so each value is rounded to the uint8 pixel it was; no mean/std is
  undone. Written as the raw IDX layout (fetch.write_raw, split `all`). A row of another shape or with values
  outside 0..255 (a normalised one) is refused with its id.
- audio: the float samples the model took, already resampled and fitted to its length; written as the speech
  source's raw records at the model's sample rate, with its clip length fixed for prepare (capture_records.py).
  A row of another length, or not float samples, is refused with its id.
- text: the string the client sent; written as the text source's raw records (UTF-8 sentences), with the served
  model's tokenizer for prepare to encode with (capture_records.py). A row that is not a non-empty string (token
  ids, say) is refused with its id.

Besides the raw files, fetch writes `capture.json` (CaptureReport: rows, labelled, versions; never a path), which
the run summary reports.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tuneline.core.config.data import DataConfig
from tuneline.core.onnx_metadata import read_input_spec
from tuneline.core.registry_layout import MODEL_FILE, is_version_id, version_number
from tuneline.core.registry_reader import RegistryReader, RegistryReadError
from tuneline.core.spec import InputSpec, SpecError
from tuneline.tasks.data.idx import DataError

log = logging.getLogger(__name__)

CAPTURE_GLOB = "capture-*.jsonl"
FEEDBACK_GLOB = "feedback-*.jsonl"
REPORT_FILE = "capture.json"
PIXEL_SLACK = 1e-3  # float error allowed outside 0..255; normalised values (negative for a dark background) are refused


@dataclass(frozen=True)
class CaptureReport:
    """What a capture held for one model: the counts the run summary shows (written beside the raw files)."""

    model: str
    rows: int                      # captured requests of the model
    labelled: int                  # of them, with a feedback label: the data set
    versions: dict[str, dict[str, int]] = field(default_factory=dict)  # version -> {"rows": n, "labelled": m}
    skipped_lines: int = 0         # lines that did not parse (cut short), in capture and feedback files
    invalid_labels: int = 0        # feedback labels that name no class of the model
    files: int = 0                 # capture files read

    @property
    def unlabelled(self) -> int:
        return self.rows - self.labelled

    def write(self, raw_dir: Path) -> None:
        (Path(raw_dir) / REPORT_FILE).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def read(cls, raw_dir: Path) -> "CaptureReport | None":
        """The report fetch wrote, None when the raw data is not a capture."""
        path = Path(raw_dir) / REPORT_FILE
        if not path.is_file():
            return None
        return cls(**json.loads(path.read_text()))

    def describe(self) -> str:
        """One line: '1500 captured requests of mnist (v0001: 1200, 40 labelled; v0002: 300, 10 labelled), 50 with a
        feedback label (the data set), 1450 without (not used)'."""
        versions = "; ".join(f"{v}: {c['rows']}, {c['labelled']} labelled" for v, c in self.versions.items())
        extra = [f"{n} {what}" for n, what in ((self.skipped_lines, "unreadable line(s) skipped"),
                                               (self.invalid_labels, "label(s) naming no class ignored")) if n]
        return (f"{self.rows} captured requests of {self.model} ({versions or 'none'}), {self.labelled} with a "
                f"feedback label (the data set), {self.unlabelled} without (not used)"
                + (f"; {', '.join(extra)}" if extra else ""))


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """The JSON objects of a JSONL file, and how many lines were not one (a line cut short is skipped)."""
    rows, skipped = [], 0
    for line in Path(path).read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            skipped += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            skipped += 1
    return rows, skipped


def read_feedback(folder: Path) -> tuple[dict[str, int], int]:
    """request id -> label from every feedback file (the last label of an id wins), and the lines skipped."""
    labels, skipped = {}, 0
    for path in sorted(Path(folder).glob(FEEDBACK_GLOB)):
        rows, bad = read_jsonl(path)
        skipped += bad
        for row in rows:
            if isinstance(row.get("id"), str) and isinstance(row.get("label"), int) and not isinstance(row["label"], bool):
                labels[row["id"]] = row["label"]
            else:
                skipped += 1
    return labels, skipped


@dataclass
class _Labelled:
    time: str
    id: str
    version: str
    values: list | str             # the captured input: pixels, samples or a text
    label: int
    where: str
    modality: str | None = None    # as the row states it


def scan_capture(folder: Path, model: str) -> tuple[CaptureReport, list[_Labelled]]:
    """Every captured row of `model` counted, and those with a feedback label kept (in (time, id) order, so the
    same capture gives the same data set whatever its files are called)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data.capture_dir {folder}: not a folder: turn capture on in the server (serve.capture) "
                        "and let it see traffic, or point data.capture_dir at its capture folder")
    labels, skipped = read_feedback(folder)
    files = sorted(folder.glob(CAPTURE_GLOB))
    versions: dict[str, Counter] = {}
    kept: list[_Labelled] = []
    rows = 0
    for path in files:
        captured, bad = read_jsonl(path)
        skipped += bad
        for line, row in enumerate(captured, 1):
            if row.get("model") != model:
                continue
            version = str(row.get("version"))
            counts = versions.setdefault(version, Counter())
            counts["rows"] += 1
            rows += 1
            label = labels.get(row.get("id"))
            if label is None:
                continue
            if "input" not in row:
                raise DataError(f"{path}: row {line} (id {row.get('id')}) has no 'input': not a capture row")
            counts["labelled"] += 1
            kept.append(_Labelled(str(row.get("time", "")), str(row["id"]), version, row["input"], label,
                                  f"{path.name} id {row['id']}", row.get("modality")))
    kept.sort(key=lambda r: (r.time, r.id))
    report = CaptureReport(model=model, rows=rows, labelled=len(kept), skipped_lines=skipped, files=len(files),
                           versions={v: {"rows": c["rows"], "labelled": c["labelled"]}
                                     for v, c in sorted(versions.items(), key=lambda item: item[0])})
    return report, kept


def captured_spec(registry_dir: Path, model: str, versions: list[str]) -> tuple[str, InputSpec, dict[str, str]]:
    """The input spec of the newest captured version in the registry (the contract of the data), and its ONNX
    metadata (a text model's tokenizer)."""
    import onnx

    reader = RegistryReader(Path(registry_dir), model)
    known = [v for v in versions if v in reader.versions()]
    if not known:
        raise DataError(f"capture: model {model!r} versions {', '.join(versions) or '(none named)'} are not in the registry "
                        f"{registry_dir}: the capture names the versions that answered; restore the registry "
                        "(`dvc pull`) or point paths.registry at the server's")
    version = max(known, key=version_number)
    try:
        data = reader.read_verified(version, MODEL_FILE).data
        metadata = {p.key: p.value for p in onnx.load_model_from_string(data).metadata_props}
        return version, read_input_spec(metadata, f"registry {model} {version}"), metadata
    except (RegistryReadError, SpecError) as exc:
        raise DataError(f"capture: {exc}") from None


def to_pixels(values: list, spec: InputSpec, where: str) -> np.ndarray:
    """One captured image row (float32 0..255, [C, H, W] as the graph took it) as the uint8 pixels prepare stores:
    [H, W] for gray, [H, W, C] for colour (fetch's raw layout)."""
    try:
        array = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError):  # a string, or rows of uneven lengths
        raise DataError(f"capture {where}: input is not nested lists of pixels [C, H, W]: the row is not of this "
                        "model's contract; move its file out of data.capture_dir") from None
    if array.shape != spec.shape:
        raise DataError(f"capture {where}: input shape {list(array.shape)}, the model takes {list(spec.shape)}: "
                        "the row is not of this model's contract")
    low, high = float(array.min()), float(array.max())
    if low < -PIXEL_SLACK or high > 255 + PIXEL_SLACK or not np.isfinite(array).all():
        raise DataError(f"capture {where}: values {low:.3g}..{high:.3g} are not pixels 0..255 (the server captures "
                        "what the graph takes: raw pixels, normalised inside the graph)")
    pixels = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    return pixels[0] if spec.channels == 1 else np.transpose(pixels, (1, 2, 0))


def check_modality(kept: list[_Labelled], spec: InputSpec, model: str, version: str) -> None:
    """Every labelled row states the captured model's modality (rows that state none are held to its contract)."""
    first: dict[str, _Labelled] = {}
    for row in kept:
        if row.modality is not None:
            first.setdefault(str(row.modality), row)
    if len(first) > 1:
        seen = "; ".join(f"{modality} ({row.where})" for modality, row in first.items())
        raise DataError(f"capture: the rows of model {model!r} are of more than one modality ({seen}): one model "
                        "name serves one contract; move the other model's capture files out of data.capture_dir")
    for modality, row in first.items():
        if modality != spec.modality:
            raise DataError(f"capture {row.where}: a {modality} row, but {model} {version} is a {spec.modality} "
                            f"model ({spec.describe()}): move the other model's capture files out of "
                            "data.capture_dir, or set data.capture_model to the model it was captured from")


def fetch_capture(cfg: DataConfig, folder: Path, registry_dir: Path | None, staging: Path) -> tuple[dict[str, int], list[str]]:
    """Write the labelled captured rows of data.capture_model as the raw layout of the model's modality (images:
    fetch's IDX files, split `all`; audio and text: the records of capture_records.py), with the classes from the
    captured model's spec and capture.json (the counts); returns counts and notes."""
    from tuneline.tasks.data.capture_records import write_capture_records
    from tuneline.tasks.data.fetch import write_raw

    model = cfg.capture_model
    report, kept = scan_capture(folder, model)
    if registry_dir is None:
        raise DataError("data.source=capture: the registry (paths.registry) is needed to read the captured model's "
                        "input spec")
    if not kept:
        raise DataError(f"data.capture_dir {folder}: {report.describe()}: nothing to train on; send true labels "
                        "for captured request ids to the server's feedback route first")
    versions = sorted({r.version for r in kept if is_version_id(r.version)}, key=version_number)
    version, spec, metadata = captured_spec(registry_dir, model, versions)
    check_modality(kept, spec, model, version)
    valid = [r for r in kept if 0 <= r.label < spec.n_classes]
    invalid = len(kept) - len(valid)
    if invalid:  # a label sent for a class the model does not have: counted in the report, not trained on
        used = Counter(r.version for r in valid)
        versions = {v: {**c, "labelled": used[v]} for v, c in report.versions.items()}
        report = CaptureReport(**{**asdict(report), "invalid_labels": invalid, "labelled": len(valid),
                                  "versions": versions})
    if not valid:
        raise DataError(f"data.capture_dir {folder}: no feedback label names a class of {model} (0..{spec.n_classes - 1})")
    if spec.modality == "image":
        images = np.stack([to_pixels(r.values, spec, r.where) for r in valid])
        write_raw(staging, {"all": (images, np.array([r.label for r in valid], dtype=np.int64))},
                  list(spec.class_names), "capture")
    else:
        write_capture_records(staging, spec, metadata, [(r.values, r.label, r.where) for r in valid], cfg.shard_mb,
                              f"registry {model} {version}")
    report.write(staging)
    notes = [report.describe(), f"the contract from {model} {version}'s input spec ({spec.describe()})"]
    for note in notes:
        log.info("fetch: %s", note)
    return {"all": len(valid)}, notes
