"""`data.source: capture` for audio and text models: real FSDD clips and real SST-2 sentences captured by the
server's own writer (serving/capture.py) with feedback labels, fetched and prepared as the speech and text sources'
records, held to the served model's contract (classes, sample rate and clip length, tokenizer)."""

from __future__ import annotations

import asyncio
import csv
import json
import tarfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tuneline.core.audio import fit_length, load_clip
from tuneline.core.config.params import build_params
from tuneline.core.onnx_metadata import GRAPH_INPUTS, build_metadata
from tuneline.core.spec import InputSpec, TextInput
from tuneline.core.text import Tokenizer, train_tokenizer
from tuneline.flows import stages
from tuneline.flows.drift_watch import capture_overrides
from tuneline.flows.init import EXAMPLES
from tuneline.serving.capture import Capture
from tuneline.tasks.data.capture import CaptureReport
from tuneline.tasks.data.idx import DataError
from tuneline.tasks.data.prepare import load_split
from tuneline.tasks.ship.registry import Registry
from tests.conftest import REPO

pytestmark = pytest.mark.fast

SHARED = REPO.parent / "shared" / "data"
RATE, SAMPLES = 8000, 2640   # the served speech model's clip: 0.33 s at 8 kHz (not a multiple of 0.05 s, which
                             # prepare would round a measured length to)
DIGITS = [str(d) for d in range(10)]
LABELLED_DIGITS = (0, 1, 3, 7)  # feedback for some classes only: the classes are still the model's ten
SENTIMENT = ["negative", "positive"]


