"""data: where the data comes from and how prepare splits it (fetch and prepare stages)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tuneline.core.config.base import MODEL_NAME_PATTERN, Section


BUILT_IN_SOURCES = ("mnist", "imagefolder", "audio", "text", "capture")


class DataConfig(Section):
    """Where the data comes from and how prepare splits it (fetch and prepare stages)."""

    source: str = Field("mnist", description="mnist | imagefolder | audio | text | capture (the server's captured requests with feedback labels) | module:function (your own loader, docs/data.md)")
    mirror: str | None = Field(None, description="folder or URL holding the four MNIST .gz files; env TUNELINE_DATA_MIRROR wins")
    image_folder: str | None = Field(None, description="for source=imagefolder: a folder (or .tar/.tar.gz/.zip of one) of class sub-folders of PNG/JPEG images, optionally under train/ val/ test/; a path or a URL (https://, s3://, gs://: read where it lies)")
    channels: Literal["auto", 1, 3] = Field("auto", description="imagefolder: auto (3 if any image is colour, else 1) | 1 (gray) | 3 (RGB)")
    image_size: int | tuple[int, int] | None = Field(None, description="imagefolder: null = keep (all images must share one size) | side | [height, width]: resize to it")
    audio_folder: str | None = Field(None, description="for source=audio: a folder (or .tar/.tar.gz/.zip of one) of WAV/FLAC/OGG clips: in class sub-folders (optionally under train/ val/ test/), or labelled by data.label_pattern or data.labels_file")
    label_pattern: str | None = Field(None, description="audio: labels (and fields for data.test_rule) from each file name's stem, e.g. '{label}_{speaker}_{index}'; a field matches anything but '_' and '/'")
    test_rule: str | None = Field(None, description="audio with label_pattern: which clips are the test split, '<field> <op> <value>' with op one of < <= > >= == !=, e.g. 'index < 5' (FSDD's own split)")
    labels_file: str | None = Field(None, description="audio: a CSV/TSV inside the folder or archive with columns file and label (and optionally split: train/val/test)")
    sample_rate: int = Field(16000, ge=1000, le=192000, description="audio: every clip is mixed down to mono and resampled (soxr) to this rate, Hz")
    clip_seconds: float | None = Field(None, gt=0.0, le=60.0, description="audio: the model's clip length; shorter clips are padded with zeros at the end, longer ones keep their middle (null: the training clips' 95th-percentile length, rounded up to 0.05 s)")
    text_files: str | None = Field(None, description="for source=text: a TSV/CSV/JSONL file (test carved from it), or a folder holding train.* and test.* or dev.* (and optionally val.*) files")
    text_column: str | list[str] | None = Field(None, description="text: the text column's name, or names tried in order (files may disagree); null: the one column besides the label")
    label_column: str = Field("label", description="text: the label column's name")
    class_names: dict[str, str] | None = Field(None, description="text or audio: label value -> class name shown by the server and reports, e.g. {'0': negative, '1': positive} (null: the label values)")
    max_length: int | None = Field(None, ge=1, le=4096, description="text: tokens per row; longer texts are cut at the end, shorter padded at the end (null: the training texts' 99th-percentile length, rounded up to 8)")
    tokenizer: Literal["word", "wordpiece"] = Field("word", description="text: what one token id is: word (a word; words unseen in training are [UNK]) | wordpiece (frequent words whole, rarer ones as pieces, so unseen words reach the model through their parts)")
    vocab_size: int = Field(30000, ge=16, description="text: the tokenizer's vocabulary, most frequent training words first ([PAD] and [UNK] included)")
    min_frequency: int = Field(1, ge=1, description="text: words seen fewer times in training become [UNK]")
    capture_dir: str = Field(".tuneline/capture", description="for source=capture: the folder the server captures requests (capture-*.jsonl) and feedback labels (feedback-*.jsonl) into; relative to the project")
    capture_model: str | None = Field(None, pattern=f"^{MODEL_NAME_PATTERN}$", description="for source=capture: the served model whose captured requests are the data (its registry name, e.g. mnist); the retrained model is registered under it")
    options: dict[str, Any] = Field(default_factory=dict, description="source=module:function: keyword arguments passed to your loader")
    val_fraction: float = Field(0.083333, gt=0.0, lt=1.0, description="share of the training set held out for validation (stratified; 5000 of 60000)")
    seed: int = Field(0, description="split seed")
    limit_train: int | None = Field(None, gt=0, description="keep only this many training images (stratified), for quick runs and tests")
    limit_test: int | None = Field(None, gt=0, description="keep only this many test images (stratified)")
    shard_mb: float = Field(64.0, gt=0, description="prepare: largest prepared shard, MB (docs/data.md: prepared shards)")
    prepare_tasks: Literal["local", "prefect"] = Field("local", description="prepare: write the shards in this process (local) or as Prefect tasks mapped over the shards (prefect)")
    prepare_task_runner: str | None = Field(None, description="prepare_tasks=prefect: module:Class of a Prefect task runner, e.g. prefect_dask:DaskTaskRunner (null: Prefect's thread pool)")
    resident_max_mb: float | None = Field(None, ge=0, description="a split up to this size is held whole on the device, a larger one streams from its shards; null: derived from free device (or host) memory, stated in the log; 0: always stream")
    loader_workers: int | None = Field(None, ge=0, description="streaming: loader worker processes (null: 0 when training on the CPU, whose cores train; up to 4 on a GPU)")

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        if value in BUILT_IN_SOURCES or re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", value):
            return value
        raise ValueError(f"{value!r}: expected mnist, imagefolder, audio, text, capture or module:function "
                         "(e.g. mypkg.data:load)")

    @field_validator("prepare_task_runner")
    @classmethod
    def _task_runner(cls, value: str | None) -> str | None:
        if value is None or re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", value):
            return value
        raise ValueError(f"{value!r}: expected module:Class, e.g. prefect_dask:DaskTaskRunner")

    @field_validator("image_size")
    @classmethod
    def _image_size(cls, value):
        sides = (value,) * 2 if isinstance(value, int) else value
        if sides is not None and min(sides) < 1:
            raise ValueError(f"{value!r}: sides must be positive")
        return value

    @model_validator(mode="after")
    def _source_keys(self) -> "DataConfig":
        # Keys that only one source reads are refused elsewhere, so a setting never silently does nothing.
        if self.source != "imagefolder" and (self.channels != "auto" or self.image_size is not None):
            raise ValueError("data.channels / data.image_size apply to source=imagefolder only "
                             "(a loader returns its arrays as they are)")
        audio_keys = {"audio_folder": self.audio_folder, "label_pattern": self.label_pattern,
                      "test_rule": self.test_rule, "labels_file": self.labels_file}
        text_keys = {"text_files": self.text_files, "text_column": self.text_column, "max_length": self.max_length}
        for source, keys in (("audio", audio_keys), ("text", text_keys)):
            set_keys = [f"data.{k}" for k, v in keys.items() if v is not None]
            if self.source != source and set_keys:
                raise ValueError(f"{', '.join(set_keys)} apply to source={source} only")
        if self.source != "text" and self.tokenizer != "word":
            raise ValueError("data.tokenizer applies to source=text only")
        if self.test_rule is not None and self.label_pattern is None:
            raise ValueError("data.test_rule names a field of data.label_pattern: set the pattern too")
        if self.source not in ("audio", "text") and self.class_names is not None:
            raise ValueError("data.class_names apply to source=audio or text (image classes are their folder names)")
        if self.source == "capture" and self.capture_model is None:
            raise ValueError("data.source=capture reads one served model's captured requests: set data.capture_model "
                             "(its registry name, e.g. mnist)")
        if self.source != "capture" and self.capture_model is not None:
            raise ValueError("data.capture_model applies to source=capture only")
        if ":" not in self.source and self.options:
            raise ValueError("data.options are passed to a module:function loader; this source takes none")
        return self

    @property
    def loader(self) -> str | None:
        """`module:function` when the source is the user's own loader, else None."""
        return self.source if ":" in self.source else None

