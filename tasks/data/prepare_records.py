"""Prepare for speech and text: raw records (tasks/data/records.py) -> train/val/test shards + a manifest, in the
same prepared format as images (tasks/data/shards.py), so every later stage reads them the same way.

The split is decided from the labels as for images (tasks/data/prepare.py: the source's own test split, else 1/7
carved stratified; validation carved stratified from train; train stored in a seeded shuffled order). Then:

- audio: every clip is fitted to one length (core/audio.py: zeros at the end of a shorter clip, the middle of a
  longer one), `data.clip_seconds` or the training clips' 95th-percentile length, rounded up to 0.05 s. Stored as
  float32 [N, samples]; the input spec records the sample rate and the length.
- text: a tokenizer (core/text.py; data.tokenizer: word or wordpiece) is trained on the training split only, saved as `tokenizer.json`
  beside the shards (and in the manifest, which is what the model takes it from), and every split encoded to
  `data.max_length` token ids (or the training texts' 99th-percentile length, rounded up to 8): int32 [N, length].

Records of captured traffic (tasks/data/capture_records.py) fix what is otherwise measured: records.json names
the served model's clip length (`samples`) or its tokenizer (`tokenizer`, `tokenizer_kind`), and those are kept,
so the retrained model takes the served model's inputs.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from tuneline.core.atomic import staged_dir
from tuneline.core.audio import fit_length
from tuneline.core.config.data import DataConfig
from tuneline.core.spec import InputSpec, TextInput
from tuneline.core.text import TOKENIZER_KINDS, Tokenizer, train_tokenizer
from tuneline.tasks.data.idx import DataError
from tuneline.tasks.data.records import RECORDS_FILE
from tuneline.tasks.data.shards import (FORMAT, RecordLayout, SplitShards, gather_rows, sha256_file, shard_plan,
                                        split_entry, write_shard)

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
TOKENIZER_FILE = "tokenizer.json"


def is_records(raw_dir: Path) -> bool:
    return (Path(raw_dir) / RECORDS_FILE).is_file()


def _splits(cfg: DataConfig, raw: dict[str, SplitShards], n_classes: int) -> dict[str, tuple[str, np.ndarray]]:
    """split -> (raw split it reads, rows in stored order), decided from the labels alone."""
    from tuneline.tasks.data.prepare import TEST_FRACTION_WITHOUT_TEST_SET, TRAIN_ORDER_STREAM, stratified_take

    labels = {name: shards.labels() for name, shards in raw.items()}
    if "all" in raw and "train" not in raw:
        labels["train"], raw["train"] = labels.pop("all"), raw.pop("all")
    if "train" not in raw:
        raise DataError("prepare: the raw records have no training split: run `tuneline stage fetch` again")
    train_rows = np.arange(labels["train"].size)
    if "test" in raw:
        test = ("test", np.arange(labels["test"].size))
    else:
        test_idx, train_rows = stratified_take(labels["train"], round(train_rows.size * TEST_FRACTION_WITHOUT_TEST_SET),
                                               seed=1)
        test = ("train", test_idx)
        log.info("prepare: the source has no test split: %d records (1/7, stratified) carved from train", test_idx.size)

    def limit(rows: np.ndarray, split_labels: np.ndarray, n: int | None) -> np.ndarray:
        if n is None or n >= rows.size:
            return rows
        keep, _ = stratified_take(split_labels[rows], n, cfg.seed)
        return rows[keep]

    train_rows = limit(train_rows, labels["train"], cfg.limit_train)
    test = (test[0], limit(test[1], labels[test[0]], cfg.limit_test))
    if "val" in raw:
        val = ("val", np.arange(labels["val"].size))
    else:
        val_idx, keep = stratified_take(labels["train"][train_rows],
                                        max(n_classes, round(train_rows.size * cfg.val_fraction)), cfg.seed)
        val, train_rows = ("train", train_rows[val_idx]), train_rows[keep]
    order = np.random.default_rng((cfg.seed, TRAIN_ORDER_STREAM)).permutation(train_rows.size)
    return {"train": ("train", train_rows[order]), "val": val, "test": test}


def _clip_samples(cfg: DataConfig, train: SplitShards, rows: np.ndarray, rate: int) -> int:
    if cfg.clip_seconds is not None:
        return round(cfg.clip_seconds * rate)
    offsets = np.concatenate([np.asarray(train.shard(i)["x_offsets"]) for i in range(len(train.shards))
                              ]) if len(train.shards) == 1 else None
    if offsets is not None:
        lengths = np.diff(offsets)[rows]
    else:
        lengths = np.array([len(r) for r in gather_rows(train, rows)[0]])
    seconds = math.ceil(float(np.percentile(lengths, 95)) / rate / 0.05) * 0.05
    return round(seconds * rate)


def _fixed_samples(cfg: DataConfig, records: dict, rate: int) -> int | None:
    """The clip length the raw records fix (a captured model's), None when prepare measures it."""
    if "samples" not in records:
        return None
    samples = int(records["samples"])
    if cfg.clip_seconds is not None and round(cfg.clip_seconds * rate) != samples:
        raise DataError(f"data.clip_seconds {cfg.clip_seconds:g} ({round(cfg.clip_seconds * rate)} samples at {rate} "
                        f"Hz): the captured model takes {samples}: unset data.clip_seconds (the retrained model keeps "
                        "the served model's clip length)")
    return samples


def _texts(shards: SplitShards, rows: np.ndarray) -> list[str]:
    return [bytes(r).decode("utf-8") for r in gather_rows(shards, rows)[0]] if rows.size else []


def run_prepare_records(cfg: DataConfig, raw_dir: Path, prepared_dir: Path) -> "PrepareResult":
    from tuneline.tasks.data.prepare import PrepareResult

    raw_dir, prepared_dir = Path(raw_dir), Path(prepared_dir)
    records = json.loads((raw_dir / RECORDS_FILE).read_text())
    kind, classes = records["kind"], list(records["classes"])
    raw = {split: SplitShards(raw_dir, split, records) for split in records["splits"]}
    plan = _splits(cfg, raw, len(classes))
    manifest = {
        "format": FORMAT, "source": kind, "classes": classes, "record": None, "input_spec": None,
        "seed": cfg.seed, "val_fraction": cfg.val_fraction,
        "limits": {"train": cfg.limit_train, "test": cfg.limit_test}, "shard_mb": cfg.shard_mb,
        "raw_sha256": {p.name: sha256_file(p) for p in sorted(raw_dir.rglob("*")) if p.is_file()},
        "counts": {split: int(rows.size) for split, (_, rows) in plan.items()},
        "splits": {},
    }
    with staged_dir(prepared_dir) as staging:
        if kind == "audio":
            rate = int(records["sample_rate"])
            samples = _fixed_samples(cfg, records, rate) or _clip_samples(cfg, raw[plan["train"][0]], plan["train"][1],
                                                                         rate)
            spec = InputSpec.for_audio(classes, rate, samples)
            layout = RecordLayout("float32", (samples,))

            def encode(texts_or_clips):
                return np.stack([fit_length(np.asarray(c, dtype=np.float32), samples) for c in texts_or_clips]) \
                    if len(texts_or_clips) else np.empty((0, samples), np.float32)
        elif kind == "text":
            train_split, train_rows = plan["train"]
            if "tokenizer" in records:  # a captured model's own tokenizer: its contract, not trained again
                tokenizer, tokenizer_kind = Tokenizer.from_json(records["tokenizer"]), records["tokenizer_kind"]
            else:
                texts = _texts(raw[train_split], train_rows)
                tokenizer = train_tokenizer(texts, cfg.max_length, cfg.vocab_size, cfg.min_frequency, cfg.tokenizer)
                tokenizer_kind = TOKENIZER_KINDS[cfg.tokenizer]
            max_length = tokenizer.max_length
            (staging / TOKENIZER_FILE).write_text(tokenizer.json)
            manifest["tokenizer"] = tokenizer.json
            spec = InputSpec.for_text(classes, TextInput(tokenizer_kind, tokenizer.vocab_size, max_length,
                                                         tokenizer.pad_id, tokenizer.sha256))
            layout = RecordLayout("int32", (max_length,))

            def encode(rows_bytes):
                texts = [bytes(r).decode("utf-8") for r in rows_bytes]
                return tokenizer.encode(texts).astype(np.int32) if texts else np.empty((0, max_length), np.int32)
        else:
            raise DataError(f"{raw_dir / RECORDS_FILE}: unknown record kind {kind!r}: run `tuneline stage fetch` again")
        record_bytes = int(np.prod(layout.shape)) * np.dtype(layout.dtype).itemsize
        for split in SPLITS:
            source, rows = plan[split]
            shards = []
            for index, (start, stop) in enumerate(shard_plan(rows.size, record_bytes, cfg.shard_mb)):
                x, y = gather_rows(raw[source], rows[start:stop]) if stop > start else ([], np.empty(0, np.int64))
                shards.append(write_shard(staging, split, index, encode(x), y, layout))
            manifest["splits"][split] = split_entry(shards)
        manifest["record"] = layout.to_dict()
        manifest["input_spec"] = spec.to_dict()
        manifest["counts_per_class"] = {
            split: {classes[c]: int(n) for c, n in enumerate(np.bincount(
                SplitShards(staging, split, manifest).labels(), minlength=len(classes)))} for split in SPLITS}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for shards in raw.values():
        shards.close()
    log.info("prepare: %s -> %s %s: %s", raw_dir, prepared_dir, manifest["counts"], spec.describe())
    return PrepareResult(prepared_dir=prepared_dir, counts=manifest["counts"], manifest=manifest)