def served_onnx(path: Path, spec: InputSpec, tokenizer: Tokenizer | None = None) -> Path:
    """A valid ONNX file (zero logits) whose metadata is what export writes for `spec` (core/onnx_metadata.py):
    the capture reader reads the served version's contract from it and never runs it."""
    import onnx
    from onnx import TensorProto, helper

    name, dtype = GRAPH_INPUTS[spec.modality]
    width, elem_type = spec.shape[0], TensorProto.FLOAT if dtype == "float32" else TensorProto.INT64
    nodes = [helper.make_node("Cast", [name], ["x"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["x", "w"], ["logits"])]
    graph = helper.make_graph(
        nodes, "served", [helper.make_tensor_value_info(name, elem_type, ["batch", width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", spec.n_classes])],
        [helper.make_tensor("w", TensorProto.FLOAT, [width, spec.n_classes], [0.0] * (width * spec.n_classes))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    args = {"modality": spec.modality, "input": {"spec": spec.to_dict(),
                                                 **({"tokenizer": tokenizer.json} if tokenizer else {})}}
    lineage = {"data_version": "d.dir", "params_hash": "p" * 16, "git_commit": "c" * 40}
    for key, value in build_metadata({"model_args": args, "lineage": lineage}, "served", {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


Batch = tuple[str, np.ndarray, list[str] | None, list[int | None]]  # version, rows, texts, a label (or None) per row


def serve_and_capture(root: Path, name: str, spec: InputSpec, batches: list[Batch],
                      tokenizer: Tokenizer | None = None) -> list[str]:
    """Register `spec`'s model as `name` v0001 and v0002 and capture `batches` (version, the graph's rows, a text
    model's strings, a feedback label or None per row) with the server's Capture; returns the ids in order."""
    registry = Registry(root / "registry", name)
    onnx_path = served_onnx(root / f"{name}.onnx", spec, tokenizer)
    for _ in range(2):
        registry.register({"model.onnx": onnx_path}, metrics={}, gates=[], lineage={}, run_id=None)
    capture = Capture(root / ".tuneline" / "capture", percent=100.0, max_mb=100.0)
    ids = []
    for version, rows, texts, labels in batches:
        model = SimpleNamespace(name=name, version=version, modality=spec.modality)
        probabilities = np.full((len(rows), spec.n_classes), 1.0 / spec.n_classes, dtype=np.float32)
        batch_ids = capture.record(model, rows, texts, probabilities)
        for row_id, label in zip(batch_ids, labels):
            if label is not None:
                capture.feedback(row_id, label)
        ids += batch_ids
    asyncio.run(capture.flush())
    return ids


def capture_params(name: str, **extra):
    return build_params({}, {"data.source": "capture", "data.capture_model": name, "data.val_fraction": 0.2, **extra})


def prepared_pairs(root: Path, key) -> Counter:
    """(key(row), label) of every prepared row, over the three splits."""
    pairs = Counter()
    for split in ("train", "val", "test"):
        rows, labels = load_split(root / "data" / "prepared", split)
        pairs.update((key(row), int(label)) for row, label in zip(rows.numpy(), labels.numpy()))
    return pairs


def rewrite_row(root: Path, row_id: str, **changes) -> None:
    """Change one captured row in place (as another writer, or another model's server, would have written it)."""
    path = next((root / ".tuneline" / "capture").glob("capture-*.jsonl"))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({**r, **changes} if r["id"] == row_id else r) + "\n" for r in rows))


# --- audio ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fsdd_clips() -> dict[int, list[np.ndarray]]:
    """Six real FSDD recordings of each digit, decoded at 8 kHz (mono float32, their own lengths)."""
    clips: dict[int, list[np.ndarray]] = {d: [] for d in range(10)}
    with tarfile.open(SHARED / "fsdd" / "fsdd-recordings.tar.gz") as tar:
        for member in tar:
            digit = Path(member.name).name.split("_")[0]
            if member.name.endswith(".wav") and digit.isdigit() and len(clips[int(digit)]) < 6:
                clips[int(digit)].append(load_clip(tar.extractfile(member).read(), RATE, member.name))
    return clips


@pytest.fixture
def speech_capture(tmp_path, fsdd_clips):
    """The server's capture of a speech model (digits 0-9, 8 kHz, 0.33 s): 20 clips answered by v0001 with labels
    for digits 0, 1, 3 and 7, then 10 by v0002 of which 4 are labelled; rows as the server captures them (fitted)."""
    spec = InputSpec.for_audio(DIGITS, RATE, SAMPLES)
    labelled = [(d, clip) for d in LABELLED_DIGITS for clip in fsdd_clips[d][:5]]
    first = np.stack([fit_length(clip, SAMPLES) for _, clip in labelled])
    later = [(d, fsdd_clips[d][5]) for d in (2, 4, 5, 6, 8, 9, 0, 1, 3, 7)]
    second = np.stack([fit_length(clip, SAMPLES) for _, clip in later])
    ids = serve_and_capture(tmp_path, "speech", spec, [
        ("v0001", first, None, [d for d, _ in labelled]),
        ("v0002", second, None, [None] * 6 + [d for d, _ in later[6:]])])
    expected = Counter((clip.tobytes(), d) for clip, (d, _) in zip(first, labelled))
    expected.update((clip.tobytes(), d) for clip, (d, _) in list(zip(second, later))[6:])
    return tmp_path, spec, ids, expected


def test_captured_clips_become_the_speech_records_at_the_served_rate_length_and_classes(speech_capture):
    root, served, _, expected = speech_capture
    params = capture_params("speech")
    fetched = stages.fetch(params, root)
    assert fetched.counts == {"all": 24} and fetched.source == "capture:speech"
    report = CaptureReport.read(root / "data" / "raw")
    assert (report.rows, report.labelled, report.unlabelled) == (30, 24, 6)
    assert report.versions == {"v0001": {"rows": 20, "labelled": 20}, "v0002": {"rows": 10, "labelled": 4}}
    records = json.loads((root / "data" / "raw" / "records.json").read_text())
    assert (records["kind"], records["sample_rate"], records["samples"]) == ("audio", RATE, SAMPLES)
    assert json.loads((root / "data" / "raw" / "classes.json").read_text()) == DIGITS

    prepared = stages.prepare(params, root)
    spec = InputSpec.from_dict(prepared.manifest["input_spec"])
    assert spec.same_contract(served) and (spec.audio.sample_rate, spec.audio.samples) == (RATE, SAMPLES)
    # Every captured clip came back sample for sample, joined to its own feedback label.
    assert prepared_pairs(root, lambda row: row.astype(np.float32).tobytes()) == expected


def test_an_audio_row_of_another_length_or_modality_is_refused_with_its_id(speech_capture):
    root, _, ids, _ = speech_capture
    params = capture_params("speech")
    rewrite_row(root, ids[2], input=[0.0] * 100, shape=[100])
    with pytest.raises(DataError, match=rf"capture capture-.*\.jsonl id {ids[2]}: a clip of 100 samples, the model "
                                        r"takes 2640 \(8000 Hz x 0.33 s\).*move its file out of data.capture_dir"):
        stages.fetch(params, root)
    rewrite_row(root, ids[2], input="seven", shape=[], modality="text")  # another model's row under this name
    with pytest.raises(DataError, match=r"rows of model 'speech' are of more than one modality \(.*audio \(capture-"
                                        r".*jsonl id [0-9a-f]{32}\).*: one model name serves one contract") as refused:
        stages.fetch(params, root)
    assert "text (capture-" in str(refused.value) and f".jsonl id {ids[2]})" in str(refused.value)
    assert not (root / "data" / "raw").exists()  # a failed fetch leaves nothing behind


def test_the_drift_watchs_overrides_turn_the_speech_and_sst2_examples_into_capture_runs():
    for example in ("speech", "sst2"):
        values = EXAMPLES[example]
        base = build_params({k: values[k] for k in ("project", "data")})
        params = build_params({k: values[k] for k in ("project", "data")}, capture_overrides(base, example))
        assert (params.data.source, params.data.capture_model) == ("capture", example)


# --- text -----------------------------------------------------------------------------------------------------------


def sst2_rows(name: str, n: int) -> list[tuple[str, int]]:
    """The first `n` (sentence, label) rows of an SST-2 file (its text column is `sentence` or `content`)."""
    with open(SHARED / "sst2" / name, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, dialect="excel-tab", quoting=csv.QUOTE_NONE)
        rows = [(row.get("sentence") or row["content"], int(row["label"])) for _, row in zip(range(n), reader)]
    return rows


@pytest.fixture
def text_capture(tmp_path):
    """A sentiment model whose tokenizer was trained on 500 real SST-2 training sentences (16 ids), and the server's
    capture of 30 real dev sentences sent to it, 24 of them labelled."""
    tokenizer = train_tokenizer([s for s, _ in sst2_rows("train.tsv", 500)], 16, 30000, 1, "word")
    spec = InputSpec.for_text(SENTIMENT, TextInput("wordlevel", tokenizer.vocab_size, tokenizer.max_length,
                                                   tokenizer.pad_id, tokenizer.sha256))
    sent = sst2_rows("dev.tsv", 30)
    texts = [s for s, _ in sent]
    ids = serve_and_capture(tmp_path, "sentiment", spec,
                            [("v0001", tokenizer.encode(texts), texts, [label for _, label in sent[:24]] + [None] * 6)],
                            tokenizer)
    return tmp_path, spec, tokenizer, sent[:24], ids


def test_captured_sentences_become_the_text_records_with_the_served_tokenizer(text_capture):
    root, served, tokenizer, labelled, _ = text_capture
    params = capture_params("sentiment")
    assert stages.fetch(params, root).counts == {"all": 24}
    report = CaptureReport.read(root / "data" / "raw")
    assert (report.rows, report.labelled, report.versions) == (30, 24, {"v0001": {"rows": 30, "labelled": 24}})
    records = json.loads((root / "data" / "raw" / "records.json").read_text())
    assert records["kind"] == "text" and records["tokenizer"] == tokenizer.json
    assert json.loads((root / "data" / "raw" / "classes.json").read_text()) == SENTIMENT

    prepared = stages.prepare(params, root)
    spec = InputSpec.from_dict(prepared.manifest["input_spec"])
    assert spec.same_contract(served) and prepared.manifest["tokenizer"] == tokenizer.json
    # Every sentence encoded by the served tokenizer, joined to its own feedback label.
    expected = Counter((tuple(ids), label) for ids, (_, label) in zip(tokenizer.encode([s for s, _ in labelled]),
                                                                        labelled))
    assert prepared_pairs(root, lambda row: tuple(int(i) for i in row)) == expected


def test_a_text_row_that_is_not_the_string_sent_is_refused_with_its_id(text_capture):
    root, _, tokenizer, labelled, ids = text_capture
    params = capture_params("sentiment")
    rewrite_row(root, ids[5], input=tokenizer.encode([labelled[5][0]])[0].tolist(), shape=[16])  # token ids
    with pytest.raises(DataError, match=rf"capture capture-.*\.jsonl id {ids[5]}: input is a list, not the string "
                                        r"sent .*move its file out of data.capture_dir"):
        stages.fetch(params, root)
    rewrite_row(root, ids[5], input="   ", shape=[])
    with pytest.raises(DataError, match=rf"capture capture-.*\.jsonl id {ids[5]}: empty: send at least one word"):
        stages.fetch(params, root)
