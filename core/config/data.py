"""data: where the data comes from and how prepare splits it (fetch and prepare stages)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tuneline.core.config.base import Section


class DataConfig(Section):
    """Where the data comes from and how prepare splits it (fetch and prepare stages)."""

    source: str = Field("mnist", description="mnist | imagefolder | module:function (your own loader, docs/data.md)")
    mirror: str | None = Field(None, description="folder or URL holding the four MNIST .gz files; env TUNELINE_DATA_MIRROR wins")
    image_folder: str | None = Field(None, description="for source=imagefolder: a folder (or .tar/.tar.gz/.zip of one) of class sub-folders of PNG/JPEG images, optionally under train/ val/ test/; a path or a URL (https://, s3://, gs://: read where it lies)")
    channels: Literal["auto", 1, 3] = Field("auto", description="imagefolder: auto (3 if any image is colour, else 1) | 1 (gray) | 3 (RGB)")
    image_size: int | tuple[int, int] | None = Field(None, description="imagefolder: null = keep (all images must share one size) | side | [height, width]: resize to it")
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
        if value in ("mnist", "imagefolder") or re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", value):
            return value
        raise ValueError(f"{value!r}: expected mnist, imagefolder or module:function (e.g. mypkg.data:load)")

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
        if ":" not in self.source and self.options:
            raise ValueError("data.options are passed to a module:function loader; this source takes none")
        return self

    @property
    def loader(self) -> str | None:
        """`module:function` when the source is the user's own loader, else None."""
        return self.source if ":" in self.source else None

